"""GRPO: rollouts are the sampler, recomputed log-probabilities reproduce its draws, the first
ratio is 1 and the KL 0, the objective's gradients, and a toy run that raises its reward."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import randomize

from unipic_jax import sample as S
from unipic_jax.data import shapes as W
from unipic_jax.data import shapes_tokenizer
from unipic_jax.models import diffusion
from unipic_jax.models import unipic as U
from unipic_jax.rl import grpo, logprob, loop, rollout

GRID = (4, 4)
CASES = [(3.0, 0.7), (1.0, 1.3)]  # (cfg, temperature): guided and unguided, temperature != 1


@pytest.fixture(scope="module")
def model():
    return randomize(U.UniPic(U.UniPicConfig.preset("tiny"), rngs=nnx.Rngs(0)))


def prompts(guided, B=4, T=7, image_slots=0):
    ids = np.random.RandomState(1).randint(3, 900, (2 * B if guided else B, T)).astype(np.int32)
    if image_slots:  # editing: the source image's L + S slots after the first three tokens
        ids = np.concatenate([ids[:, :3], np.full((len(ids), image_slots), 1000, np.int32), ids[:, 3:]], axis=1)
    mask = np.ones(ids.shape, bool)
    mask[0, -2:] = False
    return ids, mask


def plan_for(model, num_iter=6, iterations=3, steps=5, seed=0):
    S_ = model.diffloss.sample_schedule.num_steps
    return rollout.make_plan(np.random.default_rng(seed), num_iter, S_, iterations, steps)


def do_rollout(model, cfg, temperature, edit=False, **kw):
    ids, mask = prompts(cfg != 1.0, image_slots=20 if edit else 0)
    if edit:
        kw["source_latents"] = np.random.RandomState(2).randn(4, *GRID, 4).astype(np.float32)
    return rollout.rollout(model, ids, mask, plan_for(model), grid=GRID, seed=3, num_iter=6, cfg=cfg,
                           temperature=temperature, **kw)


@pytest.mark.parametrize("cfg,temperature", CASES)
def test_rollout_samples_what_the_sampler_samples(model, cfg, temperature):
    ids, mask = prompts(cfg != 1.0)
    ref = S.sample_latents(model, ids, mask, grid=GRID, seed=3, num_iter=6, cfg=cfg, temperature=temperature)
    latents, batch = do_rollout(model, cfg, temperature)
    np.testing.assert_array_equal(np.asarray(latents), np.asarray(ref))
    assert batch["t"].min() >= 1  # the noiseless last step is never recorded
    assert batch["valid"].sum() > 0


@pytest.mark.parametrize("cfg,temperature,edit", [(*c, False) for c in CASES] + [(3.0, 0.85, True)])
def test_recomputed_log_probs_reproduce_the_draws(model, cfg, temperature, edit):
    """Text-to-image and editing: under the rollout's parameters, the recomputed mean and the recorded σ and noise redraw
    each recorded x_prev to float32 rounding, and the log-density is the Gaussian's (float64);
    a policy that drops the CFG combination (MAR-GRPO's conditional-only mean) does not redraw."""
    _, batch = do_rollout(model, cfg, temperature, edit)
    assert ("source" in batch) == edit
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    f = grpo.make_log_probs(graphdef, rest, GRID)
    logp, mean = f(params, batch)
    valid = np.broadcast_to(np.asarray(batch["valid"])[:, None], logp.shape)
    sigma, x = np.asarray(batch["sigma"], np.float64), np.asarray(batch["x_prev"], np.float64)

    def redraw_error(mean):  # |μ + σ·noise − x_prev|, relative to the numbers' size (float32 rounding)
        mean = np.asarray(mean, np.float64)
        return (np.abs(mean + sigma * np.asarray(batch["noise"]) - x) / (1 + np.abs(x) + np.abs(mean)))[valid]

    assert redraw_error(mean).max() < 2e-5, redraw_error(mean).max()
    # the same log-density, independently in float64
    ref = -0.5 * np.sum((x - np.asarray(mean, np.float64)) ** 2 / sigma**2 + np.log(2 * np.pi * sigma**2), axis=-1)
    np.testing.assert_allclose(np.asarray(logp)[valid], ref[valid], rtol=1e-5, atol=1e-5)
    if cfg != 1.0:
        _, wrong = f(params, {**batch, "scales": jnp.ones_like(batch["scales"])})
        assert redraw_error(wrong).max() > 0.1


def test_rebuilt_token_inputs_are_what_the_rollout_fed(model, monkeypatch):
    fed = {}
    step = S._step

    def spy(graphdef, state, cache, x_con, tokens, orders, k, masked, *args, **kw):
        fed[int(k)] = (np.asarray(tokens), np.asarray(jnp.argsort(orders, axis=1) < masked[k]))
        return step(graphdef, state, cache, x_con, tokens, orders, k, masked, *args, **kw)

    monkeypatch.setattr(S, "_step", spy)
    _, batch = do_rollout(model, 3.0, 1.0)
    its = plan_for(model).iterations
    for j, k in enumerate(its):
        tokens, mask = logprob.step_inputs(batch, j, guided=True)
        np.testing.assert_array_equal(np.asarray(tokens), fed[int(k)][0])
        np.testing.assert_array_equal(np.asarray(mask).astype(bool), fed[int(k)][1])


def make_loop(model, cfg=3.0, temperature=1.0, lr=0.0, updates=2, reward="redness", kl_weight=0.01, P=2, G=4,
              **kw):
    def source(i):
        ex = [W.t2i_example(P * i + j, "train") for j in range(P)]
        return [e["prompt"] for e in ex], [e["metadata"] for e in ex]

    c = loop.GRPOConfig(group_size=G, prompts=P, size=(16, 16), num_iter=4, cfg=cfg, temperature=temperature,
                        train_iterations=kw.pop("train_iterations", 2), train_steps=kw.pop("train_steps", 4),
                        kl_weight=kl_weight, rewards={reward: 1.0}, updates_per_batch=updates,
                        sampling_steps=kw.pop("sampling_steps", None))
    return loop.GRPOLoop(model, shapes_tokenizer.build(), c, source, lr=lr, steps=50,
                         trainable=("mar", "diffloss", "proj_out"), **kw)


@pytest.mark.parametrize("cfg,temperature", CASES)
def test_first_ratio_is_one_and_the_kl_zero(model, cfg, temperature):
    """With the parameters unchanged (lr 0), every ratio of every update of a batch is 1 to 1e-6
    and the KL to the reference (the same parameters) is 0."""
    lp = make_loop(model, cfg, temperature)
    batch, images, _, _ = lp.rollout(0)
    _, ref_mean = lp._log_probs(lp.reference, batch)
    adv = jnp.asarray(np.linspace(-1, 1, len(images)), jnp.float32)
    old = jnp.zeros_like(batch["logp"])
    for u in range(3):
        lp.params, lp.opt_state, before, m = lp._update(lp.params, lp.opt_state, batch, old, ref_mean, adv,
                                                        jnp.asarray(u == 0))
        old = before if u == 0 else old
        assert abs(float(m["ratio_max"]) - 1) < 1e-6 and abs(float(m["ratio_min"]) - 1) < 1e-6, (u, m)
        assert float(m["kl"]) < 1e-8 and float(m["clip_fraction"]) == 0.0, (u, m)


def test_group_advantages():
    r = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 3.0])
    a = grpo.group_advantages(r, 4)
    np.testing.assert_array_equal(a[:4], 0.0)  # a group whose rewards are all equal
    g = r[4:]
    np.testing.assert_allclose(a[4:], (g - g.mean()) / (g.std() + 1e-4), rtol=1e-6)
    with pytest.raises(ValueError, match="group_size=3 must divide"):
        grpo.group_advantages(r, 3)


def test_clipped_objective_gradients():
    new = jnp.log(jnp.array([1.0, 1.5, 0.5, 1.1, 0.9]))[None, None, :, None]
    old = jnp.zeros_like(new)
    valid = jnp.ones_like(new, bool)
    grad = lambda adv: jax.grad(lambda n: grpo.clipped_objective(n, old, adv, valid, 0.2)[0])(new)  # noqa: E731
    g = np.asarray(grad(jnp.ones(5))).ravel()
    # positive advantage: the ratio 1.5 is clipped (no gradient); 0.5 is not (min picks the unclipped)
    assert g[1] == 0.0 and g[0] < 0 and g[2] < 0 and g[3] < 0 and g[4] < 0
    g = np.asarray(grad(-jnp.ones(5))).ravel()
    assert g[2] == 0.0 and g[1] > 0  # negative advantage: 0.5 is clipped, 1.5 is not
    np.testing.assert_array_equal(np.asarray(grad(jnp.zeros(5))), 0.0)  # zero advantages: zero gradient
    _, m = grpo.clipped_objective(new, old, jnp.ones(5), valid, 0.2)
    assert float(m["clip_fraction"]) == pytest.approx(0.4)


def test_log_density_matches_numpy_float64():
    rs = np.random.RandomState(0)
    x, mean, log_var = (rs.randn(6, 4).astype(np.float32) for _ in range(3))
    got = np.asarray(diffusion.gaussian_log_prob(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(log_var), 0.7))
    var = np.exp(log_var.astype(np.float64)) * 0.49
    ref = (-0.5 * ((x - mean.astype(np.float64)) ** 2 / var + np.log(2 * math.pi * var))).sum(-1)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_closed_form_kl_matches_monte_carlo():
    rs = np.random.RandomState(0)
    mu, mu_ref = rs.randn(4), rs.randn(4)
    sigma = rs.uniform(0.3, 1.5, 4)
    x = mu + sigma * rs.randn(400_000, 4)
    mc = np.mean(np.sum(((x - mu_ref) ** 2 - (x - mu) ** 2) / (2 * sigma**2), axis=1))
    closed = float(grpo.gaussian_kl(jnp.asarray(mu, jnp.float32), jnp.asarray(mu_ref, jnp.float32),
                                    jnp.asarray(sigma, jnp.float32)))
    assert closed == pytest.approx(mc, rel=0.02) and closed > 0.1


def test_toy_run_raises_redness_and_keeps_frozen_parts(model):
    """KL weight 0, the mean redness of the image as the reward: over two dozen iterations the
    reward of fixed evaluation rollouts rises; the reference model and every part outside
    ``trainable`` stay bit-identical."""
    lp = make_loop(model, lr=1e-3, kl_weight=0.0, P=4, G=8, train_iterations=4, train_steps=5, sampling_steps="6",
                   seed=0)
    ref_before = jax.tree.map(np.asarray, lp.reference)
    frozen_before = {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(lp.params)
                     for k in [jax.tree_util.keystr(k)] if "vae" in k or "llm" in k}

    def evaluate():
        out = []
        for i in range(3):
            _, images, p, m = lp.rollout(10_000 + i)
            out.append(lp.reward(p, images, m)[0])
        return float(np.mean(out))

    start = evaluate()
    for i in range(10):
        m = lp.step(i)
    end = evaluate()
    print(f"toy GRPO: redness {start:.3f} -> {end:.3f}")
    assert end > start + 0.04, (start, end)
    for a, b in zip(jax.tree.leaves(ref_before), jax.tree.leaves(lp.reference), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    after = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(lp.params)}
    assert frozen_before and all(np.array_equal(v, after[k]) for k, v in frozen_before.items())
    assert np.isfinite(m["loss"]) and "reward/redness" in m


def test_bad_settings_name_the_setting(model):
    with pytest.raises(ValueError, match="group_size"):
        loop.GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        make_loop(model, reward="nope")
    with pytest.raises(ValueError, match="train_steps=40"):
        rollout.make_plan(np.random.default_rng(0), 4, 20, 2, 40)
    lp = make_loop(model)
    lp.prompt_source = lambda i: (["a red circle"], [{}])
    with pytest.raises(ValueError, match="grpo.prompts is 2"):
        lp.rollout(0)
