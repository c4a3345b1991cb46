"""Hugging Face conversion: bit-exact round trips, sharded folders, and clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from helpers import assert_same_tensors, rand_ids, read_all
from unipic_jax import convert, sharding
from unipic_jax.convert import tables
from unipic_jax.convert.hf import ConversionError
from unipic_jax.convert.mapping import KeyMap, path_str
from unipic_jax.models import qwen2


@pytest.mark.parametrize("kw,scan", [(dict(), False), (dict(tie_word_embeddings=False, num_key_value_heads=1), False),
                                     (dict(tie_word_embeddings=False), True)])
def test_round_trip_is_bit_identical(hf_qwen2, tmp_path, kw, scan):
    path, _ = hf_qwen2(**kw)
    model = convert.from_hf(path, progress=False, scan_layers=scan)
    assert model.config.scan_layers == scan
    convert.to_hf(model, tmp_path / "back", progress=False)
    assert_same_tensors(path, tmp_path / "back")
    cfg_a = json.loads((path / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "back" / "config.json").read_text())
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "tie_word_embeddings",
              "rope_parameters", "rms_norm_eps", "eos_token_id"):
        assert cfg_a[k] == cfg_b[k], k


def test_bf16_checkpoint_round_trip_and_mesh(hf_qwen2, tmp_path):
    path, hf = hf_qwen2(dtype=torch.bfloat16, tie_word_embeddings=False)
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = convert.from_hf(path, mesh=mesh, progress=False)  # dtype from config.json
    assert model.config.dtype == "bfloat16"
    assert model.embedder.embedding[...].dtype == jnp.bfloat16
    convert.to_hf(model, tmp_path / "back", progress=False)
    assert_same_tensors(path, tmp_path / "back")


def test_sharded_index_in_and_out(hf_qwen2, tmp_path):
    path, hf = hf_qwen2(max_shard_size="40KB", tie_word_embeddings=False)
    assert (path / "model.safetensors.index.json").exists()
    model = convert.from_hf(path, progress=False)
    ids = rand_ids((2, 6), hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, atol=1e-4)
    out = convert.to_hf(model, tmp_path / "sharded", max_shard_size="40KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_same_tensors(path, out)
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(torch.tensor(ids, dtype=torch.long)).logits.numpy(), ref)


def _rewrite(path, fn):
    tensors = read_all(path)
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_unknown_key_is_named(hf_qwen2):
    path, _ = hf_qwen2()
    _rewrite(path, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(ConversionError, match=r"unknown keys[\s\S]*model\.layers\.0\.mlp\.extra_proj\.weight"):
        convert.from_hf(path, progress=False)


def test_key_for_a_layer_the_config_lacks_is_named(hf_qwen2):
    path, _ = hf_qwen2()
    _rewrite(path, lambda t: t.update({"model.layers.7.input_layernorm.weight": np.ones((64,), np.float32)}))
    with pytest.raises(ConversionError, match=r"model\.layers\.7\.input_layernorm\.weight \(would be layers\.7"):
        convert.from_hf(path, progress=False)
    with pytest.raises(ConversionError, match=r"model\.layers\.7\.input_layernorm\.weight \(would be "
                                              r"layers\.input_norm\.scale\[7\], but that stack has 2 blocks\)"):
        convert.from_hf(path, progress=False, scan_layers=True)


def test_missing_key_is_named(hf_qwen2):
    path, _ = hf_qwen2()
    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ConversionError, match=r"missing[\s\S]*layers\.1\.attn\.k_proj\.bias \(torch key "
                                              r"model\.layers\.1\.self_attn\.k_proj\.bias\)"):
        convert.from_hf(path, progress=False)


def test_missing_half_of_a_stacked_parameter_is_named(hf_qwen2):
    path, _ = hf_qwen2()
    _rewrite(path, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"layers\.0\.mlp\.gate_up_proj\.kernel\[1\] \(torch key "
                                              r"model\.layers\.0\.mlp\.up_proj\.weight\)"):
        convert.from_hf(path, progress=False)


def test_shape_mismatch_is_named(hf_qwen2):
    path, _ = hf_qwen2()
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: checkpoint \(112, 64\), "
                                              r"model expects \(96, 64\)"):
        convert.from_hf(path, progress=False)


def test_tied_checkpoint_with_explicit_lm_head_loads(hf_qwen2):
    path, hf = hf_qwen2()
    _rewrite(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    model = convert.from_hf(path, progress=False)
    assert model.lm_head is None


def test_folder_errors(tmp_path, hf_qwen2):
    with pytest.raises(ConversionError, match="no config.json"):
        convert.from_hf(tmp_path, progress=False)
    path, _ = hf_qwen2()
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ConversionError, match="model_type='llama'"):
        convert.from_hf(path, progress=False)
    (path / "config.json").write_text(json.dumps(cfg))
    os.rename(path / "model.safetensors", path / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="No model.safetensors"):
        convert.from_hf(path, progress=False)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")  # truncated file
    with pytest.raises(ConversionError, match="Is the file complete"):
        convert.from_hf(path, progress=False)


def test_unsupported_hf_features_are_rejected(hf_qwen2):
    path, _ = hf_qwen2()
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ValueError, match="yarn"):
        convert.from_hf(path, progress=False)


def test_to_hf_never_clobbers_a_folder(tmp_path):
    model = qwen2.init(qwen2.Qwen2Config.preset("tiny"))
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        convert.to_hf(model, dst, progress=False)
    convert.to_hf(model, dst, overwrite=True, progress=False)
    assert (dst / "precious.txt").read_text() == "keep me"
    assert (dst / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.tmp")]


@pytest.mark.parametrize("scan", [False, True])
def test_mapping_table_covers_every_parameter_both_ways(scan):
    for tied in (True, False):
        cfg = qwen2.Qwen2Config.preset("tiny", tie_word_embeddings=tied, scan_layers=scan)
        abstract = nnx.eval_shape(lambda: qwen2.Qwen2(cfg, rngs=nnx.Rngs(0)))
        km = KeyMap(tables.qwen2_hf_rules(cfg), tables.QWEN2_HF_IGNORED)
        torch_keys = []
        for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
            ours = path_str(p)
            slots = km.to_torch(ours, v.get_value().shape)
            assert slots, ours
            for torch_key, _, index in slots:
                assert km.to_ours(torch_key)[0::2] == (ours, index)
                torch_keys.append(torch_key)
        assert len(torch_keys) == len(set(torch_keys)) == 2 + (not tied) + 12 * cfg.num_layers
    if scan:
        assert km.to_ours("model.layers.12.mlp.up_proj.weight")[0::2] == ("layers.mlp.gate_up_proj.kernel", (12, 1))
        slots = {s.index: s.key for s in km.to_torch("layers.mlp.gate_up_proj.kernel", (2, 2, 8, 4))}
        assert slots == {(i, j): f"model.layers.{i}.mlp.{('gate', 'up')[j]}_proj.weight" for i in (0, 1) for j in (0, 1)}
    else:
        assert km.to_ours("model.layers.12.mlp.up_proj.weight")[0] == "layers.12.mlp.gate_up_proj.kernel"
        assert [s.rule.stack for s in km.to_torch("layers.3.mlp.gate_up_proj.kernel")] == [0, 1]
    assert km.to_ours("model.layers.x.mlp.up_proj.weight") is None
    assert km.ignored("model.layers.0.self_attn.rotary_emb.inv_freq")


def test_placed_arrays_use_the_mesh_without_a_host_copy_of_the_model(hf_qwen2):
    path, _ = hf_qwen2(num_attention_heads=4, num_key_value_heads=2)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = convert.from_hf(path, mesh=mesh, progress=False)
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = v[...]
        assert isinstance(arr, jax.Array) and arr.sharding.mesh == mesh, p
    k = model.layers[0].attn.k_proj.kernel[...]
    assert k.sharding.spec == jax.sharding.PartitionSpec("tensor", None, "fsdp")  # (kv_heads, head_dim, embed)
