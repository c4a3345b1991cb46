"""GRPO rollouts: the release's sampler, with the diffusion steps that will be trained recorded.

The policy is the sampler itself (:func:`unipic_jax.sample.sample_latents`): MAR step ``k``
samples the tokens ``order[m_{k+1} : m_k]`` with the diffusion head, whose DDPM reverse step
``j`` (respaced step ``t = S−1−j``) draws

    x_{t−1} ~ N(μ_θ(x_t, t, z), (τ·σ_θ(x_t, t, z))²)

with ``z`` the token's condition, ``μ`` from the guided ``ε = ε_u + s_k(ε_c − ε_u)`` (CFG scale
``s_k`` of the step, the variance channels unguided: the conditional half's), ``τ`` the
temperature. Which MAR steps and which reverse steps are trained is chosen before the rollout
(:func:`make_plan`: ``J`` of the ``K`` MAR steps, ``D`` of the ``S − 1`` noisy reverse steps of
each, the noiseless last step never); the rollout keeps, for those, ``x_t``, ``x_{t−1}``, ``t``,
``σ = τ·σ_θ``, the noise drawn and the draw's log-density, plus the generation order, the CFG scale
and the token slots, so that :mod:`unipic_jax.rl.logprob` can rebuild every input the model saw.

A :class:`Rollout` is a dict of arrays (a pytree, batch axis ``B`` = trajectories):

=================  ========================  ===============================================
``input_ids``      (N, T) int32              prompts, ``[cond; uncond]`` (``N = 2B``) with CFG
``attention_mask`` (N, T) bool
``source``         (B, h, w, C) float32      editing only: the source latents
``orders``         (B, L) int32              the generation order of each trajectory
``latents``        (B, L, C) float32         the sampled tokens (each written once, at its step)
``masked``         (J,) int32                ``m_k``: tokens masked before each trained step
``scales``         (J,) float32              the CFG scale of each trained step
``idx``            (J, B, n) int32           the token slots each trained step samples
``valid``          (J, B, n) bool            which of the ``n = max_k(m_k − m_{k+1})`` slots are real
``t``              (J, D) int32              respaced step index of each trained reverse step
``x_t``, ``x_prev`` (J, D, B, n, C) float32  the step's input and its draw
``sigma``          (J, D, B, n, C) float32   ``τ·σ_θ`` of the draw
``noise``          (J, D, B, n, C) float32   the draw's standard normal: ``x_prev = μ + σ·noise``
``logp``           (J, D, B, n) float32      the draw's log-density per token, from its noise:
                                             ``−½ Σ_c (noise² + log 2πσ²)``
``temperature``    () float32
=================  ========================  ===============================================
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from unipic_jax import sample as sample_lib
from unipic_jax.models import diffusion
from unipic_jax.models.unipic import UniPic

Rollout = dict


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a rollout records: ``iterations (J,)`` MAR steps, sorted, and ``steps (J, D)``
    positions ``j`` in the diffusion chain (``0 ≤ j < S − 1``: the noiseless last is never trained)."""

    iterations: np.ndarray
    steps: np.ndarray

    def __post_init__(self):
        if self.steps.ndim != 2 or self.steps.shape[0] != len(self.iterations):
            raise ValueError(f"steps {self.steps.shape} must be (J, D) for J = {len(self.iterations)} iterations")


def make_plan(rng: np.random.Generator, num_iter: int, num_steps: int, iterations: int, steps: int) -> Plan:
    """``iterations`` of the ``num_iter`` MAR steps and, for each, ``steps`` of the
    ``num_steps − 1`` noisy reverse steps of the diffusion head, drawn without replacement."""
    if not 1 <= iterations <= num_iter:
        raise ValueError(f"train_iterations={iterations} must lie in [1, num_iter={num_iter}]")
    if not 1 <= steps <= num_steps - 1:
        raise ValueError(f"train_steps={steps} must lie in [1, {num_steps - 1}]: the diffusion head samples "
                         f"{num_steps} steps and the last adds no noise")
    its = np.sort(rng.choice(num_iter, iterations, replace=False)).astype(np.int32)
    st = np.stack([np.sort(rng.choice(num_steps - 1, steps, replace=False)) for _ in its]).astype(np.int32)
    return Plan(its, st)


def with_sampling_steps(model: UniPic, spec: str | None) -> UniPic:
    """The model (same parameter arrays) whose diffusion head samples with respacing ``spec``
    (e.g. ``"10"``: rollouts cheaper than evaluation); ``None``: the model itself."""
    if spec is None or str(spec) == model.config.diffloss.sampling_steps:
        return model
    diffusion.make_schedule(model.config.diffloss.num_steps, respacing=str(spec))  # a clear error for a bad spec
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)
    cfg = dataclasses.replace(model.config.diffloss, sampling_steps=str(spec))
    view.diffloss.config = cfg
    view.config = dataclasses.replace(model.config, diffloss=cfg)
    return view


def rollout(model: UniPic, input_ids, attention_mask, plan: Plan, *, grid: tuple[int, int], seed: int,
            num_iter: int, cfg: float = 3.0, cfg_schedule: str = "constant", temperature: float = 1.0,
            xt_temperature: float = 1.0, source_latents=None) -> tuple[jnp.ndarray, Rollout]:
    """Samples as :func:`sample.sample_latents` does (same arguments, same numbers for the same
    seed) and returns ``(latents (B, h, w, C), rollout)`` with the plan's steps recorded."""
    if np.any(plan.iterations >= num_iter):
        raise ValueError(f"the plan trains MAR steps {plan.iterations.tolist()}, past num_iter={num_iter}")
    S = model.diffloss.sample_schedule.num_steps
    if plan.steps.max(initial=0) >= S - 1:
        raise ValueError(f"the plan trains reverse steps up to {plan.steps.max()}, but the head samples {S} steps "
                         "and the last adds no noise")
    latents, rec = sample_lib.sample_latents(
        model, input_ids, attention_mask, grid=grid, seed=seed, num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule,
        temperature=temperature, xt_temperature=xt_temperature, source_latents=source_latents,
        record=plan.iterations.tolist())
    B, h, w, C = latents.shape
    masked = rec["masked"]
    t = (S - 1 - plan.steps).astype(np.int32)
    paths = [rec["steps"][int(k)] for k in plan.iterations]
    pick = lambda name, off=0: jnp.stack([p[name][plan.steps[j] + off] for j, (p, _) in enumerate(paths)])  # noqa: E731
    x_t, x_prev, log_var, noise = pick("x"), pick("x", 1), pick("log_var"), pick("noise")
    var = jnp.exp(log_var) * jnp.float32(temperature) ** 2
    idx = jnp.stack([i for _, i in paths])
    counts = masked[plan.iterations] - masked[plan.iterations + 1]
    valid = np.broadcast_to((np.arange(idx.shape[-1])[None, :] < counts[:, None])[:, None], idx.shape)
    out = {
        "input_ids": jnp.asarray(input_ids, jnp.int32), "attention_mask": jnp.asarray(attention_mask, bool),
        "orders": rec["orders"], "latents": latents.reshape(B, h * w, C),
        "masked": jnp.asarray(masked[plan.iterations]), "scales": jnp.asarray(rec["scales"][plan.iterations]),
        "idx": idx, "valid": jnp.asarray(valid), "t": jnp.asarray(t),
        "x_t": x_t, "x_prev": x_prev, "sigma": jnp.sqrt(var),
        "noise": noise,
        # the density of the draw x_prev = μ + τσ·noise, from the noise the sampler drew
        "logp": -0.5 * jnp.sum(noise**2 + jnp.log(2.0 * math.pi * var), axis=-1),
        "temperature": jnp.float32(temperature),
    }
    if source_latents is not None:
        out["source"] = jnp.asarray(source_latents, jnp.float32)
    return latents, out
