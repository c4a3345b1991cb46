"""Sampling: the release's masking schedule, determinism, the CFG batch layout, editing,
understanding answers, PNG output, and a sharded model sampling what an unsharded one does."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import randomize
from PIL import Image

from unipic_jax import sample as S
from unipic_jax import sharding
from unipic_jax import tokenizer as tok_lib
from unipic_jax.models import unipic as U

CFG = U.UniPicConfig.preset("tiny")
GRID = (4, 4)


@pytest.fixture(scope="module")
def model():
    return randomize(U.UniPic(CFG, rngs=nnx.Rngs(0)))  # the zero-initialised head layers take part


def prompts(seed=0, B=2, T=7, cfg=True):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, 900, (2 * B if cfg else B, T)).astype(np.int32)
    mask = np.ones(ids.shape, bool)
    mask[0, 5:] = False  # right padding
    return ids, mask


def release_steps(L, num_iter, cfg, schedule, order):
    """The release's sampling bookkeeping, step by step, in torch: which tokens each step
    predicts and the CFG scale it uses (mask_by_order by scatter, then xor)."""
    bsz = 1
    mask = torch.ones(bsz, L)
    out = []
    for step in range(num_iter):
        mask_ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
        mask_len = torch.Tensor([np.floor(L * mask_ratio)])
        mask_len = torch.maximum(torch.Tensor([1]), torch.minimum(torch.sum(mask, dim=-1, keepdims=True) - 1, mask_len))
        nxt = torch.zeros(bsz, L).scatter(-1, order[:, : int(mask_len[0].long())], torch.ones(bsz, L)).bool()
        pred = mask.bool() if step >= num_iter - 1 else torch.logical_xor(mask.bool(), nxt)
        mask = nxt.float()
        scale = 1 + (cfg - 1) * (L - mask_len[0]) / L if schedule == "linear" else cfg
        out.append((set(torch.nonzero(pred[0]).flatten().tolist()), float(scale)))
    return out


@pytest.mark.parametrize("L,num_iter", [(16, 4), (16, 32), (37, 7), (256, 32), (1024, 64), (5, 1)])
@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_schedule_matches_the_release(L, num_iter, schedule):
    order = torch.randperm(L, generator=torch.Generator().manual_seed(L))[None]
    masked, clamped = S.mask_schedule(L, num_iter)
    scales = S.cfg_scales(3.0, schedule, L, clamped)
    assert masked[0] == L and masked[-1] == 0 and np.all(np.diff(masked) <= 0)
    o = order[0].tolist()
    for k, (want, scale) in enumerate(release_steps(L, num_iter, 3.0, schedule, order)):
        assert set(o[masked[k + 1]: masked[k]]) == want, k
        assert scales[k] == pytest.approx(scale, rel=1e-6)


def test_sampling_is_deterministic_and_shaped(model):
    ids, mask = prompts()
    a = S.sample_latents(model, ids, mask, grid=GRID, seed=3, num_iter=4)
    b = S.sample_latents(model, ids, mask, grid=GRID, seed=3, num_iter=4)
    c = S.sample_latents(model, ids, mask, grid=GRID, seed=4, num_iter=4)
    assert a.shape == (2, 4, 4, CFG.mar.token_dim) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # a non-square grid and no guidance
    d = S.sample_latents(model, ids[:2], mask[:2], grid=(2, 6), seed=0, num_iter=3, cfg=1.0)
    assert d.shape == (2, 2, 6, CFG.mar.token_dim) and np.isfinite(d).all()
    img = S.decode(model, d)
    assert img.shape == (2, 8, 24, 3) and img.dtype == np.uint8


def test_extra_prompt_padding_changes_nothing(model):
    """``text_to_image`` pads prompts to a multiple of ``PROMPT_MULTIPLE``: positions follow
    each row's own length, so padded columns must not change the sample."""
    ids, mask = prompts(2)
    pad = S.PROMPT_MULTIPLE - ids.shape[1] % S.PROMPT_MULTIPLE
    ids2 = np.concatenate([ids, np.full((ids.shape[0], pad), 1, np.int32)], 1)
    mask2 = np.concatenate([mask, np.zeros((ids.shape[0], pad), bool)], 1)
    a = S.sample_latents(model, ids, mask, grid=GRID, seed=5, num_iter=4)
    b = S.sample_latents(model, ids2, mask2, grid=GRID, seed=5, num_iter=4)
    ids3 = ids.copy()
    ids3[0, 1] += 1  # one prompt token changed: what a real difference looks like
    c = S.sample_latents(model, ids3, mask, grid=GRID, seed=5, num_iter=4)
    # the random model's latents reach |x| ~ 1e3; padding only reorders float sums
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)
    assert np.abs(a - b).max() < 1e-3 * np.abs(a[0] - c[0]).max()


def test_cfg_pairs_row_b_with_row_B_plus_b(model):
    ids, mask = prompts(1)
    same = np.concatenate([ids[:2], ids[:2]]), np.concatenate([mask[:2], mask[:2]])
    # unconditional rows equal to the conditional ones: the guidance scale cannot matter
    a = S.sample_latents(model, *same, grid=GRID, seed=0, num_iter=4, cfg=2.0)
    b = S.sample_latents(model, *same, grid=GRID, seed=0, num_iter=4, cfg=7.0, cfg_schedule="linear")
    np.testing.assert_allclose(a, b, atol=1e-5)
    # ... while swapping the two unconditional rows changes the result of both rows
    swapped = np.concatenate([ids[:2], ids[2:][::-1]]), np.concatenate([mask[:2], mask[2:][::-1]])
    c = S.sample_latents(model, *prompts(1), grid=GRID, seed=0, num_iter=4, cfg=2.0)
    d = S.sample_latents(model, *swapped, grid=GRID, seed=0, num_iter=4, cfg=2.0)
    assert not np.allclose(c[0], d[0]) and not np.allclose(c[1], d[1])


def test_editing_uses_the_source(model):
    slots = 16 + CFG.mar.buffer_size
    ids = np.concatenate([np.full((4, 2), 5), np.full((4, slots), CFG.image_token_id), np.full((4, 3), 9)], 1)
    ids[2:, -1] = 11  # a different unconditional instruction
    mask = np.ones(ids.shape, bool)
    src = np.random.RandomState(0).randn(2, 4, 4, 4).astype(np.float32)
    a = S.sample_latents(model, ids, mask, grid=GRID, seed=0, num_iter=3, source_latents=src)
    b = S.sample_latents(model, ids, mask, grid=GRID, seed=0, num_iter=3, source_latents=src[::-1])
    assert a.shape == (2, 4, 4, 4)
    assert not np.allclose(a[0], b[0])
    with pytest.raises(ValueError, match="source_latents"):
        S.sample_latents(model, ids, mask, grid=GRID, source_latents=src[:1])


def test_bad_inputs_are_named(model):
    ids, mask = prompts()
    with pytest.raises(ValueError, match="even number"):
        S.sample_latents(model, ids[:3], mask[:3], grid=GRID)
    with pytest.raises(ValueError, match="Token ids"):
        S.sample_latents(model, ids + 5000, mask, grid=GRID)
    with pytest.raises(ValueError, match="cfg_schedule"):
        S.sample_latents(model, ids, mask, grid=GRID, cfg_schedule="cosine")
    with pytest.raises(ValueError, match="num_iter"):
        S.sample_latents(model, ids, mask, grid=GRID, num_iter=0)


def test_mode_seeking_decoding_of_late_tokens(model):
    """``ddim_after``: the steps whose visible fraction is at least it decode with DDIM; the
    earlier steps' tokens stay those of the release's sampler bit for bit, the later ones
    change; off (or 1, which no step reaches) is the release's sampler; DDIM steps do not
    depend on ``temperature``; none of these settings recompiles the step."""
    ids, mask = prompts(3)
    L, K = GRID[0] * GRID[1], 6
    masked, _ = S.mask_schedule(L, K)
    which = S.ddim_steps(masked, 0.5)
    np.testing.assert_array_equal(which, (L - masked[:-1]) / L >= 0.5)
    assert which.any() and not which.all() and np.all(np.diff(which.astype(int)) >= 0)
    kw = dict(grid=GRID, seed=2, num_iter=K)
    base = np.asarray(S.sample_latents(model, ids, mask, **kw))
    compiled = S._step._cache_size()
    np.testing.assert_array_equal(S.sample_latents(model, ids, mask, ddim_after=1.0, **kw), base)
    late = np.asarray(S.sample_latents(model, ids, mask, ddim_after=0.5, ddim_xt_scale=0.5, **kw))
    same = np.all(late == base, axis=-1).reshape(late.shape[0], -1).sum(1)
    first = int(np.argmax(which))
    np.testing.assert_array_equal(same, L - masked[first])  # the tokens of the steps before it, and only them
    hot = S.sample_latents(model, ids, mask, ddim_after=0.5, ddim_xt_scale=0.5, temperature=3.0, **kw)
    late_only = ~np.all(late == base, axis=-1)
    assert not np.allclose(np.asarray(hot)[~late_only], late[~late_only])  # the DDPM steps feel the temperature
    allddim = [np.asarray(S.sample_latents(model, ids, mask, ddim_after=0.0, temperature=t, **kw)) for t in (1, 3)]
    np.testing.assert_array_equal(*allddim)  # ...the DDIM steps do not
    cold = S.sample_latents(model, ids, mask, xt_temperature=0.5, **kw)
    assert not np.allclose(cold, base)
    assert S._step._cache_size() == compiled
    for bad in (dict(ddim_after=1.5), dict(xt_temperature=-1.0), dict(ddim_xt_scale="big")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            S.sample_latents(model, ids, mask, **kw, **bad)


def test_sharded_sampling_equals_unsharded(model):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = randomize(sharding.create_sharded(lambda: U.UniPic(CFG, rngs=nnx.Rngs(0)), mesh))
    assert sharding.mesh_of(sharded) is mesh
    ids, mask = prompts(2)
    a = S.sample_latents(model, ids, mask, grid=GRID, seed=1, num_iter=4, cfg=2.5)
    b = S.sample_latents(sharded, ids, mask, grid=GRID, seed=1, num_iter=4, cfg=2.5)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)  # a random head gives latents in the hundreds
    np.testing.assert_allclose(S.decode(model, a).astype(int), S.decode(sharded, b).astype(int), atol=1)


# -- with the real Qwen tokenizer ------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_model_and_tok(qwen_tokenizer_dir):
    tok = tok_lib.load_tokenizer(qwen_tokenizer_dir)
    cfg = CFG.replace(llm=CFG.llm.replace(vocab_size=len(tok)), image_token_id=tok_lib.image_token_id(tok))
    return U.UniPic(cfg, rngs=nnx.Rngs(0)), tok


def test_text_to_image_edit_describe_and_png(qwen_model_and_tok, tmp_path):
    model, tok = qwen_model_and_tok
    imgs = S.text_to_image(model, tok, ["a red circle", "two blue squares"], size=16, num_iter=3, seed=0)
    assert imgs.shape == (2, 16, 16, 3) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(imgs, S.text_to_image(model, tok, ["a red circle", "two blue squares"], size=16,
                                                        num_iter=3, seed=0))
    paths = S.save_png(imgs, [tmp_path / "a.png", tmp_path / "sub" / "b.png"])
    np.testing.assert_array_equal(np.asarray(Image.open(paths[1])), imgs[1])
    edited = S.edit(model, tok, [imgs[0]], ["make it green"], size=(16, 24), num_iter=2)
    assert edited.shape == (1, 16, 24, 3)
    answers = S.describe(model, tok, [imgs[0], paths[1]], ["What is it?", "Colour?"], size=16, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="multiples"):
        S.text_to_image(model, tok, ["x"], size=18)


def test_describe_through_siglip2(qwen_model_and_tok):
    _, tok = qwen_model_and_tok
    base = U.UniPicConfig.preset("tiny_siglip2")
    cfg = base.replace(llm=base.llm.replace(vocab_size=len(tok)), image_token_id=tok_lib.image_token_id(tok))
    model = U.UniPic(cfg, rngs=nnx.Rngs(1))
    img = np.random.RandomState(0).randint(0, 255, (20, 28, 3), np.uint8)
    new = S.describe(model, tok, [img], ["What?"], max_new_tokens=3)
    assert len(new) == 1 and isinstance(new[0], str)
    # the MAR path does not take pixel values, the SigLIP2 path does not take latents
    with pytest.raises(ValueError, match="pixel_values"):
        model.understand_logits(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool), jnp.zeros((1, 4, 4, 4)))
