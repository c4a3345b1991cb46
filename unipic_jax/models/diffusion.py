"""Gaussian diffusion as MAR's diffusion head uses it (improved-DDPM style), as pure
functions over arrays.

Schedule: ``T`` steps (1000), cosine ``ᾱ(s) = cos²((s + 0.008)/1.008 · π/2)``, betas
``β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max_beta)``. UniPic-1 caps betas at ``max_beta=0.2``
(MAR and Harmon use 0.999), so it is a field of :class:`Schedule`.

The network predicts ``[ε, v]`` (``2C`` channels): ``ε`` the noise, ``v ∈ [−1, 1]`` the
learned-range variance, ``log σ²_t = ½(v+1)·log β_t + ½(1−v)·log β̃_t`` (``β̃`` the clipped
posterior variance). Training loss = ``mean‖ε − ε̂‖²`` + the variational-bound term (KL of
the true posterior to the model's, in bits, with ``ε̂`` frozen; the decoder NLL at ``t=0``).

``Schedule.prediction`` chooses what the first ``C`` channels are: ``"eps"`` (MAR, UniPic) or
``"v"``, the velocity (called ``v`` in the literature; written ``u`` here, where ``v`` is the
variance channel): with ``x_t = a·x0 + b·ε`` (``a = √ᾱ_t``, ``b = √(1−ᾱ_t)``),
``u = a·ε − b·x0``, so ``x̂0 = a·x_t − b·û`` and ``ε̂ = b·x_t + a·û``; the MSE is then taken on
``u``. Both are exact reparametrisations of the same reverse step; they differ in the error
that one unit of network error makes in ``x̂0``: ``(b/a)·`` for ``ε`` (unbounded at high
noise), ``b·`` for ``u``. ``ε̂`` is linear in ``û`` at a fixed ``x_t``, so classifier-free
guidance on ``u`` is guidance on ``ε``.

Sampling is DDPM over a respaced subset of the steps (``"100"`` of 1000: evenly spaced,
rounded) whose betas are recomputed from the kept ``ᾱ``; the network is fed the ORIGINAL
step index. A reverse step is ``x_{t−1} = μ + temperature·σ·z`` (no noise at the last
step), and :func:`gaussian_log_prob` gives ``log N(x_{t−1}; μ, σ²)`` for GRPO. The chain
starts from the ``x_T`` it is given; the caller scales it (``DiffLoss.sample``:
``x_T = xt_temperature·N(0, I)``, 1 in the release), the ``temperature`` above scales only
the per-step noise.

Deterministic decoding (:func:`ddim_step`, DDIM with ``η = 0``, over the same respaced
steps): ``x̂0`` as above, ``ε̂`` the network's ``ε`` (for ``"v"``: ``ε̂ = b·x_t + a·û``,
i.e. recomputed from ``x̂0``), and ``x_{t−1} = √ᾱ_{t−1}·x̂0 + √(1−ᾱ_{t−1})·ε̂`` with
``ᾱ_{t−1}`` the previous KEPT step's ``ᾱ`` and ``ᾱ = 1`` before the first (so the last
step returns ``x̂0``; diffusers' ``DDIMScheduler`` with ``set_alpha_to_one=True``). The
learned variance is unused. :func:`p_sample_loop` takes ``ddim`` as a (possibly traced)
boolean: traced, it picks the DDIM or the DDPM chain with ``lax.cond`` (both compiled once,
only one runs), so switching costs no compile, and the DDPM chain stays the computation it
is without the option, bit for bit (a ``jnp.where`` between the two updates inside one
scan changes XLA's fusion of the DDPM update and its last bits).

Schedule tables are computed in float64 with NumPy (as the reference does) and applied in
float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def cosine_alpha_bar(s: np.ndarray) -> np.ndarray:
    return np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_steps: int, max_beta: float) -> np.ndarray:
    i = np.arange(num_steps, dtype=np.float64)
    betas = 1.0 - cosine_alpha_bar((i + 1) / num_steps) / cosine_alpha_bar(i / num_steps)
    return np.minimum(betas, max_beta)


def linear_betas(num_steps: int) -> np.ndarray:
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def spaced_steps(num_steps: int, spec: str | int) -> np.ndarray:
    """The kept step indices for a respacing spec, sorted.

    ``"100"`` keeps 100 evenly spaced steps (index ``round(k · (T−1)/(n−1))``, the stride
    accumulated in floating point); ``"10,20"`` splits the steps into equal sections and
    spaces each count within its section; ``"ddim25"`` keeps every ``T/25``-th step.
    """
    spec = str(spec)
    if spec.startswith("ddim"):
        n = int(spec[4:])
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == n:
                return np.arange(0, num_steps, stride)
        raise ValueError(f"Cannot keep exactly {n} of {num_steps} steps with a fixed stride")
    counts = [int(c) for c in spec.split(",")]
    per, extra = divmod(num_steps, len(counts))
    kept, start = [], 0
    for i, n in enumerate(counts):
        size = per + (1 if i < extra else 0)
        if not 1 <= n <= size:
            raise ValueError(f"Cannot keep {n} of the {size} steps of section {i} (spec {spec!r}, {num_steps} steps)")
        stride = (size - 1) / (n - 1) if n > 1 else 1.0
        cur = 0.0
        for _ in range(n):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return np.array(sorted(set(kept)))


PREDICTIONS = ("eps", "v")


def check_prediction(value: str, name: str = "prediction") -> None:
    """Raises ``ValueError`` naming ``name`` and the choices unless ``value`` is in :data:`PREDICTIONS`."""
    if value not in PREDICTIONS:
        raise ValueError(f"{name}={value!r}; choose from {PREDICTIONS}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Precomputed tables of a (possibly respaced) diffusion. Build with :func:`make_schedule`."""

    betas: np.ndarray
    timestep_map: np.ndarray  # step index -> the original step index fed to the network
    prediction: str = "eps"  # what the network's first C channels are: "eps" or "v"

    def __post_init__(self):
        check_prediction(self.prediction)
        b = self.betas
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        tables = dict(
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
            posterior_variance=post_var,
            # the first posterior variance is 0: use the second for its log
            posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1
            else np.log(np.maximum(post_var, 1e-20)),
            posterior_mean_coef1=b * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
            log_betas=np.log(b),
        )
        for k, v in tables.items():
            object.__setattr__(self, k, v)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def at(self, name: str, t: jax.Array, ndim: int) -> jax.Array:
        """Table ``name`` gathered at integer steps ``t (B,)``, broadcastable to rank ``ndim``."""
        v = jnp.asarray(getattr(self, name), jnp.float32)[t]
        return v.reshape(v.shape + (1,) * (ndim - 1))


def make_schedule(num_steps: int = 1000, noise: str = "cosine", max_beta: float = 0.2,
                  respacing: str | int | None = None, prediction: str = "eps") -> Schedule:
    """The training schedule, or its respaced version for sampling (``respacing="100"``)."""
    if noise == "cosine":
        betas = cosine_betas(num_steps, max_beta)
    elif noise == "linear":
        betas = linear_betas(num_steps)
    else:
        raise ValueError(f"noise must be 'cosine' or 'linear', got {noise!r}")
    if respacing is None or str(respacing) == str(num_steps):
        return Schedule(betas, np.arange(num_steps), prediction)
    keep = spaced_steps(num_steps, respacing)
    ac = np.cumprod(1.0 - betas)
    new_betas, last = [], 1.0
    for i in keep:
        new_betas.append(1.0 - ac[i] / last)
        last = ac[i]
    return Schedule(np.asarray(new_betas), keep, prediction)


# -- forward process ----------------------------------------------------------------------


def q_sample(s: Schedule, x0, t, noise):
    """``x_t = √ᾱ_t · x0 + √(1−ᾱ_t) · ε``."""
    return s.at("sqrt_alphas_cumprod", t, x0.ndim) * x0 + s.at("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise


def q_posterior(s: Schedule, x0, xt, t):
    """Mean and log-variance of ``q(x_{t−1} | x_t, x0)``."""
    mean = s.at("posterior_mean_coef1", t, xt.ndim) * x0 + s.at("posterior_mean_coef2", t, xt.ndim) * xt
    return mean, s.at("posterior_log_variance_clipped", t, xt.ndim)


# -- model side ---------------------------------------------------------------------------


def predicted_x0(s: Schedule, pred, xt, t):
    """``x̂0`` from the network's prediction (``s.prediction``) at ``x_t``."""
    if s.prediction == "v":
        return s.at("sqrt_alphas_cumprod", t, xt.ndim) * xt - s.at("sqrt_one_minus_alphas_cumprod", t, xt.ndim) * pred
    return s.at("sqrt_recip_alphas_cumprod", t, xt.ndim) * xt - s.at("sqrt_recipm1_alphas_cumprod", t, xt.ndim) * pred


def prediction_target(s: Schedule, x0, t, noise):
    """What the network should predict for ``x0`` noised with ``noise`` at ``t``."""
    if s.prediction == "v":
        return s.at("sqrt_alphas_cumprod", t, x0.ndim) * noise - s.at("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * x0
    return noise


def p_mean_variance(s: Schedule, model_out, xt, t):
    """From the network output ``[prediction, v]`` (last axis ``2C``): model mean,
    log-variance, x̂0."""
    pred, v = jnp.split(model_out.astype(jnp.float32), 2, axis=-1)
    min_log = s.at("posterior_log_variance_clipped", t, xt.ndim)
    max_log = s.at("log_betas", t, xt.ndim)
    frac = (v + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
    x0 = predicted_x0(s, pred, xt, t)
    mean, _ = q_posterior(s, x0, xt, t)
    return mean, log_var, x0


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of ``x ∈ [−1, 1]`` discretised to 256 bins (the reference's decoder NLL)."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_probs = jnp.where(
        x < -0.999, log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))),
    )
    return log_probs


def training_losses(s: Schedule, net: Callable, x0, t, noise):
    """Per-example loss ``mse + vb`` (means over the non-batch axes), and the two parts.

    ``net(x_t, t)`` returns ``[prediction, v]`` (``ε̂`` for ``s.prediction == "eps"``); ``t``
    are indices into ``s`` (for the training schedule, the original steps)."""
    xt = q_sample(s, x0, t, noise)
    out = net(xt, t).astype(jnp.float32)
    pred, v = jnp.split(out, 2, axis=-1)
    axes = tuple(range(1, x0.ndim))
    mse = jnp.mean((prediction_target(s, x0, t, noise) - pred) ** 2, axis=axes)
    # the variational bound trains only the variance: the mean comes from a frozen prediction
    frozen = jnp.concatenate([jax.lax.stop_gradient(pred), v], axis=-1)
    mean, log_var, _ = p_mean_variance(s, frozen, xt, t)
    true_mean, true_log_var = q_posterior(s, x0, xt, t)
    kl = jnp.mean(normal_kl(true_mean, true_log_var, mean, log_var), axis=axes) / math.log(2.0)
    nll = -jnp.mean(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var), axis=axes) / math.log(2.0)
    vb = jnp.where(t == 0, nll, kl)
    return mse + vb, {"mse": mse, "vb": vb}


def p_sample_step(s: Schedule, model_out, xt, t, noise, temperature=1.0):
    """One reverse step: ``(x_{t−1}, mean, log_var)``; no noise is added at ``t = 0``."""
    mean, log_var, _ = p_mean_variance(s, model_out, xt, t)
    nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (xt.ndim - 1))
    return mean + nonzero * jnp.exp(0.5 * log_var) * noise * temperature, mean, log_var


def gaussian_log_prob(x, mean, log_var, temperature=1.0):
    """``log N(x; mean, (temperature·σ)²)`` summed over the last axis (per token), float32."""
    var = jnp.exp(log_var) * temperature**2
    return -0.5 * jnp.sum((x - mean) ** 2 / var + jnp.log(2.0 * math.pi * var), axis=-1)


def predicted_eps(s: Schedule, pred, xt, t):
    """``ε̂`` from the network's prediction: itself for ``"eps"``; ``b·x_t + a·û`` for ``"v"``
    (the ``ε`` that, with ``x̂0 = a·x_t − b·û``, reproduces ``x_t = a·x̂0 + b·ε̂``)."""
    if s.prediction == "v":
        return s.at("sqrt_one_minus_alphas_cumprod", t, xt.ndim) * xt + s.at("sqrt_alphas_cumprod", t, xt.ndim) * pred
    return pred


def ddim_step(s: Schedule, model_out, xt, t):
    """One deterministic DDIM step (``η = 0``): ``x_{t−1} = √ᾱ_{t−1}·x̂0 + √(1−ᾱ_{t−1})·ε̂``,
    ``ᾱ_{−1} = 1`` (the last step returns ``x̂0``). ``model_out`` is ``[prediction, v]``; the
    variance channels ``v`` are ignored."""
    pred, _ = jnp.split(model_out.astype(jnp.float32), 2, axis=-1)
    x0 = predicted_x0(s, pred, xt, t)
    eps = predicted_eps(s, pred, xt, t)
    ac_prev = s.at("alphas_cumprod_prev", t, xt.ndim)
    return jnp.sqrt(ac_prev) * x0 + jnp.sqrt(1.0 - ac_prev) * eps


def p_sample_loop(s: Schedule, net: Callable, noise, key, temperature=1.0, ddim=False, record: bool = False):
    """Runs the whole reverse chain from ``x_T = noise``. ``net(x, t_original)`` → ``[ε̂, v]``.

    ``ddim`` (a Python or traced boolean): every step is the deterministic :func:`ddim_step`
    instead of the DDPM step (``key`` and ``temperature`` then unused). A traced ``ddim``
    selects one of the two chains with ``lax.cond`` (both compiled once, one run); the DDPM
    chain is then the same computation as with ``ddim=False``, bit for bit.

    ``record=True`` also returns the path ``{"x": (S+1, N, C), "log_var", "noise": (S, N,
    C)}``: ``x[j]`` is the input of the ``j``-th reverse step (respaced step index ``S−1−j``),
    ``x[j+1] = μ_j + temperature·exp(½·log_var[j])·noise[j]`` its draw (no noise at the last
    step); ``x[S]`` is the sample (with a traced ``ddim``, the DDIM chain returns a zero path)."""
    steps = jnp.asarray(s.timestep_map, jnp.int32)
    B = noise.shape[0]
    order = jnp.arange(s.num_steps - 1, -1, -1)

    def ddpm_chain(noise):
        def body(carry, i):
            x, key = carry
            key, sub = jax.random.split(key)
            t = jnp.full((B,), i, jnp.int32)
            out = net(x, steps[t])
            z = jax.random.normal(sub, x.shape, x.dtype)
            new, _, log_var = p_sample_step(s, out, x, t, z, temperature)
            # not the mean: keeping it changes XLA's fusion of the draw (and the samples' last bits)
            return (new, key), ((x, log_var, z) if record else None)

        (x, _), path = jax.lax.scan(body, (noise, key), order)
        if record:
            return x, {"x": jnp.concatenate([path[0], x[None]]), "log_var": path[1], "noise": path[2]}
        return x

    def ddim_chain(noise):
        def body(x, i):
            t = jnp.full((B,), i, jnp.int32)
            return ddim_step(s, net(x, steps[t]), x, t), None

        x = jax.lax.scan(body, noise, order)[0]
        if record:  # the structure of the DDPM chain's path; a deterministic step has no log-probability
            zeros = jnp.zeros((s.num_steps,) + x.shape, x.dtype)
            return x, {"x": jnp.concatenate([zeros, x[None]]), "log_var": zeros, "noise": zeros}
        return x

    if record and ddim is True:
        raise ValueError("record=True records the stochastic DDPM chain; DDIM steps have no log-probability")
    if isinstance(ddim, bool):
        return ddim_chain(noise) if ddim else ddpm_chain(noise)
    return jax.lax.cond(ddim, ddim_chain, ddpm_chain, noise)
