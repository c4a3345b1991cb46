"""GRPO's maths as pure functions, and the jitted update built from them.

Group-relative advantages: ``G`` trajectories a prompt, each group's rewards ``r``,

    A = (r − mean_g(r)) / (std_g(r) + ε)

(all of a group on one host, so no collective is needed; a group whose rewards are all equal
gets ``A = 0``). Every recorded token step is an action: with ``ρ = exp(log p_θ − log p_old)``
the clipped objective, averaged over the valid token steps, is

    L_clip = −mean( min(ρ·A, clip(ρ, 1 − ε_c, 1 + ε_c)·A) ),

and the KL to the frozen reference, for Gaussians sharing the rollout's ``σ``, is in closed form

    KL(N(μ_θ, σ²) ‖ N(μ_ref, σ²)) = Σ_c (μ_θ,c − μ_ref,c)² / (2σ_c²)     (per token),

so ``L = L_clip + β·mean(KL)``. The update computes ``log p_old`` itself on the first
optimizer step of a rollout batch (``first=True``: ``log p_old = stop_gradient(log p_θ)``, the
same jitted function at the same batch shape and sharding as every later step, so that step's
ratio is exactly 1) and returns it for the batch's later steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unipic_jax.rl import logprob


def group_advantages(rewards, group_size: int, eps: float = 1e-4) -> np.ndarray:
    """``(r − mean_g) / (std_g + eps)`` per group of ``group_size`` consecutive trajectories, float32."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards must be one score per trajectory (B,), got shape {r.shape}")
    if group_size < 1 or len(r) % group_size:
        raise ValueError(f"group_size={group_size} must divide the {len(r)} trajectories of a batch "
                         "(each prompt is sampled group_size times, consecutively)")
    g = r.reshape(-1, group_size)
    adv = (g - g.mean(axis=1, keepdims=True)) / (g.std(axis=1, keepdims=True) + eps)
    return adv.reshape(-1).astype(np.float32)


def masked_mean(x, valid):
    valid = valid.astype(jnp.float32)
    return jnp.sum(x * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def clipped_objective(new_logp, old_logp, advantages, valid, clip_eps: float):
    """``(loss, metrics)``: the clipped surrogate of the module docstring. ``new_logp``,
    ``old_logp`` and ``valid`` are ``(J, D, B, n)``; ``advantages (B,)``."""
    ratio = jnp.exp(new_logp - old_logp)
    a = advantages[None, None, :, None]
    surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
    clipped = jnp.abs(ratio - 1.0) > clip_eps
    return -masked_mean(surrogate, valid), {"ratio": masked_mean(ratio, valid),
                                            "ratio_max": jnp.max(jnp.where(valid, ratio, -jnp.inf)),
                                            "ratio_min": jnp.min(jnp.where(valid, ratio, jnp.inf)),
                                            "clip_fraction": masked_mean(clipped, valid)}


def gaussian_kl(mean, ref_mean, sigma):
    """Per-token ``Σ_c (μ − μ_ref)² / (2σ²)``: KL between Gaussians sharing ``σ``."""
    return jnp.sum((mean - ref_mean) ** 2 / (2.0 * sigma**2), axis=-1)


def make_update(graphdef, rest, tx: optax.GradientTransformation, *, grid: tuple[int, int], clip_eps: float,
                kl_weight: float):
    """``update(params, opt_state, batch, old_logp, ref_mean, advantages, first) → (params,
    opt_state, logp_before, metrics)``, jitted, donating the parameters and optimizer state.
    ``logp_before`` is ``log p`` under the parameters before this update (the batch's
    ``log p_old`` when ``first``)."""

    def loss_fn(params, batch, old_logp, ref_mean, advantages, first):
        model = nnx.merge(graphdef, params, rest)
        logp, mean = logprob.log_probs(model, batch, grid)
        old = jnp.where(first, jax.lax.stop_gradient(logp), old_logp)
        valid = jnp.broadcast_to(batch["valid"][:, None], logp.shape)  # (J, B, n) → (J, D, B, n)
        loss, metrics = clipped_objective(logp, old, advantages, valid, clip_eps)
        kl = masked_mean(gaussian_kl(mean, ref_mean, batch["sigma"]), valid)
        return loss + kl_weight * kl, (logp, {**metrics, "policy_loss": loss, "kl": kl})

    def update(params, opt_state, batch, old_logp, ref_mean, advantages, first):
        (loss, (logp, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, old_logp, ref_mean, advantages, first)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        return params, opt_state, jax.lax.stop_gradient(logp), metrics

    return jax.jit(update, donate_argnums=(0, 1))


def make_log_probs(graphdef, rest, grid: tuple[int, int]):
    """``f(params, batch) → (logp, mean)`` jitted (the reference model's means, the tests)."""

    def f(params, batch):
        return logprob.log_probs(nnx.merge(graphdef, params, rest), batch, grid)

    return jax.jit(f)
