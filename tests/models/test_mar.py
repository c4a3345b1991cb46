"""MAR encoder/decoder, masking and the release key table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx

from unipic_jax.convert import tables
from unipic_jax.convert.hf import DictSource, load_state, torch_tensors
from unipic_jax.convert.mapping import KeyMap
from unipic_jax.models import mar as M

CFG = M.MARConfig.preset("tiny")  # width 32, 4 heads, buffer 4, 4x4 grid, 4 latent channels


@pytest.fixture(scope="module")
def model():
    return M.MAR(CFG, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("h,w", [(4, 4), (2, 3), (6, 8)])
def test_position_tables_resize_like_torch_bilinear(model, h, w):
    table = np.asarray(model.encoder_pos_embed[...])[0]
    ref = torch.nn.functional.interpolate(
        torch.tensor(table[4:].reshape(1, 4, 4, -1)).permute(0, 3, 1, 2), size=(h, w), mode="bilinear"
    ).permute(0, 2, 3, 1).reshape(h * w, -1).numpy()
    got = np.asarray(model._pos(model.encoder_pos_embed, h, w, buffer=True))
    np.testing.assert_array_equal(got[:4], table[:4])  # the buffer part is never resized
    np.testing.assert_allclose(got[4:], ref, atol=1e-6)


def test_masked_tokens_are_invisible_to_the_encoder(model):
    rs = np.random.RandomState(0)
    tokens = jnp.asarray(rs.randn(2, 16, 4), jnp.float32)
    mask = M.mask_by_order(M.random_orders(jax.random.key(1), 2, 16), 11)
    out = model.encode(tokens, mask)
    assert out.shape == (2, 4 + 16, 32)
    # dropping the masked tokens (as MAR does) gives the same visible features
    for b in range(2):
        vis = np.flatnonzero(np.asarray(mask[b]) == 0)
        x = model.z_proj(tokens[b:b + 1])
        x = jnp.concatenate([jnp.broadcast_to(model.fake_latent[...][None], (1, 4, 32)), x], 1)
        x = model.z_proj_ln(x + model._pos(model.encoder_pos_embed, 4, 4, True))
        keep = np.concatenate([np.arange(4), 4 + vis])
        x = x[:, keep]
        for block in model.encoder_blocks:
            x = block(x, None)
        np.testing.assert_allclose(out[b, keep], model.encoder_norm(x)[0], atol=1e-5)
        assert np.all(np.asarray(out[b, 4 + np.flatnonzero(np.asarray(mask[b]))]) == 0)
    # changing a masked token changes nothing
    other = tokens.at[0, int(np.flatnonzero(np.asarray(mask[0]))[0])].add(5.0)
    np.testing.assert_allclose(model.encode(other, mask), out, atol=1e-6)


@pytest.mark.parametrize("h,w", [(4, 4), (3, 5)])
def test_encode_on_the_kept_tokens_only(model, h, w):
    L = h * w
    tokens = jnp.asarray(np.random.RandomState(1).randn(2, L, 4), jnp.float32)
    mask = M.mask_by_order(M.random_orders(jax.random.key(2), 2, L), L - 4)
    full = model.encode(tokens, mask, image_shape=(h, w))
    keep = M.visible_first(mask, 6)  # the 4 visible tokens and 2 masked fillers
    out = model.encode(tokens, mask, image_shape=(h, w), keep=keep)
    assert out.shape == (2, 4 + 6, 32)
    np.testing.assert_allclose(out[:, :4], full[:, :4], atol=1e-5)  # the buffer
    np.testing.assert_allclose(out[:, 4:], np.take_along_axis(np.asarray(full[:, 4:]), np.asarray(keep)[..., None], 1),
                               atol=1e-5)
    assert np.all(np.asarray(out[:, -2:]) == 0)  # the fillers stay masked
    with pytest.raises(ValueError, match="keep must be"):
        model.encode(tokens, None, image_shape=(h, w), keep=keep)


def test_decoder_fills_masked_slots_and_uses_x_con_for_editing(model):
    rs = np.random.RandomState(1)
    tokens = jnp.asarray(rs.randn(1, 12, 4), jnp.float32)
    mask = jnp.asarray([[1.0] * 6 + [0.0] * 6])
    enc = model.encode(tokens, mask, image_shape=(3, 4))
    z = model.decode(enc, mask, image_shape=(3, 4))
    assert z.shape == (1, 12, 32) and np.isfinite(z).all()
    src = model.encode(jnp.asarray(rs.randn(1, 12, 4), jnp.float32), None, image_shape=(3, 4))
    z_edit = model.decode(enc, mask, image_shape=(3, 4), x_con=src)
    assert not np.allclose(z, z_edit)
    with pytest.raises(ValueError, match="grid"):
        model.encode(tokens, mask, image_shape=(4, 4))


def test_mask_ratio_is_the_truncated_normal():
    r = np.asarray(jax.vmap(M.sample_mask_ratio)(jax.random.split(jax.random.key(0), 20000)))
    assert r.min() >= 0.7 and r.max() <= 1.0
    ref = scipy.stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(r, q) - ref.ppf(q)) < 0.01
    m = M.training_mask(jax.random.key(3), 5, 64)
    counts = np.asarray(m.sum(1))
    assert len(set(counts.tolist())) == 1 and 0.7 * 64 <= counts[0] <= 64  # one ratio per batch


def test_wide_mask_ratios_cover_every_share():
    """``mask_ratio_std`` large on ``[0, 1]``: near-uniform ratios, so training sees the dense
    contexts of late sampling steps; out-of-range settings are refused."""
    r = np.asarray(jax.vmap(lambda k: M.sample_mask_ratio(k, 0.0, 100.0))(jax.random.split(jax.random.key(1), 20000)))
    assert r.min() >= 0.0 and r.max() <= 1.0
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(r, q) - q) < 0.02
    m = jax.vmap(lambda k: M.training_mask(k, 1, 64, 0.0, 100.0))(jax.random.split(jax.random.key(2), 500))
    assert int(np.asarray(m).sum(-1).min()) <= 8  # mostly visible masks occur
    for bad in (dict(mask_ratio_min=1.0), dict(mask_ratio_min=-0.1), dict(mask_ratio_std=0.0)):
        with pytest.raises(ValueError, match="training mask ratios"):
            M.MARConfig.preset("tiny").replace(**bad)


def test_sampling_schedule():
    masked, clamped = M.mask_schedule(16, 4)
    seq = masked[1:].tolist()
    assert seq == [14, 11, 6, 0]  # floor(16 cos(pi/2 k/4)) for k = 1..3, then all sampled
    assert int(M.mask_schedule(16, 64)[0][1]) == 15  # always at least one token per step
    masked, clamped = M.mask_schedule(16, 64)
    assert int(masked[63]) == 1 and int(clamped[62]) == 1  # at least one stays masked until the last step


def test_release_key_round_trip(model):
    km = KeyMap(tables.MAR_TORCH_RULES, tables.MAR_TORCH_IGNORED)
    state = dict(torch_tensors(model, km))
    assert state["encoder_blocks.1.attn.qkv.weight"].shape == (96, 32)
    assert state["encoder_pos_embed_learned"].shape == (1, 20, 32)
    assert state["mask_token"].shape == (1, 1, 32) and state["fake_latent"].shape == (1, 32)
    state["class_emb.weight"] = np.zeros((10, 32), np.float32)  # in the release, unused: ignored
    abstract = nnx.eval_shape(lambda: M.MAR(CFG, rngs=nnx.Rngs(0)))
    back = load_state(abstract, DictSource(state), km, progress=False)
    again = dict(torch_tensors(back, km))
    for k, v in again.items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    x = jnp.asarray(np.random.RandomState(2).randn(1, 16, 4), jnp.float32)
    np.testing.assert_array_equal(back.encode(x), model.encode(x))


def test_init_follows_mar():
    """Linear layers xavier_uniform with zero bias (MAR's _init_weights); the 2-D sin-cos start
    of the position tables has dot products that depend only on the offset between cells."""
    m = M.MAR(CFG, rngs=nnx.Rngs(3))
    for dense, fan in ((m.z_proj, 4 + 32), (m.encoder_blocks[0].qkv, 32 + 3 * 32), (m.decoder_blocks[1].fc2, 128 + 32)):
        k = np.asarray(dense.kernel[...])
        bound = np.sqrt(6.0 / fan)
        assert np.abs(k).max() <= bound and np.abs(k).max() > 0.8 * bound
        assert np.all(np.asarray(dense.bias[...]) == 0)
    table = M.sincos_2d(5, 16).reshape(5, 5, 16)
    gram = np.einsum("abc,dec->abde", table, table)
    for dr, dc in ((0, 1), (1, 0), (2, 3), (1, -2)):
        vals = [gram[r, c, r + dr, c + dc] for r in range(5) for c in range(5) if 0 <= r + dr < 5 and 0 <= c + dc < 5]
        np.testing.assert_allclose(vals, vals[0], rtol=1e-5, atol=1e-6)
    assert gram[2, 2, 2, 2] > gram[2, 2, 2, 3] > gram[2, 2, 2, 4]  # nearer cells are more alike
    sin = M.MAR(CFG.replace(pos_init="sincos"), rngs=nnx.Rngs(3))
    np.testing.assert_allclose(np.asarray(sin.decoder_pos_embed[...])[0, 4:], M.sincos_2d(4, 32), atol=1e-7)
    np.testing.assert_allclose(np.asarray(sin.diffusion_pos_embed[...])[0], M.sincos_2d(4, 32), atol=1e-7)
    assert 0 < np.asarray(sin.encoder_pos_embed[...])[0, :4].std() < 0.05  # the buffer rows stay N(0, 0.02²)
    with pytest.raises(ValueError, match="pos_init"):
        CFG.replace(pos_init="rope")


def test_distance_bias_is_2d_alibi():
    index = jnp.asarray([[-1, 0, 1, 5, 11]])  # a buffer slot, then (0,0) (0,1) (1,1) (2,3) on a 4-wide grid
    bias = np.asarray(M.distance_bias(index, 4, 3))
    assert bias.shape == (1, 3, 5, 5)
    pos = np.array([[0, 0], [0, 1], [1, 1], [2, 3]], np.float32)
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    for h in range(3):
        np.testing.assert_allclose(bias[0, h, 1:, 1:], -(2.0 ** -h) * dist, rtol=1e-6)
        assert np.all(bias[0, h, 0] == 0) and np.all(bias[0, h, :, 0] == 0)  # the buffer is near everything
    with pytest.raises(ValueError, match="attn_bias='relative'"):
        M.MARConfig(attn_bias="relative")


@pytest.mark.parametrize("h,w", [(4, 4), (3, 5)])
def test_alibi_keeps_masking_and_the_kept_token_path(model, h, w):
    alibi = M.MAR(CFG.replace(attn_bias="alibi"), rngs=nnx.Rngs(0))
    nnx.update(alibi, nnx.state(model))  # the same weights: only the bias differs
    L = h * w
    tokens = jnp.asarray(np.random.RandomState(5).randn(2, L, 4), jnp.float32)
    mask = M.mask_by_order(M.random_orders(jax.random.key(6), 2, L), L - 4)
    full = alibi.encode(tokens, mask, image_shape=(h, w))
    assert not np.allclose(full, model.encode(tokens, mask, image_shape=(h, w)), atol=1e-3)
    keep = M.visible_first(mask, 6)
    out = alibi.encode(tokens, mask, image_shape=(h, w), keep=keep)
    np.testing.assert_allclose(out[:, 4:], np.take_along_axis(np.asarray(full[:, 4:]), np.asarray(keep)[..., None], 1),
                               atol=1e-5)
    other = tokens.at[0, int(np.flatnonzero(np.asarray(mask[0]))[0])].add(5.0)  # a masked token
    np.testing.assert_allclose(alibi.encode(other, mask, image_shape=(h, w)), full, atol=1e-6)
    z = alibi.decode(full, mask, image_shape=(h, w))
    assert not np.allclose(z, model.decode(full, mask, image_shape=(h, w)), atol=1e-3)
