"""Orbax model checkpoints and the conversion command line."""

import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from helpers import assert_same_tensors, rand_ids
from unipic_jax import checkpoint, convert, sharding
from unipic_jax.convert.__main__ import main as convert_main
from unipic_jax.models import qwen2


def params(model):
    return {str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_save_and_restore_onto_a_mesh(tmp_path):
    cfg = qwen2.Qwen2Config.preset("tiny", tie_word_embeddings=False)
    model = qwen2.init(cfg, seed=3)
    checkpoint.save_model(tmp_path / "ck", model)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["family"] == "qwen2"
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    back = checkpoint.load_model(tmp_path / "ck", mesh=mesh)
    assert back.config == cfg
    a, b = params(model), params(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert back.layers[0].mlp.gate_up_proj.kernel[...].sharding.spec == P(None, "tensor", "fsdp")
    bf = checkpoint.load_model(tmp_path / "ck", dtype=jnp.bfloat16)
    assert bf.layers[0].mlp.gate_up_proj.kernel[...].dtype == jnp.bfloat16 and bf.config.dtype == "bfloat16"
    with pytest.raises(FileExistsError, match="already holds"):
        checkpoint.save_model(tmp_path / "ck", model)


def test_incomplete_and_corrupt_checkpoints_are_reported(tmp_path):
    model = qwen2.init(qwen2.Qwen2Config.preset("tiny"))
    checkpoint.save_model(tmp_path / "ck", model)
    shutil.copytree(tmp_path / "ck", tmp_path / "half")
    (tmp_path / "half" / "config.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="interrupted"):
        checkpoint.load_model(tmp_path / "half")
    shutil.copytree(tmp_path / "ck", tmp_path / "bad")
    shutil.rmtree(tmp_path / "bad" / "params")
    (tmp_path / "bad" / "params").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="incomplete, corrupt"):
        checkpoint.load_model(tmp_path / "bad")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["config"]["hidden_size"] = 32
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match="different config"):
        checkpoint.load_model(tmp_path / "ck")


def test_cli_round_trip_hf_orbax_hf(hf_qwen2, tmp_path, capsys):
    path, hf = hf_qwen2(tie_word_embeddings=False)
    assert convert_main(["hf-to-orbax", str(path), str(tmp_path / "ck"), "--mesh", "fsdp=4,tensor=2"]) == 0
    assert convert_main(["orbax-to-hf", str(tmp_path / "ck"), str(tmp_path / "hf"), "--max_shard_size", "30KB"]) == 0
    assert_same_tensors(path, tmp_path / "hf")
    ids = rand_ids((1, 5), hf.config.vocab_size)
    np.testing.assert_array_equal(
        np.asarray(convert.from_hf(tmp_path / "hf", progress=False)(jnp.asarray(ids))),
        np.asarray(convert.from_hf(path, progress=False)(jnp.asarray(ids))),
    )
    # refuses to overwrite, reports the reason, exit code 2
    assert convert_main(["hf-to-orbax", str(path), str(tmp_path / "ck")]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_cli_scan_layers_sets_the_written_layer_form(hf_qwen2, tmp_path, capsys):
    path, _ = hf_qwen2()
    models = {}
    for flag, form in (("--scan_layers=true", True), ("--scan_layers=false", False)):
        dst = tmp_path / f"ck_{form}"
        assert convert_main(["hf-to-orbax", str(path), str(dst), flag]) == 0
        assert json.loads((dst / "config.json").read_text())["config"]["scan_layers"] is form
        models[form] = params(checkpoint.load_model(dst, scan_layers=False))
    a, b = models[True], models[False]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # a flag the subcommand does not use is an error naming both
    assert convert_main(["orbax-to-hf", str(tmp_path / "ck_True"), str(tmp_path / "hf"), "--scan_layers"]) == 2
    err = capsys.readouterr().err
    assert "--scan_layers" in err and "orbax-to-hf" in err


def test_cli_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "unipic_jax.convert", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "hf-to-orbax" in out.stdout and "orbax-to-hf" in out.stdout


def test_loading_the_other_layer_form_stacks_or_unstacks(tmp_path):
    cfg = qwen2.Qwen2Config.preset("tiny")
    model = qwen2.init(cfg, seed=3)
    checkpoint.save_model(tmp_path / "ck", model)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["config"]["scan_layers"] is False
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    scanned = checkpoint.load_model(tmp_path / "ck", mesh=mesh, scan_layers=True)
    assert scanned.config.scan_layers and scanned.layers.mlp.gate_up_proj.kernel.shape == (2, 2, 128, 64)
    assert scanned.layers.mlp.gate_up_proj.kernel[...].sharding.spec == P(None, None, "tensor", "fsdp")
    for i in range(2):
        np.testing.assert_array_equal(scanned.layers.attn.q_proj.bias[...][i], model.layers[i].attn.q_proj.bias[...])
    ids = jnp.asarray(rand_ids((2, 6), cfg.vocab_size))
    np.testing.assert_allclose(scanned(ids), model(ids), atol=1e-5)
    checkpoint.save_model(tmp_path / "scanned", scanned)
    back = checkpoint.load_model(tmp_path / "scanned", remat="full", scan_layers=False)  # or scan_layers via cfg
    assert not back.config.scan_layers and back.config.remat == "full"
    a, b = params(model), params(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    same = checkpoint.load_model(tmp_path / "scanned")
    assert same.config.scan_layers and set(params(same)) == set(params(scanned))


def test_composite_checkpoint_changes_one_part_form(tmp_path):
    from unipic_jax.models import unipic

    cfg = unipic.UniPicConfig.preset("tiny")
    model = unipic.UniPic(cfg, rngs=nnx.Rngs(0))
    checkpoint.save_model(tmp_path / "ck", model)
    back = checkpoint.load_model(tmp_path / "ck", llm=cfg.llm.replace(scan_layers=True))
    assert checkpoint.layer_forms(back.config) == {"llm": True, "mar": False, "diffloss": False}
    np.testing.assert_array_equal(back.llm.layers.mlp.down_proj.kernel[...][1], model.llm.layers[1].mlp.down_proj.kernel[...])
    np.testing.assert_array_equal(back.mar.encoder_blocks[1].fc1.kernel[...], model.mar.encoder_blocks[1].fc1.kernel[...])
    everything = checkpoint.load_model(tmp_path / "ck", scan_layers=True)
    assert set(checkpoint.layer_forms(everything.config).values()) == {True}
    np.testing.assert_array_equal(everything.diffloss.net.res_blocks.ada.kernel[...][0],
                                  model.diffloss.net.res_blocks[0].ada.kernel[...])
