"""The UniPic composite on the tiny preset: how text, visible tokens and the buffer flow."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import randomize

from unipic_jax.models import mar as M
from unipic_jax.models import unipic as U

CFG = U.UniPicConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    return randomize(U.UniPic(CFG, rngs=nnx.Rngs(0)))  # the zero-initialised head layers take part


def batch(seed=0, B=2, T=6):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, 900, (B, T)).astype(np.int32)
    mask_t = np.ones((B, T), bool)
    if B > 1:
        mask_t[-1, 4:] = False  # the last row is right-padded
    latents = jnp.asarray(rs.randn(B, 4, 4, 4), jnp.float32)
    return jnp.asarray(ids), jnp.asarray(mask_t), latents


def test_condition_ignores_masked_tokens_and_padding(model):
    ids, tmask, lat = batch()
    mask = M.mask_by_order(M.random_orders(jax.random.key(0), 2, 16), 10)
    z = model.condition(ids, tmask, lat, mask)
    assert z.shape == (2, 16, CFG.mar.width) and np.isfinite(z).all()
    # masked latents are unseen by the encoder and by the LLM
    noisy = jnp.where(mask[..., None].reshape(2, 4, 4, 1) > 0, lat + 3.0, lat)
    np.testing.assert_allclose(model.condition(ids, tmask, noisy, mask), z, atol=1e-5)
    # more right padding on the text changes nothing (positions are cumsum(mask) - 1)
    pad_ids = jnp.concatenate([ids, jnp.full((2, 3), 7, jnp.int32)], 1)
    pad_mask = jnp.concatenate([tmask, jnp.zeros((2, 3), bool)], 1)
    np.testing.assert_allclose(model.condition(pad_ids, pad_mask, lat, mask), z, atol=1e-5)
    # the prompt matters
    other = model.condition(ids.at[0, 0].set(5), tmask, lat, mask)
    assert not np.allclose(other[0], z[0]) and np.allclose(other[1], z[1], atol=1e-5)


def test_encode_image_layout(model):
    _, _, lat = batch(1)
    x_enc, z_enc = model.encode_image(lat)
    S = CFG.mar.buffer_size
    assert x_enc.shape == (2, S + 16, CFG.mar.width) and z_enc.shape == (2, 16 + S, CFG.llm.hidden_size)
    np.testing.assert_allclose(z_enc[:, -S:], model.proj_in(x_enc[:, :S]), atol=1e-6)  # buffer last for the LLM
    np.testing.assert_allclose(z_enc[:, :16], model.proj_in(x_enc[:, S:]), atol=1e-6)


def test_understand_logits_writes_the_image_at_its_slots(model):
    _, _, lat = batch(2, B=1)
    S = CFG.mar.buffer_size
    ids = jnp.asarray([[5, 6] + [CFG.image_token_id] * (16 + S) + [8, 9, 10]], jnp.int32)
    logits = model.understand_logits(ids, jnp.ones_like(ids, bool), lat)
    assert logits.shape == (1, ids.shape[1], CFG.llm.vocab_size)
    _, z_enc = model.encode_image(lat)
    embeds = model.llm.embedder(ids).at[:, 2:2 + 16 + S].set(z_enc)
    np.testing.assert_allclose(logits, model.llm(inputs_embeds=embeds), atol=1e-5)


def test_t2i_loss_decreases_on_a_fixed_batch():
    model = U.UniPic(CFG, rngs=nnx.Rngs(1))
    ids, tmask, lat = batch(3)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, key):
        loss, grads = nnx.value_and_grad(lambda m: m.t2i_loss(ids, tmask, lat, key))(model)
        opt.update(model, grads)
        return loss

    keys = jax.random.split(jax.random.key(0), 6)
    before = np.mean([float(model.t2i_loss(ids, tmask, lat, k)) for k in keys])
    for i in range(25):
        step(model, opt, jax.random.key(100 + i))
    after = np.mean([float(model.t2i_loss(ids, tmask, lat, k)) for k in keys])
    assert after < 0.9 * before, (before, after)


def test_config_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="does not fit"):
        U.UniPicConfig(llm=CFG.llm, mar=CFG.mar.replace(width=48), diffloss=CFG.diffloss, vae=CFG.vae)


def test_prompt_cache_gives_the_same_condition(model):
    ids, tmask, lat = batch(4)
    mask = M.mask_by_order(M.random_orders(jax.random.key(1), 2, 16), 7)
    cache = model.prefill(model.embed_prompt(ids), tmask, (4, 4))
    np.testing.assert_allclose(model.condition(latents=lat, mask=mask, cache=cache),
                               model.condition(ids, tmask, lat, mask), atol=1e-5)
    with pytest.raises(ValueError, match="too few"):
        model.condition(latents=jnp.zeros((2, 8, 8, 4)), mask=jnp.zeros((2, 64)), cache=cache)


def test_training_runs_only_the_visible_tokens_with_the_same_result(model):
    ids, tmask, lat = batch(6)
    K = M.max_visible(16, CFG.mar.mask_ratio_min)
    assert K < 16
    mask = M.mask_by_order(M.random_orders(jax.random.key(2), 2, 16), 16 - K + 1)  # one filler slot
    keep = M.visible_first(mask, K)
    assert (np.asarray(mask)[np.arange(2)[:, None], np.asarray(keep)][:, :-1] == 0).all()
    assert (np.diff(np.asarray(keep)[:, :-1], axis=1) > 0).all()  # raster order
    full = model.condition(ids, tmask, lat, mask)
    np.testing.assert_allclose(model.condition(ids, tmask, lat, mask, keep=keep), full, atol=1e-5)
    # the loss passes keep; by hand without it, with the same mask and noise
    key = jax.random.key(4)
    k_mask, k_loss = jax.random.split(key)
    mk = M.training_mask(k_mask, 2, 16, CFG.mar.mask_ratio_min)
    z = model.condition(ids, tmask, lat, mk)
    want = model.diffloss.loss(lat.reshape(32, 4), z.reshape(32, -1), mk.reshape(32), k_loss)
    np.testing.assert_allclose(model.t2i_loss(ids, tmask, lat, key), want, rtol=1e-5)
    with pytest.raises(ValueError, match="cached sampling path"):
        model.condition(latents=lat, mask=mask, cache=model.prefill(model.embed_prompt(ids), tmask, (4, 4)), keep=keep)


@pytest.mark.parametrize("length,ratio", [(16, 0.7), (64, 0.7), (144, 0.7), (100, 0.7), (256, 0.5)])
def test_max_visible_bounds_every_training_mask(length, ratio):
    masks = jax.vmap(lambda k: M.training_mask(k, 1, length, ratio))(jax.random.split(jax.random.key(0), 2000))
    most = int((1 - np.asarray(masks)).sum(-1).max())
    assert most <= M.max_visible(length, ratio) <= most + 1


def edit_batch(seed=5):
    rs = np.random.RandomState(seed)
    S = CFG.mar.buffer_size
    ids = np.concatenate([rs.randint(3, 900, (2, 2)), np.full((2, 16 + S), CFG.image_token_id),
                          rs.randint(3, 900, (2, 4))], 1).astype(np.int32)
    return (jnp.asarray(ids), jnp.ones(ids.shape, bool), jnp.asarray(rs.randn(2, 4, 4, 4), jnp.float32),
            jnp.asarray(rs.randn(2, 4, 4, 4), jnp.float32))


def test_edit_loss_sees_the_source_in_the_prompt_and_the_decoder(model):
    ids, tmask, src, tgt = edit_batch()
    key = jax.random.key(3)
    loss = model.edit_loss(ids, tmask, src, tgt, key)
    assert np.isfinite(loss)
    assert abs(float(model.edit_loss(ids, tmask, src * 2.0, tgt, key)) - float(loss)) > 1e-6
    # by hand: x_con into the decoder, z_enc at the <image> slots, the same mask and noise
    x_con, z_src = model.encode_image(src)
    embeds = model.embed_prompt(ids, z_src)
    k_mask, k_loss = jax.random.split(key)
    mask = M.training_mask(k_mask, 2, 16, CFG.mar.mask_ratio_min)
    z = model.condition(attention_mask=tmask, latents=tgt, mask=mask, x_con=x_con, inputs_embeds=embeds)
    want = model.diffloss.loss(tgt.reshape(32, 4), z.reshape(32, -1), mask.reshape(32), k_loss)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_visual_gradient_scale_reaches_the_image_path_only(model):
    _, _, lat = batch(6, B=1)
    S = CFG.mar.buffer_size
    ids = jnp.asarray([[5, 6] + [CFG.image_token_id] * (16 + S) + [8, 9, 10, 11]], jnp.int32)
    labels = jnp.full_like(ids, -100).at[0, -3:].set(ids[0, -3:])
    grads = {}
    for g in (1.0, 0.1):
        m = nnx.clone(model)
        m.config = CFG.replace(visual_grad_scale=g)
        grads[g] = nnx.grad(lambda m: m.understanding_loss(ids, jnp.ones_like(ids, bool), labels, lat))(m)
    for part, leaf in (("proj_in", "fc1"), ("mar", "z_proj")):
        full = 0.1 * grads[1.0][part][leaf]["kernel"][...]
        # f32 sums in another order: tolerance relative to the gradient's scale
        np.testing.assert_allclose(grads[0.1][part][leaf]["kernel"][...], full, rtol=1e-4,
                                   atol=1e-3 * np.abs(full).max())
    np.testing.assert_allclose(grads[0.1]["llm"]["final_norm"]["scale"][...],
                               grads[1.0]["llm"]["final_norm"]["scale"][...], rtol=1e-4, atol=1e-6)
    assert np.abs(grads[1.0]["proj_in"]["fc1"]["kernel"][...]).max() > 0


def test_siglip2_understanding_path():
    cfg = U.UniPicConfig.preset("tiny_siglip2")
    model = U.UniPic(cfg, rngs=nnx.Rngs(3))
    N = cfg.vision.num_patches
    rs = np.random.RandomState(0)
    pv = jnp.asarray(rs.randn(1, N, cfg.vision.patch_size ** 2 * 3), jnp.float32)
    pmask = jnp.ones((1, N), jnp.int32)
    shapes = jnp.asarray([[4, 4]], jnp.int32)
    ids = jnp.asarray([[5] + [cfg.image_token_id] * N + [7, 8]], jnp.int32)
    logits = model.understand_logits(ids, jnp.ones_like(ids, bool), pixel_values=pv, pixel_attention_mask=pmask,
                                     spatial_shapes=shapes)
    hidden, _ = model.siglip2(pv, pmask, shapes)
    embeds = model.llm.embedder(ids).at[:, 1:1 + N].set(model.siglip2_proj(hidden))
    np.testing.assert_allclose(logits, model.llm(inputs_embeds=embeds), atol=1e-5)
    with pytest.raises(ValueError, match="needs a vision config"):
        CFG.replace(understanding="siglip2")


@pytest.mark.parametrize("name", sorted(U.PRESETS))
def test_configs_survive_json(name):
    import dataclasses
    import json

    cfg = U.UniPicConfig.preset(name)
    assert U.UniPicConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    assert cfg.with_dtype("bfloat16").mar.dtype == "bfloat16"


def test_zero_init_proj_out_starts_as_plain_mar():
    """With ``zero_init_proj_out`` the LLM's residual into MAR is zero at initialisation: the
    conditions are the MAR decoder's alone, whatever the prompt; the default adds the LLM's."""
    model = U.UniPic(CFG.replace(zero_init_proj_out=True), rngs=nnx.Rngs(0))
    ids, tmask, lat = batch()
    mask = M.mask_by_order(M.random_orders(jax.random.key(2), 2, 16), 9)
    z = model.condition(ids, tmask, lat, mask)
    plain = model.mar.decode(model.mar.encode(lat.reshape(2, 16, 4), mask, (4, 4)), mask, (4, 4))
    np.testing.assert_allclose(z, plain, atol=1e-6)
    np.testing.assert_allclose(model.condition(ids[::-1], tmask, lat, mask), z, atol=1e-6)
    default = U.UniPic(CFG, rngs=nnx.Rngs(0))
    assert np.abs(np.asarray(default.condition(ids, tmask, lat, mask)) - np.asarray(plain)).max() > 1e-3
