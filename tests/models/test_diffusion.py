"""Gaussian diffusion maths: the official cosine schedule (diffusers' implementation of
improved-DDPM's betas_for_alpha_bar), closed forms, respacing and sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

from unipic_jax.models import diffusion as D


@pytest.mark.parametrize("max_beta", [0.999, 0.2])
def test_cosine_betas_equal_the_reference_schedule(max_beta):
    ref = betas_for_alpha_bar(1000, max_beta=max_beta, alpha_transform_type="cosine").double().numpy()
    ours = D.cosine_betas(1000, max_beta)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)  # the reference builds float32 betas
    assert ours.max() == pytest.approx(max_beta)
    # the UniPic cap changes the end of the schedule only
    assert np.sum(D.cosine_betas(1000, 0.2) != D.cosine_betas(1000, 0.999)) < 60


def test_q_sample_and_posterior_against_bayes_rule():
    s = D.make_schedule(1000, max_beta=0.2)
    rs = np.random.RandomState(0)
    x0, noise, xt = (rs.randn(6, 4).astype(np.float32) for _ in range(3))
    t = np.array([0, 1, 10, 500, 990, 999])
    ac = np.cumprod(1 - s.betas)
    want = np.sqrt(ac[t])[:, None] * x0 + np.sqrt(1 - ac[t])[:, None] * noise
    np.testing.assert_allclose(D.q_sample(s, x0, t, noise), want, rtol=1e-5, atol=1e-6)
    # q(x_{t-1} | x_t, x0) ∝ N(x_t; √α_t x_{t-1}, β_t) · N(x_{t-1}; √ᾱ_{t-1} x0, 1 − ᾱ_{t-1})
    tt = t[1:]
    a, b, ac_prev = 1 - s.betas[tt], s.betas[tt], ac[tt - 1]
    precision = a / b + 1 / (1 - ac_prev)
    mean = (np.sqrt(a)[:, None] * xt[1:] / b[:, None] + np.sqrt(ac_prev)[:, None] * x0[1:] / (1 - ac_prev)[:, None]) \
        / precision[:, None]
    got_mean, got_logvar = D.q_posterior(s, x0[1:], xt[1:], tt)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.exp(got_logvar[:, 0]), 1 / precision, rtol=1e-4)


def test_respacing_keeps_the_original_alpha_bars():
    full = D.make_schedule(1000, max_beta=0.2)
    s = D.make_schedule(1000, max_beta=0.2, respacing="100")
    assert s.num_steps == 100 and s.timestep_map[0] == 0 and s.timestep_map[-1] == 999
    assert len(set(s.timestep_map.tolist())) == 100 and np.all(np.diff(s.timestep_map) > 0)
    np.testing.assert_allclose(np.cumprod(1 - s.betas), np.cumprod(1 - full.betas)[s.timestep_map], rtol=1e-12)
    assert D.spaced_steps(1000, "ddim25").tolist() == list(range(0, 1000, 40))
    # stride 12.25 accumulated, Python (half-to-even) rounding: 24.5 -> 24, 74.5 -> 74
    assert D.spaced_steps(100, "5,5").tolist() == [0, 12, 24, 37, 49, 50, 62, 74, 87, 99]
    with pytest.raises(ValueError, match="Cannot keep"):
        D.make_schedule(10, respacing="20")


def test_learned_range_variance_interpolates_between_the_bounds():
    s = D.make_schedule(1000, max_beta=0.2, respacing="100")
    xt = jnp.ones((3, 4))
    t = jnp.array([50, 50, 50])
    out = jnp.concatenate([jnp.zeros((3, 4)), jnp.array([[-1.0], [0.0], [1.0]]) * jnp.ones((3, 4))], axis=-1)
    _, log_var, _ = D.p_mean_variance(s, out, xt, t)
    lo, hi = s.posterior_log_variance_clipped[50], np.log(s.betas[50])
    np.testing.assert_allclose(log_var[:, 0], [lo, (lo + hi) / 2, hi], rtol=1e-5)


def test_training_loss_parts():
    s = D.make_schedule(1000, max_beta=0.2)
    rs = np.random.RandomState(1)
    x0, noise = jnp.asarray(rs.randn(4, 8), jnp.float32), jnp.asarray(rs.randn(4, 8), jnp.float32)
    t = jnp.array([0, 3, 400, 999])
    perfect = lambda xt, t: jnp.concatenate([noise, jnp.zeros_like(noise)], -1)  # noqa: E731
    loss, parts = D.training_losses(s, perfect, x0, t, noise)
    np.testing.assert_allclose(parts["mse"], 0.0, atol=1e-10)
    assert np.all(np.asarray(parts["vb"])[1:] >= -1e-6) and np.all(np.isfinite(loss))
    wrong = lambda xt, t: jnp.concatenate([-noise, jnp.zeros_like(noise)], -1)  # noqa: E731
    np.testing.assert_allclose(D.training_losses(s, wrong, x0, t, noise)[1]["mse"],
                               np.mean((2 * np.asarray(noise)) ** 2, axis=1), rtol=1e-5)
    # the vb term does not train ε
    g = jax.grad(lambda e: D.training_losses(s, lambda xt, t: jnp.concatenate([e, jnp.zeros_like(e)], -1),
                                             x0, t, noise)[1]["vb"].sum())(noise)
    np.testing.assert_allclose(g, 0.0, atol=1e-12)


def test_reverse_step_and_log_prob():
    s = D.make_schedule(1000, max_beta=0.2, respacing="100")
    rs = np.random.RandomState(2)
    out, xt, z = (jnp.asarray(rs.randn(3, 2 * c if c else 4), jnp.float32) for c in (4, 0, 0))
    out = jnp.clip(out, -1, 1)
    t = jnp.array([0, 5, 99])
    x, mean, log_var = D.p_sample_step(s, out, xt, t, z, temperature=0.5)
    np.testing.assert_allclose(x[0], mean[0])  # no noise at the last step
    np.testing.assert_allclose(x[1:], mean[1:] + 0.5 * jnp.exp(0.5 * log_var[1:]) * z[1:], rtol=1e-6)
    lp = D.gaussian_log_prob(x, mean, log_var, temperature=0.5)
    ref = jax.scipy.stats.norm.logpdf(x, mean, 0.5 * jnp.exp(0.5 * log_var)).sum(-1)
    np.testing.assert_allclose(lp[1:], ref[1:], rtol=1e-5)


def test_sampling_with_a_perfect_denoiser_recovers_the_data():
    """For data that is a single point c, ε̂ = (x_t − √ᾱ_t c)/√(1−ᾱ_t) is exact; the
    respaced chain, fed original step indices, must land on c."""
    full = D.make_schedule(1000, max_beta=0.2)
    s = D.make_schedule(1000, max_beta=0.2, respacing="50")
    c = jnp.array([[0.3, -0.7, 1.2]])
    ac = jnp.asarray(np.cumprod(1 - full.betas), jnp.float32)

    def net(x, t_orig):
        a = ac[t_orig][:, None]
        eps = (x - jnp.sqrt(a) * c) / jnp.sqrt(1 - a)
        return jnp.concatenate([eps, -jnp.ones_like(eps)], -1)

    noise = jax.random.normal(jax.random.key(0), (5, 3))
    x = D.p_sample_loop(s, net, noise, jax.random.key(1), temperature=1.0)
    np.testing.assert_allclose(x, jnp.broadcast_to(c, (5, 3)), atol=1e-3)
    again = D.p_sample_loop(s, net, noise, jax.random.key(1))
    np.testing.assert_array_equal(x, again)
    assert math.isfinite(float(jnp.sum(x)))


@pytest.mark.parametrize("prediction,diffusers_type", [("eps", "epsilon"), ("v", "v_prediction")])
def test_predictions_match_diffusers_ddpm(prediction, diffusers_type):
    """``x̂0``, the training target and the last reverse step for both parametrisations, against
    diffusers' DDPMScheduler on the same betas."""
    import torch
    from diffusers import DDPMScheduler

    s = D.make_schedule(1000, max_beta=0.2, prediction=prediction)
    ref = DDPMScheduler(num_train_timesteps=1000, trained_betas=s.betas.tolist(), prediction_type=diffusers_type,
                        clip_sample=False)
    rs = np.random.RandomState(3)
    x0, noise, pred = (rs.randn(4, 6).astype(np.float32) for _ in range(3))
    t = np.array([0, 7, 500, 999])
    xt = D.q_sample(s, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    target = D.prediction_target(s, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    want = noise if prediction == "eps" else ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise),
                                                             torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(target, want, rtol=1e-5, atol=1e-5)
    x0_hat = D.predicted_x0(s, jnp.asarray(pred), xt, jnp.asarray(t))
    for i, ti in enumerate(t):
        out = ref.step(torch.from_numpy(pred[i:i + 1]), int(ti), torch.from_numpy(np.asarray(xt[i:i + 1])))
        np.testing.assert_allclose(x0_hat[i], out.pred_original_sample[0].numpy(), rtol=2e-4, atol=2e-4)
        if ti == 0:  # no noise at the last step: the sample is the model mean
            out_full = jnp.concatenate([jnp.asarray(pred[i:i + 1]), jnp.zeros((1, 6))], -1)
            mean, _, _ = D.p_mean_variance(s, out_full, xt[i:i + 1], jnp.asarray(t[i:i + 1]))
            np.testing.assert_allclose(mean[0], out.prev_sample[0].numpy(), rtol=1e-4, atol=1e-5)
    # a perfect prediction has zero MSE and the same variational bound as a perfect ε̂
    _, parts = D.training_losses(s, lambda x, tt: jnp.concatenate([target, jnp.zeros_like(target)], -1),
                                 jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    np.testing.assert_allclose(parts["mse"], 0.0, atol=1e-10)
    eps_s = D.make_schedule(1000, max_beta=0.2)
    _, vb_eps = D.training_losses(eps_s, lambda x, tt: jnp.concatenate([jnp.asarray(noise), jnp.zeros((4, 6))], -1),
                                  jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    np.testing.assert_allclose(parts["vb"], vb_eps["vb"], rtol=1e-3, atol=1e-5)


def test_unknown_prediction_is_refused():
    from unipic_jax.models.diffloss import DiffLossConfig

    with pytest.raises(ValueError, match=r"^prediction='x0'; choose from \('eps', 'v'\)"):
        D.make_schedule(1000, prediction="x0")
    with pytest.raises(ValueError, match=r"DiffLossConfig.prediction='x0'; choose from \('eps', 'v'\)"):
        DiffLossConfig(prediction="x0")


@pytest.mark.parametrize("prediction,diffusers_type", [("eps", "epsilon"), ("v", "v_prediction")])
def test_ddim_chain_matches_diffusers_ddim(prediction, diffusers_type):
    """The deterministic chain (``ddim=True``) over the respaced steps against diffusers'
    DDIMScheduler (η = 0, ``set_alpha_to_one``) on the respaced betas, with the same network fed
    the original step index; and a traced ``ddim`` switches chains without changing either."""
    import torch
    from diffusers import DDIMScheduler

    s = D.make_schedule(1000, respacing="25", prediction=prediction)
    n = s.num_steps
    ref = DDIMScheduler(num_train_timesteps=n, trained_betas=s.betas.tolist(), prediction_type=diffusers_type,
                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0)
    ref.set_timesteps(n)
    assert ref.timesteps.tolist() == list(range(n - 1, -1, -1))
    rs = np.random.RandomState(0)
    w, c = rs.randn(6, 12).astype(np.float32) * 0.3, rs.randn(12).astype(np.float32) * 1e-3

    def net(x, t):  # a fixed smooth function of (x, original t); channels [prediction, v]
        return jnp.tanh(x @ w + t[:, None] * c)

    noise = rs.randn(4, 6).astype(np.float32)
    got = D.p_sample_loop(s, net, jnp.asarray(noise), jax.random.key(0), ddim=True)
    x = torch.from_numpy(noise).double()
    for i in ref.timesteps.tolist():
        t_orig = jnp.full((4,), int(s.timestep_map[i]))
        out = np.array(net(jnp.asarray(x.numpy(), jnp.float32), t_orig))[:, :6]
        x = ref.step(torch.from_numpy(out).double(), i, x, eta=0.0).prev_sample
    np.testing.assert_allclose(got, x.numpy(), rtol=1e-4, atol=1e-5)
    # DDIM ignores the key and the temperature; DDPM does not
    again = D.p_sample_loop(s, net, jnp.asarray(noise), jax.random.key(5), temperature=0.3, ddim=True)
    np.testing.assert_array_equal(got, again)
    f = jax.jit(lambda d, key: D.p_sample_loop(s, net, jnp.asarray(noise), key, ddim=d))
    np.testing.assert_array_equal(f(True, jax.random.key(0)), jax.jit(
        lambda key: D.p_sample_loop(s, net, jnp.asarray(noise), key, ddim=True))(jax.random.key(0)))
    ddpm = jax.jit(lambda key: D.p_sample_loop(s, net, jnp.asarray(noise), key))(jax.random.key(0))
    np.testing.assert_array_equal(f(False, jax.random.key(0)), ddpm)
    assert not np.allclose(ddpm, got)
