"""MAR's diffusion head ("DiffLoss"): a small MLP denoiser per image token, conditioned
on the MAR decoder's output ``z`` for that token.

SimpleMLPAdaLN (width ``W``, ``depth`` residual blocks)::

    y = time_embed(t) + cond_embed(z)          time_embed = MLP(sinusoid_256(t)), [cos | sin] halves
    h = input_proj(x_t)
    h = h + gate · MLP(LN(h) · (1 + scale) + shift)      (shift, scale, gate) = Linear(SiLU(y))   × depth
    out = Linear(LN₀(h) · (1 + scale) + shift)           LN₀ without affine; (shift, scale) = Linear(SiLU(y))

``out`` has ``2C`` channels: ``ε̂`` (or the velocity, ``prediction="v"``) and the learned-range
variance (``diffusion.py``).
Training (:meth:`DiffLoss.loss`) repeats every token ``batch_mul`` times with fresh ``t`` and
noise and averages the loss over masked tokens; sampling (:meth:`DiffLoss.sample`) runs the
respaced DDPM chain from ``x_T = xt_temperature·N(0, I)`` (or, with ``ddim``, the
deterministic DDIM ``η = 0`` chain from ``x_T = ddim_xt_scale·N(0, I)``), with
classifier-free guidance on ``ε`` when the batch is ``[cond; uncond]``: both halves start
from the same noise and are evaluated at the first half's ``x``, ``ε = ε_u + s(ε_c − ε_u)``,
each half keeps its own variance, and the first half is the sample.

Parameters (ours ← ``mar.diffloss.net.*`` of the release; kernels ``(out, in)``):
``time_embed.fc{1,2}`` ← ``time_embed.mlp.{0,2}``; ``cond_embed``, ``input_proj``;
``res_blocks.i.{in_ln, mlp.fc1 ← mlp.0, mlp.fc2 ← mlp.2}``; ``res_blocks.i.ada (3, W, W)`` ←
``adaLN_modulation.1 (3W, W)``; ``final_layer.{linear, ada (2, W, W) ← adaLN_modulation.1}``.
With ``scan_layers`` the residual blocks are one stacked module (``res_blocks.ada.kernel``
``(depth, 3, W, W)``, leading logical axis ``"layers"``) run as one scan.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from unipic_jax import sharding
from unipic_jax.models import diffusion
from unipic_jax.models.layers import Dense, LayerNorm, PresetConfig, make_blocks, run_blocks


@dataclasses.dataclass(frozen=True)
class DiffLossConfig(PresetConfig):
    in_channels: int = 16  # VAE latent channels (one token)
    z_channels: int = 1280  # MAR decoder width
    width: int = 1536
    depth: int = 12
    freq_dim: int = 256
    num_steps: int = 1000
    max_beta: float = 0.2  # UniPic-1; MAR and Harmon use 0.999
    sampling_steps: str = "100"
    prediction: str = "eps"  # the first C output channels: "eps" (MAR, UniPic) or "v" (diffusion.py)
    batch_mul: int = 4
    scan_layers: bool = False  # stack the residual blocks (parameters (depth, ...)) and run them with a scan
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        diffusion.check_prediction(self.prediction, "DiffLossConfig.prediction")


PRESETS = {
    "unipic": DiffLossConfig(),
    "tiny": DiffLossConfig(in_channels=4, z_channels=32, width=32, depth=2, batch_mul=2, sampling_steps="20"),
}


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """``[cos(t·f_i) | sin(t·f_i)]`` with ``f_i = max_period^(−i/half)``, float32 ``(N, dim)``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _tokens(x: jax.Array) -> jax.Array:
    """Keeps the token axis (the first) sharded like the batch, the rest replicated.

    The head sees ``N = B·L·batch_mul`` tokens; left to itself XLA all-gathers them onto
    every device under FSDP (1.1 GiB per block at 256² × 64 examples). Constraining only
    the residual stream is not enough: XLA 0.10.2 then partitions ``h + gate · mlp(…)``
    wrongly on a data × fsdp × tensor mesh (results off by 100 %, on CPU), so every
    activation that meets the residual stream is constrained too."""
    return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def _norm_kw(cfg, rngs):
    return dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


def _kw(cfg, rngs, init="xavier_uniform"):
    return dict(_norm_kw(cfg, rngs), kernel_init=init)


class TimestepEmbedder(nnx.Module):
    """``MLP(sinusoid(t))``. With more timesteps than the schedule has (training: every token
    draws its own ``t``), the MLP runs once per schedule step and each token gathers its row:
    the same values for a fraction of the work (4096 tokens against 1000 steps in the demo)."""

    def __init__(self, cfg: DiffLossConfig, *, rngs: nnx.Rngs):
        self.freq_dim, self.num_steps = cfg.freq_dim, cfg.num_steps
        init = jax.nn.initializers.normal(0.02)
        self.fc1 = Dense(cfg.freq_dim, cfg.width, in_axes=(None,), out_axes=("mlp",), **_kw(cfg, rngs, init))
        self.fc2 = Dense(cfg.width, cfg.width, in_axes=("mlp",), out_axes=("embed",), **_kw(cfg, rngs, init))

    def __call__(self, t):
        if t.ndim == 1 and t.shape[0] > self.num_steps and jnp.issubdtype(t.dtype, jnp.integer):
            return jnp.take(self._mlp(jnp.arange(self.num_steps)), t, axis=0)
        return self._mlp(t)

    def _mlp(self, t):
        return self.fc2(jax.nn.silu(self.fc1(timestep_embedding(t, self.freq_dim))))


class MLP(nnx.Module):
    def __init__(self, cfg: DiffLossConfig, *, rngs: nnx.Rngs):
        self.fc1 = Dense(cfg.width, cfg.width, in_axes=("embed",), out_axes=("mlp",), **_kw(cfg, rngs))
        self.fc2 = Dense(cfg.width, cfg.width, in_axes=("mlp",), out_axes=("embed",), **_kw(cfg, rngs))

    def __call__(self, x):
        return self.fc2(jax.nn.silu(self.fc1(x)))


class ResBlock(nnx.Module):
    def __init__(self, cfg: DiffLossConfig, *, rngs: nnx.Rngs):
        self.in_ln = LayerNorm(cfg.width, eps=1e-6, **_norm_kw(cfg, rngs))
        self.mlp = MLP(cfg, rngs=rngs)
        self.ada = Dense(cfg.width, (3, cfg.width), in_axes=("embed",), out_axes=(None, "mlp"),
                         **_kw(cfg, rngs, "zeros"))

    def __call__(self, x, y):
        mod = _tokens(self.ada(jax.nn.silu(y)))
        shift, scale, gate = mod[..., 0, :], mod[..., 1, :], mod[..., 2, :]
        return _tokens(x + gate * _tokens(self.mlp(self.in_ln(x) * (1 + scale) + shift)))


class FinalLayer(nnx.Module):
    def __init__(self, cfg: DiffLossConfig, *, rngs: nnx.Rngs):
        self.norm = LayerNorm(cfg.width, eps=1e-6, use_scale=False, use_bias=False, **_norm_kw(cfg, rngs))
        self.ada = Dense(cfg.width, (2, cfg.width), in_axes=("embed",), out_axes=(None, "mlp"),
                         **_kw(cfg, rngs, "zeros"))
        self.linear = Dense(cfg.width, 2 * cfg.in_channels, in_axes=("embed",), out_axes=(None,),
                            **_kw(cfg, rngs, "zeros"))

    def __call__(self, x, y):
        mod = _tokens(self.ada(jax.nn.silu(y)))
        return self.linear(self.norm(x) * (1 + mod[..., 1, :]) + mod[..., 0, :])


class SimpleMLPAdaLN(nnx.Module):
    """``net(x_t (N, C), t (N,), c (N, z_channels))`` → ``(N, 2C)``."""

    def __init__(self, cfg: DiffLossConfig, *, rngs: nnx.Rngs):
        self.in_channels = cfg.in_channels
        self.time_embed = TimestepEmbedder(cfg, rngs=rngs)
        self.cond_embed = Dense(cfg.z_channels, cfg.width, in_axes=(None,), out_axes=("embed",), **_kw(cfg, rngs))
        self.input_proj = Dense(cfg.in_channels, cfg.width, in_axes=(None,), out_axes=("embed",), **_kw(cfg, rngs))
        self.res_blocks = make_blocks(lambda: ResBlock(cfg, rngs=rngs), cfg.depth, cfg.scan_layers)
        self.final_layer = FinalLayer(cfg, rngs=rngs)

    def __call__(self, x, t, c):
        y = _tokens(self.time_embed(t) + self.cond_embed(c))
        h = _tokens(self.input_proj(x))
        h, _ = run_blocks(lambda block, h, _: (block(h, y), None), self.res_blocks, h)
        return self.final_layer(h, y).astype(jnp.float32)

    def forward_with_cfg(self, x, t, c, cfg_scale):
        """Batch ``[cond; uncond]``: the first half's ``x`` feeds both; guided ``ε`` in both halves."""
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half]), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond, uncond = jnp.split(eps, 2)
        guided = uncond + cfg_scale * (cond - uncond)
        return jnp.concatenate([jnp.concatenate([guided, guided]), rest], axis=-1)


@functools.cache
def _schedule(num_steps: int, max_beta: float, respacing: str | None, prediction: str) -> diffusion.Schedule:
    return diffusion.make_schedule(num_steps, "cosine", max_beta, respacing, prediction)


class DiffLoss(nnx.Module):
    def __init__(self, cfg: DiffLossConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.net = SimpleMLPAdaLN(cfg, rngs=rngs)

    @property
    def train_schedule(self) -> diffusion.Schedule:
        return _schedule(self.config.num_steps, self.config.max_beta, None, self.config.prediction)

    @property
    def sample_schedule(self) -> diffusion.Schedule:
        return _schedule(self.config.num_steps, self.config.max_beta, self.config.sampling_steps,
                         self.config.prediction)

    def loss(self, target, z, mask, key) -> jax.Array:
        """Mean diffusion loss over tokens with ``mask == 1``. ``target (N, C)``, ``z (N, Z)``,
        ``mask (N,)``; each token is repeated ``batch_mul`` times with its own ``t`` and noise."""
        m = self.config.batch_mul
        target, z, mask = (_tokens(jnp.repeat(a, m, axis=0)) for a in (target, z, mask))
        k_t, k_n = jax.random.split(key)
        t = _tokens(jax.random.randint(k_t, (target.shape[0],), 0, self.config.num_steps))
        noise = _tokens(jax.random.normal(k_n, target.shape, jnp.float32))
        per_token, _ = diffusion.training_losses(self.train_schedule, lambda x, tt: self.net(x, tt, z),
                                                 target.astype(jnp.float32), t, noise)
        mask = mask.astype(jnp.float32)
        return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def sample(self, z, key, temperature=1.0, cfg=None, *, xt_temperature=1.0, ddim=False,
               ddim_xt_scale=1.0, record: bool = False):
        """Token latents for conditions ``z (N, Z)``: ``(N, C)``. With a guidance scale
        ``cfg`` (a float or a traced scalar) ``z`` is ``[cond; uncond]`` and the ``N/2``
        guided tokens are returned (both halves share their noise).

        The chain starts from ``x_T = xt_temperature · N(0, I)`` and adds ``temperature``-scaled
        noise per DDPM step. ``ddim`` (a Python or traced boolean): decode deterministically
        with DDIM, ``η = 0`` (:func:`diffusion.ddim_step`), from ``x_T = ddim_xt_scale · N(0, I)``
        instead. All of them may be traced: changing them does not recompile.

        ``record=True`` returns ``(tokens, path)`` with the DDPM path of the returned tokens
        (:func:`diffusion.p_sample_loop`; guided: the first half's ``x``, variance and noise; its
        mean is the guided one), for GRPO's log-probabilities."""
        C = self.config.in_channels
        k0, k1 = jax.random.split(key)
        if isinstance(ddim, bool):
            scale = ddim_xt_scale if ddim else xt_temperature
        else:
            scale = jnp.where(ddim, ddim_xt_scale, xt_temperature)
        scale = jnp.asarray(scale, jnp.float32)
        if cfg is not None:
            half = jax.random.normal(k0, (z.shape[0] // 2, C), jnp.float32) * scale
            noise = jnp.concatenate([half, half])
            net = lambda x, t: self.net.forward_with_cfg(x, t, z, cfg)  # noqa: E731
        else:
            noise = jax.random.normal(k0, (z.shape[0], C), jnp.float32) * scale
            net = lambda x, t: self.net(x, t, z)  # noqa: E731
        out = diffusion.p_sample_loop(self.sample_schedule, net, noise, k1, temperature, ddim, record)
        if cfg is None:
            return out
        n = z.shape[0] // 2
        if record:
            x, path = out
            return x[:n], {k: v[:, :n] for k, v in path.items()}
        return out[:n]
