"""Initial weights (``config.init``): our checkpoints, Hugging Face folders, the release layout."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from unipic_jax import checkpoint, convert
from unipic_jax.models import unipic
from unipic_jax.train import warm_start


def tiny(seed, **kw):
    return unipic.UniPic(unipic.UniPicConfig.preset("tiny").replace(**kw), rngs=nnx.Rngs(seed))


def flat(model):
    return {convert.mapping.path_str(p): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_checkpoint_parts_are_copied_and_the_rest_is_kept(tmp_path):
    src = tiny(1)
    src.vae.config = src.vae.config.replace(scale=0.5)
    src.config = dataclasses.replace(src.config, vae=src.vae.config)
    checkpoint.save_model(tmp_path / "m", src)
    dst = tiny(2)
    before = flat(dst)
    info = warm_start.warm_start(dst, str(tmp_path / "m"), parts=("vae", "diffloss"))
    after, want = flat(dst), flat(src)
    assert info["copied"] == sum(k.startswith(("vae.", "diffloss.")) for k in after) and info["vae_scale"] == 0.5
    for k in after:
        ref = want[k] if k.startswith(("vae.", "diffloss.")) else before[k]
        np.testing.assert_array_equal(after[k], ref, err_msg=k)
    assert any(not np.array_equal(before[k], want[k]) for k in after if k.startswith("llm."))


def test_hf_qwen2_folder_fills_the_llm(hf_qwen2):
    path, torch_model = hf_qwen2(vocab_size=1024, intermediate_size=128)
    dst = tiny(0)
    info = warm_start.warm_start(dst, str(path), parts=("llm",))
    assert info["copied"] == sum(k.startswith("llm.") for k in flat(dst)) and info["vae_scale"] is None
    emb = torch_model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(dst.llm.embedder.embedding.get_value()), emb)
    q = torch_model.model.layers[1].self_attn.q_proj.bias.detach().numpy()
    np.testing.assert_allclose(np.asarray(flat(dst)["llm.layers.1.attn.q_proj.bias"]).ravel(), q)


def test_release_folder_round_trip(tmp_path):
    src = tiny(3)
    convert.to_unipic(src, tmp_path / "release")
    dst = tiny(4)
    warm_start.warm_start(dst, str(tmp_path / "release"), release_config={"preset": "tiny"})
    a, b = flat(dst), flat(src)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_mismatches_and_bad_paths_are_named(tmp_path):
    checkpoint.save_model(tmp_path / "wide", tiny(0, diffloss=unipic.UniPicConfig.preset("tiny").diffloss.replace(
        width=48)))
    with pytest.raises(warm_start.WarmStartError, match=r"diffloss\..*\(48.*vs|vs.*48"):
        warm_start.warm_start(tiny(1), str(tmp_path / "wide"))
    # the mismatch is outside the selected parts: fine
    assert warm_start.warm_start(tiny(1), str(tmp_path / "wide"), parts=("vae",))["copied"] > 0
    with pytest.raises(FileNotFoundError, match="no such file"):
        warm_start.warm_start(tiny(1), str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(warm_start.WarmStartError, match="neither"):
        warm_start.warm_start(tiny(1), str(tmp_path / "empty"))
    with pytest.raises(warm_start.WarmStartError, match="selects no parameter"):
        warm_start.warm_start(tiny(1), str(tmp_path / "wide"), parts=("nonexistent",))


@pytest.mark.parametrize("src_scan", [False, True])
def test_layer_forms_are_converted(tmp_path, hf_qwen2, src_scan):
    """An unrolled checkpoint fills a scanned model and vice versa; HF folders fill either."""
    cfg = unipic.UniPicConfig.preset("tiny")
    src = unipic.UniPic(checkpoint.with_layer_form(cfg, src_scan), rngs=nnx.Rngs(1))
    checkpoint.save_model(tmp_path / "m", src)
    dst = unipic.UniPic(checkpoint.with_layer_form(cfg, not src_scan), rngs=nnx.Rngs(2))
    info = warm_start.warm_start(dst, str(tmp_path / "m"))
    assert info["copied"] == len(flat(dst))
    unrolled = src if not src_scan else checkpoint.load_model(tmp_path / "m", scan_layers=False)
    back = dst if src_scan else None
    if back is None:  # dst is scanned: compare through an unrolled reload of what it holds
        checkpoint.save_model(tmp_path / "d", dst)
        back = checkpoint.load_model(tmp_path / "d", scan_layers=False)
    a, b = flat(back), flat(unrolled)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    path, torch_model = hf_qwen2(vocab_size=1024, intermediate_size=128)
    scanned = unipic.UniPic(checkpoint.with_layer_form(cfg, True), rngs=nnx.Rngs(0))
    warm_start.warm_start(scanned, str(path), parts=("llm",))
    q = torch_model.model.layers[1].self_attn.q_proj.bias.detach().numpy()
    np.testing.assert_allclose(np.asarray(scanned.llm.layers.attn.q_proj.bias.get_value())[1].ravel(), q)
