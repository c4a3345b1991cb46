"""Qwen2 decoder against transformers (float32, tiny random configs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from helpers import rand_ids
from unipic_jax import convert, sharding
from unipic_jax.models import qwen2

CONFIGS = {
    "tied_gqa": dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2),
    "untied_mha": dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=4),
    "untied_mqa_headdim": dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                               num_hidden_layers=3),
}


def torch_logits(model, ids, mask, position_ids=None):
    with torch.no_grad():
        out = model(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=None if position_ids is None else torch.tensor(position_ids, dtype=torch.long),
        )
    return out.logits.float().numpy()


def right_padded(vocab, seed=0):
    ids = rand_ids((3, 11), vocab, seed)
    mask = np.ones_like(ids, bool)
    mask[1, 7:] = False
    mask[2, 4:] = False
    return np.where(mask, ids, 0), mask


@pytest.mark.parametrize("name,scan", [(n, False) for n in CONFIGS] + [(next(iter(CONFIGS)), True)])
def test_hf_to_jax_logits_right_padded(hf_qwen2, name, scan):
    path, hf = hf_qwen2(**CONFIGS[name])
    model = convert.from_hf(path, progress=False, scan_layers=scan)
    assert isinstance(model.layers, nnx.List) != scan
    ids, mask = right_padded(hf.config.vocab_size)
    ref = torch_logits(hf, ids, mask)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert out.shape == ref.shape == (3, 11, hf.config.vocab_size)
    np.testing.assert_allclose(out[mask], ref[mask], atol=1e-4, rtol=0)


def test_left_padding_uses_cumsum_positions(hf_qwen2):
    path, hf = hf_qwen2()
    model = convert.from_hf(path, progress=False)
    ids = rand_ids((2, 9), hf.config.vocab_size, seed=3)
    mask = np.ones_like(ids, bool)
    mask[0, :4] = False
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    ref = torch_logits(hf, ids, mask, position_ids=pos)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(out[mask], ref[mask], atol=1e-4, rtol=0)
    # the left-padded row equals the same tokens without padding
    alone = np.asarray(model(jnp.asarray(ids[:1, 4:])))
    np.testing.assert_allclose(out[0, 4:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_jax_to_hf_logits(tmp_path, tied):
    cfg = qwen2.Qwen2Config(
        vocab_size=157, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6, num_kv_heads=2,
        rope_theta=1e6, tie_word_embeddings=tied, initializer_range=0.1, eos_token_id=1, pad_token_id=0,
    )
    model = qwen2.init(cfg, seed=1)
    convert.to_hf(model, tmp_path / "out", progress=False)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.tie_word_embeddings == tied
    ids, mask = right_padded(cfg.vocab_size, seed=2)
    ref = torch_logits(hf, ids, mask)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ref[mask], out[mask], atol=1e-5, rtol=0)


def test_greedy_generate_matches_transformers(hf_qwen2):
    path, hf = hf_qwen2(tie_word_embeddings=False, eos_token_id=None)
    model = convert.from_hf(path, progress=False)
    ids = rand_ids((3, 8), hf.config.vocab_size, seed=5)
    mask = np.ones_like(ids, bool)
    mask[1, :3] = False  # transformers generates from left-padded prompts
    mask[2, :6] = False
    ids = np.where(mask, ids, 0)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=32, do_sample=False, pad_token_id=0,
        )[:, ids.shape[1]:].numpy()
    out = np.asarray(model.generate(ids, mask, max_new_tokens=32))
    assert out.shape == (3, 32)
    np.testing.assert_array_equal(out, ref)

    # the same prompts right-padded continue each row from its own last token
    right = np.zeros_like(ids)
    rmask = np.zeros_like(mask)
    for b in range(3):
        n = mask[b].sum()
        right[b, :n] = ids[b, mask[b]]
        rmask[b, :n] = True
    np.testing.assert_array_equal(np.asarray(model.generate(right, rmask, max_new_tokens=32)), ref)


def test_generate_stops_on_eos(hf_qwen2):
    path, hf = hf_qwen2(eos_token_id=None)
    model = convert.from_hf(path, progress=False)
    ids = rand_ids((2, 6), hf.config.vocab_size, seed=7)
    free = np.asarray(model.generate(ids, max_new_tokens=12))
    eos = int(free[0, 3])
    out = np.asarray(model.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0))
    for b in range(2):
        hits = np.flatnonzero(free[b] == eos)
        stop = hits[0] if len(hits) else 12
        np.testing.assert_array_equal(out[b, : stop + 1], free[b, : stop + 1])
        assert (out[b, stop + 1:] == 0).all()
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens=12, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)[:, 6:].numpy()
    np.testing.assert_array_equal(out[:, : ref.shape[1]], ref)


def test_kv_cache_decode_matches_full_forward(hf_qwen2):
    path, hf = hf_qwen2()
    model = convert.from_hf(path, progress=False)
    ids = jnp.asarray(rand_ids((2, 10), hf.config.vocab_size, seed=9))
    full = model(ids)
    cache = qwen2.KVCache.zeros(model.config, 2, 10)
    h, cache = model.hidden_states(ids[:, :6], cache=cache, write_index=0)
    steps = [model.logits(h)]
    for t in range(6, 10):
        h, cache = model.hidden_states(ids[:, t:t + 1], position_ids=jnp.full((2, 1), t), cache=cache, write_index=t)
        steps.append(model.logits(h))
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5, rtol=0)


def test_sampling_is_seeded_and_top_p_narrows(hf_qwen2):
    path, hf = hf_qwen2(eos_token_id=None)
    model = convert.from_hf(path, progress=False)
    ids = rand_ids((2, 5), hf.config.vocab_size, seed=11)
    a = model.generate(ids, max_new_tokens=16, temperature=1.0, rng=jax.random.key(0))
    b = model.generate(ids, max_new_tokens=16, temperature=1.0, rng=jax.random.key(0))
    c = model.generate(ids, max_new_tokens=16, temperature=1.0, rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = model.generate(ids, max_new_tokens=16)
    nucleus = model.generate(ids, max_new_tokens=16, temperature=1.0, top_p=1e-6, rng=jax.random.key(2))
    np.testing.assert_array_equal(nucleus, greedy)
    with pytest.raises(ValueError, match="rng"):
        model.generate(ids, max_new_tokens=4, temperature=0.7)


def test_sample_token_top_p_keeps_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.vmap(lambda k: qwen2.sample_token(logits, k, 1.0, 0.7, greedy=False))(
        jax.random.split(jax.random.key(0), 400))
    assert set(np.unique(draws).tolist()) == {0, 1}


@pytest.mark.parametrize("axes", [{"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 4}])
def test_mesh_forward_and_generate_match_single_device(hf_qwen2, axes):
    path, hf = hf_qwen2(tie_word_embeddings=False, eos_token_id=None, vocab_size=256)
    single = convert.from_hf(path, progress=False)
    mesh = sharding.make_mesh(axes)
    sharded = convert.from_hf(path, mesh=mesh, progress=False)
    q = sharded.layers[0].attn.q_proj.kernel[...]
    assert q.shape == (4, 16, 64)  # (heads, head_dim, embed)
    assert q.sharding.spec == sharding.logical_to_spec(("heads", "head_dim", "embed"), q.shape, mesh)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape[2] == 64 // axes["fsdp"]
    ids, mask = right_padded(256, seed=4)
    ids, mask = np.concatenate([ids, ids[::-1]]), np.concatenate([mask, mask[::-1]])  # batch 6 -> 8 below
    ids, mask = np.concatenate([ids, ids[:2]]), np.concatenate([mask, mask[:2]])
    ref = np.asarray(single(jnp.asarray(ids), jnp.asarray(mask)))
    with jax.set_mesh(mesh):
        out = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(sharded, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(
        sharded.generate(ids, mask, max_new_tokens=8), single.generate(ids, mask, max_new_tokens=8)
    )


def test_bf16_compute_with_f32_params_and_remat(hf_qwen2):
    path, hf = hf_qwen2(initializer_range=0.05)
    ref = convert.from_hf(path, progress=False)
    mixed = convert.from_hf(path, dtype=jnp.bfloat16, param_dtype=jnp.float32, progress=False)
    assert mixed.layers[0].mlp.gate_up_proj.kernel[...].dtype == jnp.float32
    ids = jnp.asarray(rand_ids((2, 8), hf.config.vocab_size, seed=1))
    a, b = ref(ids), mixed(ids)
    assert b.dtype == jnp.float32 and np.isfinite(b).all()
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()

    remat = convert.from_hf(path, remat="full", progress=False)

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])

    g1 = nnx.grad(loss)(ref)
    g2 = nnx.grad(loss)(remat)
    np.testing.assert_allclose(loss(ref), loss(remat), atol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), nnx.state(g1), nnx.state(g2))


def test_bad_inputs_raise_clear_errors():
    model = qwen2.init(qwen2.Qwen2Config.preset("tiny"))
    with pytest.raises(ValueError, match="attention_mask"):
        model(jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="batch, length"):
        model.generate(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="num_kv_heads"):
        qwen2.Qwen2Config.preset("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="Unknown Qwen2Config preset"):
        qwen2.Qwen2Config.preset("qwen9")


def test_presets_have_the_published_sizes():
    n = {k: qwen2.Qwen2Config.preset(k).num_params() for k in ("qwen2_5_0_5b", "qwen2_5_1_5b", "qwen2_5_7b")}
    assert round(n["qwen2_5_0_5b"] / 1e9, 2) == 0.49
    assert round(n["qwen2_5_1_5b"] / 1e9, 2) == 1.54
    assert round(n["qwen2_5_7b"] / 1e9, 2) == 7.62
    abstract = nnx.eval_shape(lambda: qwen2.Qwen2(qwen2.Qwen2Config.preset("qwen2_5_1_5b"), rngs=nnx.Rngs(0)))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert total == n["qwen2_5_1_5b"]
