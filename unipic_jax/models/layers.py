"""Building blocks shared by every model: parameters with logical sharding, a dense
layer over grouped axes, RMSNorm, rotary embeddings and the one attention function.

Layouts: activations are ``(batch, length, ...)``; attention tensors are
``(B, T, heads, head_dim)`` (the layout ``jax.nn.dot_product_attention`` takes).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = jax.nn.initializers.Initializer


class PresetConfig:
    """``replace`` and ``preset`` for the frozen config dataclasses; each model module
    defines ``PRESETS`` (name → config) next to its config class."""

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    @classmethod
    def preset(cls, name: str, **overrides):
        presets = sys.modules[cls.__module__].PRESETS
        if name not in presets:
            raise ValueError(f"Unknown {cls.__name__} preset {name!r}; choose from {sorted(presets)}")
        return presets[name].replace(**overrides)

    @classmethod
    def from_dict(cls, d: Mapping):
        """Rebuilds a config from ``dataclasses.asdict`` output (e.g. read back from JSON):
        nested config dicts become their dataclasses and lists become tuples."""
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
        kw = {}
        for name, value in d.items():
            sub = [t for t in (typing.get_args(hints[name]) or (hints[name],)) if dataclasses.is_dataclass(t)]
            if isinstance(value, Mapping) and sub:
                kw[name] = sub[0].from_dict(value)
            else:
                kw[name] = _tuples(value)
        return cls(**kw)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    logical_axes: Sequence[str | None],
    dtype: jnp.dtype,
) -> nnx.Param:
    """An ``nnx.Param`` annotated with logical axis names (see ``unipic_jax.sharding``).

    Eager sharding is off: placement happens in ``sharding.create_sharded`` /
    ``shard_module`` so the same module code runs with and without a mesh.
    """
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical_axes)} differ in rank")
    return nnx.Param(
        init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(logical_axes), eager_sharding=False
    )


class Dense(nnx.Module):
    """``y = x · Wᵀ + b`` contracting the last ``len(in_features)`` axes of ``x``.

    ``kernel``: ``(*out_features, *in_features)``, i.e. PyTorch's ``nn.Linear`` layout
    ``(out, in)`` with the flat axes split (e.g. ``(heads, head_dim, embed)`` for a query
    projection). XLA:CPU multiplies this layout faster than ``(in, out)`` (and TPU/GPU
    compilers choose their own layouts), and it makes conversion a pure reshape. Keeping
    the head axis separate lets tensor parallelism split heads. ``bias``: ``out_features``.
    Computation happens in ``dtype``; parameters are stored in ``param_dtype``.
    ``kernel_init``: an initializer, ``"xavier_uniform"`` (fans are the products of the
    in / out axes, as for the flat PyTorch matrix), ``"zeros"``, or LeCun normal by default.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        in_axes: Sequence[str | None],
        out_axes: Sequence[str | None],
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init: Initializer | str | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = (in_features,) if isinstance(in_features, int) else tuple(in_features)
        self.out_features = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        self.dtype = dtype
        n_out = len(self.out_features)
        axes = dict(in_axis=tuple(range(n_out, n_out + len(self.in_features))), out_axis=tuple(range(n_out)))
        if kernel_init is None or isinstance(kernel_init, str):
            kernel_init = {None: jax.nn.initializers.lecun_normal(**axes),
                           "xavier_uniform": jax.nn.initializers.xavier_uniform(**axes),
                           "zeros": jax.nn.initializers.zeros}[kernel_init]
        self.kernel = param(
            rngs, kernel_init, self.out_features + self.in_features, tuple(out_axes) + tuple(in_axes), param_dtype
        )
        self.bias = (
            param(rngs, jax.nn.initializers.zeros, self.out_features, tuple(out_axes), param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_features)
        if x.shape[x.ndim - n_in :] != self.in_features:
            raise ValueError(f"Dense expects trailing dims {self.in_features}, got input of shape {x.shape}")
        batch = x.shape[: x.ndim - n_in]
        k = self.kernel[...].astype(self.dtype).reshape(-1, math.prod(self.in_features))
        y = jnp.einsum("...i,oi->...o", x.astype(self.dtype).reshape(*batch, -1), k)
        y = y.reshape(*batch, *self.out_features)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class MLPProjector(nnx.Module):
    """``Linear → SiLU → Linear``: UniPic's projectors (``proj_in``, ``proj_out``,
    ``siglip2_proj``) between the vision encoders, MAR and the LLM. Kernels ``(out, in)``;
    PyTorch keys ``{0,2}.{weight,bias}`` of an ``nn.Sequential``. ``out_kernel_init``: the
    second layer's ``Dense`` ``kernel_init``."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 out_kernel_init: Initializer | str | None = None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(in_dim, hidden, in_axes=("embed",), out_axes=("mlp",), **kw)
        self.fc2 = Dense(hidden, out_dim, in_axes=("mlp",), out_axes=("embed",), kernel_init=out_kernel_init, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(x)))


class RMSNorm(nnx.Module):
    """``y = scale · x / sqrt(mean(x²) + eps)``, normalised in float32 then cast back
    to the compute dtype before the scale (as transformers' Qwen2RMSNorm does)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nnx.Module):
    """``y = (x - mean) / sqrt(var + eps) · scale + bias`` over the last axis, in float32
    (as PyTorch's ``nn.LayerNorm`` does for half-precision inputs), output in ``dtype``.
    ``use_scale=use_bias=False`` gives the non-affine form."""

    def __init__(self, dim: int, *, eps: float = 1e-6, use_scale: bool = True, use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",), param_dtype) if use_scale else None
        self.bias = param(rngs, jax.nn.initializers.zeros, (dim,), ("norm",), param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def resize_weights(out_size, in_size: int, max_out: int, antialias: bool = True) -> jax.Array:
    """Row ``i < out_size`` holds the weights that PyTorch's ``interpolate(mode="bilinear",
    align_corners=False, antialias=...)`` gives output ``i`` over the ``in_size`` inputs.

    With ``s = in/out``: antialiased, the weight of input ``j`` is the triangle
    ``max(0, 1 − |(j + ½ − s(i + ½))/max(s, 1)|)`` (downsampling averages over ``s``
    inputs); without, it is ``max(0, 1 − |j − max(s(i + ½) − ½, 0)|)`` (two-tap linear
    interpolation at half-pixel centres). Rows are normalised, which reproduces the edge
    clamping. ``out_size`` may be traced; rows ``≥ out_size`` are zero. ``(max_out, in_size)``
    float32.
    """
    out_size = jnp.asarray(out_size, jnp.float32)
    scale = in_size / out_size
    i = jnp.arange(max_out, dtype=jnp.float32)[:, None]
    j = jnp.arange(in_size, dtype=jnp.float32)[None, :]
    centre = scale * (i + 0.5)
    if antialias:
        w = jnp.maximum(0.0, 1.0 - jnp.abs((j + 0.5 - centre) / jnp.maximum(scale, 1.0)))
    else:
        w = jnp.maximum(0.0, 1.0 - jnp.abs(j - jnp.maximum(centre - 0.5, 0.0)))
    w = w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-30)
    return jnp.where(i < out_size, w, 0.0)


def resize_grid(grid: jax.Array, height: int, width: int, antialias: bool = False) -> jax.Array:
    """Bilinear resize of a ``(h, w, C)`` grid (e.g. position embeddings) to ``(height, width, C)``."""
    ry = resize_weights(height, grid.shape[0], height, antialias)
    rx = resize_weights(width, grid.shape[1], width, antialias)
    return jnp.einsum("iy,jx,yxc->ijc", ry, rx, grid.astype(jnp.float32)).astype(grid.dtype)


def rope_sin_cos(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Rotary tables for integer ``positions (B, T)``: ``sin, cos`` of shape ``(B, T, head_dim)``.

    Frequencies ``θ^(-2i/d)`` for ``i < d/2``, duplicated across the two halves
    (the half-split layout of transformers' ``rotate_half``). Float32.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.sin(emb), jnp.cos(emb)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """``x · cos + rotate_half(x) · sin`` with ``rotate_half([a, b]) = [-b, a]``; ``x (B, T, N, D)``."""
    sin, cos = sin[:, :, None, :].astype(x.dtype), cos[:, :, None, :].astype(x.dtype)
    a, b = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-b, a], axis=-1) * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
              bias: jax.Array | None = None) -> jax.Array:
    """Softmax attention with grouped KV heads, the project's only attention.

    ``q (B, T, N, D)``, ``k, v (B, S, K, D)`` with ``N % K == 0``; ``mask`` is a boolean
    ``(B, 1, T, S)`` (True = attend) or ``None``; ``bias`` a float ``(B, N, T, S)`` added to
    the logits (or ``None``). Logits and softmax run in float32; a fully masked row gives a
    uniform average rather than NaN. Returns ``(B, T, N, D)``.
    """
    B, T, N, D = q.shape
    K = k.shape[2]
    if N % K:
        raise ValueError(f"{N} query heads cannot share {K} key/value heads")
    q = q.reshape(B, T, K, N // K, D)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (D**-0.5)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32).reshape(bias.shape[0], K, N // K, T, -1)
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(B, T, N, D)


# -- repeated blocks: unrolled or stacked and scanned ---------------------------------------


def stack_blocks(blocks: Sequence[nnx.Module]) -> nnx.Module:
    """One module holding ``len(blocks)`` identical blocks: every parameter is the ``jnp.stack``
    of the blocks' parameters, ``(L, *shape)``, with the logical axis ``"layers"`` first in its
    ``out_sharding``. Built from the same blocks (same initialisation order) as the unrolled
    ``nnx.List``, so a seed gives the same weights in both forms."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.split(b)[1] for b in blocks]

    def stack(*vs):
        names = vs[0].get_metadata().get("out_sharding")
        out = vs[0].replace(jnp.stack([v.get_value() for v in vs]))
        if names is not None:
            out.set_metadata(out_sharding=("layers",) + tuple(names))
        return out

    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def make_blocks(make: Callable[[], nnx.Module], n: int, scan: bool) -> nnx.Module:
    """``n`` blocks from ``make()``: an ``nnx.List`` (parameters ``i.…``) or, with ``scan``, one
    stacked module (parameters ``…`` with a leading ``n`` axis, see :func:`stack_blocks`)."""
    blocks = [make() for _ in range(n)]
    return stack_blocks(blocks) if scan else nnx.List(blocks)


def run_blocks(fn: Callable, blocks: nnx.Module, carry, xs=None, *, remat: bool = False, policy=None):
    """``carry, y_i = fn(block_i, carry, x_i)`` for each block in order; returns ``(carry, ys)``.

    Unrolled (``blocks`` an ``nnx.List``): ``xs`` is a sequence with one entry per block (or
    ``None``) and ``ys`` a list. Stacked (:func:`stack_blocks`): one ``jax.lax.scan`` over the
    leading axis of the module's state (split once, each step merges its slice back into a
    block, as ``nnx.scan`` does, and works where the module was closed over by an enclosing
    ``lax.while_loop``); ``xs`` is a pytree with that leading axis (or ``None``) and ``ys`` is
    stacked the same way. ``remat`` recomputes each block's activations in the backward pass, keeping
    what ``policy`` (a ``jax.checkpoint_policies`` entry, or ``None``: nothing) allows
    (``jax.checkpoint`` over the block's arrays, so it also works inside an enclosing
    ``lax.while_loop`` that closed over the module).
    """
    if isinstance(blocks, nnx.List):
        ys = []
        for i, block in enumerate(blocks):
            x = None if xs is None else xs[i]
            if remat:
                graphdef, state = nnx.split(block)

                def step(state, carry, x, graphdef=graphdef):
                    return fn(nnx.merge(graphdef, state), carry, x)

                carry, y = jax.checkpoint(step, policy=policy)(nnx.State(nnx.to_pure_dict(state)), carry, x)
            else:
                carry, y = fn(block, carry, x)
            ys.append(y)
        return carry, ys
    graphdef, state = nnx.split(blocks)
    state = nnx.State(nnx.to_pure_dict(state))  # arrays only: each step rebuilds fresh Variables

    def body(carry, layer_xs):
        layer_state, x = layer_xs
        return fn(nnx.merge(graphdef, layer_state), carry, x)

    if remat:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    return jax.lax.scan(body, carry, (state, xs))

