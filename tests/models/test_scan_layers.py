"""Stacked, scanned blocks (``scan_layers=True``) against the unrolled models built from the same seed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import rand_ids
from unipic_jax import sharding
from unipic_jax.models import diffloss as DL
from unipic_jax.models import mar as M
from unipic_jax.models import qwen2, siglip2


def both(cls, cfg, seed=0):
    return cls(cfg, rngs=nnx.Rngs(seed)), cls(cfg.replace(scan_layers=True), rngs=nnx.Rngs(seed))


def close(a, b, tol=1e-6, rtol=0.0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=rtol)


def test_stacked_parameters_are_the_unrolled_ones_with_a_layers_axis():
    flat, stacked = both(qwen2.Qwen2, qwen2.Qwen2Config.preset("tiny"))
    k = stacked.layers.attn.q_proj.kernel
    assert k.shape == (2, 4, 16, 64) and k.get_metadata()["out_sharding"] == ("layers", "heads", "head_dim", "embed")
    for i in range(2):
        np.testing.assert_array_equal(k[...][i], flat.layers[i].attn.q_proj.kernel[...])
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    assert sharding.variable_sharding(k, mesh).spec == jax.sharding.PartitionSpec(None, "tensor", None, "fsdp")


@pytest.mark.parametrize("remat", ["none", "full"])
def test_qwen2_forward_cache_decode_and_gradients(remat):
    flat, stacked = both(qwen2.Qwen2, qwen2.Qwen2Config.preset("tiny", remat=remat))
    ids = jnp.asarray(rand_ids((2, 7), 1000))
    mask = jnp.asarray(np.arange(7)[None] < np.array([[7], [4]]))
    close(stacked(ids, mask), flat(ids, mask), 1e-5)
    np.testing.assert_array_equal(stacked.generate(ids, mask, max_new_tokens=4),
                                  flat.generate(ids, mask, max_new_tokens=4))
    # the cached path: a prefill, then one token written at slot 7
    outs = []
    for m in (flat, stacked):
        cache = qwen2.KVCache.zeros(m.config, 2, 9)
        _, cache = m.hidden_states(ids, mask, cache=cache, write_index=0)
        h, cache = m.hidden_states(ids[:, :1], jnp.ones((2, 1), bool), position_ids=jnp.full((2, 1), 7),
                                   cache=cache, write_index=7)
        outs.append((h, jnp.stack(cache.k)))
    close(outs[1][0], outs[0][0], 1e-5)
    close(outs[1][1], outs[0][1], 1e-6)

    def loss(m):
        return jnp.mean(m.logits(m.hidden_states(ids, mask)[0]) ** 2)

    g_flat, g_stacked = nnx.grad(loss)(flat), nnx.grad(loss)(stacked)
    for i in range(2):
        close(g_stacked["layers"]["mlp"]["down_proj"]["kernel"][...][i],
              g_flat["layers"][i]["mlp"]["down_proj"]["kernel"][...], 1e-7)
    close(g_stacked["embedder"]["embedding"][...], g_flat["embedder"]["embedding"][...], 1e-7)


def test_siglip_with_padding_mask():
    flat, stacked = both(siglip2.SiglipVision, siglip2.SiglipConfig.preset("tiny", remat=True))
    pv = jnp.asarray(np.random.RandomState(0).randn(2, 12, 48), jnp.float32)
    mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [6]]))
    shapes = jnp.asarray([[3, 4], [2, 3]])
    for a, b in zip(stacked(pv, mask, shapes), flat(pv, mask, shapes)):
        close(a, b, 1e-5)


def test_mar_with_alibi_bias_and_mask():
    flat, stacked = both(M.MAR, M.MARConfig.preset("tiny", attn_bias="alibi", remat=True))
    tokens = jnp.asarray(np.random.RandomState(1).randn(2, 16, 4), jnp.float32)
    mask = M.mask_by_order(M.random_orders(jax.random.key(0), 2, 16), 9)
    enc_s, enc_f = stacked.encode(tokens, mask), flat.encode(tokens, mask)
    close(enc_s, enc_f, 1e-5)
    close(stacked.decode(enc_s, mask), flat.decode(enc_f, mask), 1e-5)

    def loss(m):
        return jnp.sum(m.decode(m.encode(tokens, mask), mask) ** 2)

    g_flat, g_stacked = nnx.grad(loss)(flat), nnx.grad(loss)(stacked)
    close(g_stacked["encoder_blocks"]["qkv"]["kernel"][...][1], g_flat["encoder_blocks"][1]["qkv"]["kernel"][...], 1e-5, 1e-3)


def test_diffusion_head():
    cfg = DL.DiffLossConfig.preset("tiny")
    flat, stacked = both(DL.SimpleMLPAdaLN, cfg)
    for m in (flat, stacked):  # MAR's init zeroes the adaLN and output layers: give them weights
        for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
            v.set_value(v.get_value() + 0.1 * jnp.asarray(np.random.RandomState(len(p)).randn(*v.shape), jnp.float32))
    stacked_state = nnx.state(stacked, nnx.Param)
    flat_res = nnx.state(flat, nnx.Param)["res_blocks"]
    stacked_state["res_blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[flat_res[i] for i in range(cfg.depth)])
    nnx.update(stacked, stacked_state)
    for name in ("time_embed", "cond_embed", "input_proj", "final_layer"):
        nnx.update(getattr(stacked, name), nnx.state(getattr(flat, name)))
    rs = np.random.RandomState(2)
    x, c = jnp.asarray(rs.randn(6, 4), jnp.float32), jnp.asarray(rs.randn(6, 32), jnp.float32)
    t = jnp.asarray([0, 5, 999, 3, 500, 7])
    close(stacked(x, t, c), flat(x, t, c), 1e-5)
    assert float(jnp.abs(flat(x, t, c)).max()) > 0.1  # the blocks do something
