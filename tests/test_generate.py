"""The command lines end to end on a tiny model: release -> Orbax (with the tokenizer) ->
generate, edit, describe -> PNG files; and Orbax -> release bit-identical."""

import json
import shutil

import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from unipic_jax import checkpoint, convert
from unipic_jax import tokenizer as tok_lib
from unipic_jax.convert.__main__ import main as convert_main
from unipic_jax.generate import main as generate_main
from unipic_jax.models import unipic as U


def params(model):
    return {str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny release folder with the real Qwen tokenizer, converted by the CLI."""
    d = tmp_path_factory.mktemp("cli")
    tok = tok_lib.load_tokenizer(qwen_tokenizer_dir)
    base = U.UniPicConfig.preset("tiny")
    cfg = base.replace(llm=base.llm.replace(vocab_size=len(tok)), image_token_id=tok_lib.image_token_id(tok))
    convert.to_unipic(U.UniPic(cfg, rngs=nnx.Rngs(0)), d / "release")
    for f in qwen_tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, d / "release" / "Qwen2.5-1.5B-Instruct" / f.name)
    rc = convert_main(["unipic-to-orbax", str(d / "release"), str(d / "ckpt"), "--config", "tiny",
                       "--set", f"image_token_id={cfg.image_token_id}", "--mesh", "fsdp=-1"])
    assert rc == 0
    return d, cfg


def test_convert_cli_round_trip(converted):
    d, cfg = converted
    assert (d / "ckpt" / "tokenizer" / "tokenizer.json").exists()
    assert convert_main(["orbax-to-unipic", str(d / "ckpt"), str(d / "back")]) == 0
    for name in ("pytorch_model.bin", "kl16.ckpt"):
        a = torch.load(d / "release" / name, weights_only=True)
        b = torch.load(d / "back" / name, weights_only=True)
        a, b = (a["model"], b["model"]) if name == "kl16.ckpt" else (a, b)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # an existing destination is refused without --overwrite
    assert convert_main(["orbax-to-unipic", str(d / "ckpt"), str(d / "back")]) == 2


def test_convert_cli_scan_layers(converted):
    d, cfg = converted
    common = ["--config", "tiny", "--set", f"image_token_id={cfg.image_token_id}"]
    assert convert_main(["unipic-to-orbax", str(d / "release"), str(d / "scanned"), *common, "--scan_layers",
                         "--set", "mar.scan_layers=False"]) == 0  # --set changes one part after --scan_layers
    stored = json.loads((d / "scanned" / "config.json").read_text())["config"]
    assert {p: stored[p]["scan_layers"] for p in ("llm", "mar", "diffloss")} == {"llm": True, "mar": False,
                                                                                 "diffloss": True}
    assert convert_main(["unipic-to-orbax", str(d / "release"), str(d / "unscanned"), *common, "--noscan_layers"]) == 0
    stored = json.loads((d / "unscanned" / "config.json").read_text())["config"]
    assert not any(stored[p]["scan_layers"] for p in ("llm", "mar", "diffloss"))
    a, b = (params(checkpoint.load_model(d / n, scan_layers=False)) for n in ("scanned", "unscanned"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_generate_edit_describe(converted, capsys):
    d, _ = converted
    out = d / "gen" / "a.png"
    common = ["--checkpoint", str(d / "ckpt"), "--size", "16", "--num_iter", "2"]
    assert generate_main(common + ["--prompt", "a red circle", "--prompt", "a blue square", "--out", str(out)]) == 0
    files = [d / "gen" / "a_0.png", d / "gen" / "a_1.png"]
    assert all(f.exists() for f in files)
    assert np.asarray(Image.open(files[0])).shape == (16, 16, 3)
    edited = d / "gen" / "e.png"
    assert generate_main(common + ["--edit", str(files[0]), "--instruction", "make it green", "--out",
                                   str(edited), "--cfg", "1"]) == 0
    assert np.asarray(Image.open(edited)).shape == (16, 16, 3)
    assert generate_main(common + ["--describe", str(files[1]), "--question", "What?", "--max_new_tokens", "3"]) == 0
    # the release folder itself works too (converted on the fly; its tokenizer found in the Qwen folder)
    assert generate_main(["--checkpoint", str(d / "release"), "--config", "tiny", "--size", "16", "--num_iter", "1",
                          "--prompt", "x", "--out", str(d / "gen" / "r.png")]) == 0
    assert (d / "gen" / "r.png").exists()


def test_bad_input_is_an_error_message(converted, capsys):
    d, _ = converted
    (d / "not_an_image.png").write_text("hello")
    common = ["--checkpoint", str(d / "ckpt"), "--size", "16", "--num_iter", "1"]
    assert generate_main(common + ["--edit", str(d / "not_an_image.png"), "--instruction", "x"]) == 2
    assert "not_an_image.png" in capsys.readouterr().err
    assert generate_main(["--checkpoint", str(d / "missing"), "--prompt", "x"]) == 2
    assert "missing" in capsys.readouterr().err
    assert generate_main(common + ["--prompt", "x", "--size", "18"]) == 2
    assert "multiples" in capsys.readouterr().err
