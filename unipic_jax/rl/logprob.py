"""Log-probabilities of a rollout's recorded steps under a model's current parameters.

For trained MAR step ``k`` (``m = m_k`` tokens masked before it) the model's inputs are rebuilt
from the rollout: the tokens of rank ``≥ m`` in the trajectory's order are visible with the
values they were sampled with (a token is written once, at its own step), the rest are zero and
masked; the prompt (and, for editing, the source image) is prefilled once. The conditions
``z`` of the step's token slots and the diffusion head at the recorded ``(x_t, t)`` give, exactly
as the sampler combined them,

    ε = ε_u + s_k·(ε_c − ε_u)   (variance channels: the conditional half's),
    μ, log σ²  from ``diffusion.p_mean_variance``,
    log p = Σ_c log N(x_prev,c; μ_c, τ²·σ_c²)      (per token, float32).

Everything after the network runs in float32 whatever the model's dtype. The functions are
pure in the model and the rollout, so one jitted function serves the rollout's "old"
log-probabilities and the training step's "new" ones (:mod:`unipic_jax.rl.grpo`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unipic_jax.models import diffusion
from unipic_jax.models.unipic import UniPic


def _guided(batch) -> bool:
    return batch["input_ids"].shape[0] == 2 * batch["orders"].shape[0]


def step_inputs(batch, j, guided: bool):
    """``(tokens (N, L, C), mask (N, L))``: what MAR step ``j`` of the plan fed the model
    (``[cond; uncond]`` rows with CFG, both halves alike)."""
    ranks = jnp.argsort(batch["orders"], axis=1)
    hidden = ranks < batch["masked"][j]
    tokens = jnp.where(hidden[..., None], 0.0, batch["latents"])
    mask = hidden.astype(jnp.float32)
    if guided:
        tokens, mask = jnp.concatenate([tokens, tokens]), jnp.concatenate([mask, mask])
    return tokens, mask


def log_probs(model: UniPic, batch, grid: tuple[int, int]):
    """``(logp (J, D, B, n), mean (J, D, B, n, C))`` of the rollout ``batch``'s recorded steps
    (:mod:`unipic_jax.rl.rollout`) under ``model``."""
    guided = _guided(batch)
    h, w = grid
    x_con, z_src = (None, None)
    if "source" in batch:
        src = batch["source"]
        x_con, z_src = model.encode_image(jnp.concatenate([src, src]) if guided else src)
    cache = model.prefill(model.embed_prompt(batch["input_ids"], z_src), batch["attention_mask"], grid)
    schedule = model.diffloss.sample_schedule
    C = batch["latents"].shape[-1]
    temperature = batch["temperature"]

    def one(j):
        tokens, mask = step_inputs(batch, j, guided)
        N = tokens.shape[0]
        z = model.condition(latents=tokens.reshape(N, h, w, C), mask=mask, x_con=x_con, cache=cache)
        idx = batch["idx"][j]  # (B, n)
        if guided:
            idx = jnp.concatenate([idx, idx])
        zs = jnp.take_along_axis(z, idx[..., None], axis=1)  # (N, n, Z)
        x_t, x_prev, t = batch["x_t"][j], batch["x_prev"][j], batch["t"][j]  # (D, B, n, C), (D,)
        D, B, n, _ = x_t.shape
        tt = jnp.broadcast_to(t[:, None, None], (D, B, n)).reshape(-1)
        xs = x_t.reshape(-1, C)
        halves = jnp.split(zs, 2) if guided else [zs]
        conds = jnp.concatenate([jnp.broadcast_to(c[None], (D,) + c.shape).reshape(D * B * n, -1) for c in halves])
        t_orig = jnp.asarray(schedule.timestep_map, jnp.int32)[tt]
        if guided:
            scale = batch["scales"][j]
            out = model.diffloss.net.forward_with_cfg(jnp.concatenate([xs, xs]), jnp.concatenate([t_orig, t_orig]),
                                                      conds, scale)[: D * B * n]
        else:
            out = model.diffloss.net(xs, t_orig, conds)
        mean, log_var, _ = diffusion.p_mean_variance(schedule, out, xs, tt)
        lp = diffusion.gaussian_log_prob(x_prev.reshape(-1, C), mean, log_var, temperature)
        return lp.reshape(D, B, n), mean.reshape(D, B, n, C)

    return jax.lax.map(one, jnp.arange(batch["masked"].shape[0]))
