"""Optimizers for the training stages (Optax): AdamW with the recipe's no-decay groups, learning
rate schedules, gradient clipping and accumulation, frozen parts, and EMA.

Recipe (DESIGN §3): AdamW β = (0.9, 0.95), gradient clipping at global norm 1.0, weight decay
on every weight matrix except the diffusion head's (no decay on biases, norms or any other
1-D tensor, nor on any diffusion-head parameter); a linear warmup over a fraction of the
stage, then constant or cosine to zero. Parameters outside the stage's ``trainable``
prefixes get zero updates (``optax.set_to_zero``), so they stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine")


def path_of(path) -> str:
    """A pytree key path → ``"llm.layers.0.attn.q_proj.kernel"``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(p for p in parts if p != "value")


def schedule(lr: float, steps: int, warmup: float = 0.0, kind: str = "constant") -> optax.Schedule:
    """Linear warmup over ``warmup`` (a fraction of ``steps``), then ``kind``."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    w = int(round(warmup * steps))
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(w, 0), max(steps, w + 1), end_value=0.0)
    if w == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, w), optax.constant_schedule(lr)], [w])


def stacked_leaves(param_state):
    """``True`` for each parameter of an ``nnx.State`` of Variables whose first logical axis is
    ``"layers"`` (blocks stacked for ``nnx.scan``), as a tree shaped like
    ``sharding.pure(param_state)``."""
    from flax import nnx

    def f(v):
        names = v.get_metadata().get("out_sharding") or (None,)
        return bool(names[0] == "layers")

    return nnx.to_pure_dict(jax.tree.map(f, param_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def decay_mask(params, no_decay_prefixes: Sequence[str] = ("diffloss",), stacked=None):
    """True where weight decay applies: tensors of rank >= 2 outside ``no_decay_prefixes``.
    ``stacked`` (a tree of bools, :func:`stacked_leaves`) marks tensors with a leading layer
    axis, whose rank is counted without it (a stack of biases stays a bias)."""
    def f(p, x, s=False):
        return jnp.ndim(x) - int(s) >= 2 and not any(path_of(p).startswith(q) for q in no_decay_prefixes)

    if stacked is None:
        return jax.tree_util.tree_map_with_path(f, params)
    return jax.tree_util.tree_map_with_path(f, params, _like(stacked, params))


def _like(tree, params):
    """``tree`` (a nested dict) with the structure of ``params`` (an ``nnx.State`` or dict)."""
    return jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(tree))


def trainable_labels(params, trainable: Sequence[str]):
    """``"train"`` for parameters under one of the ``trainable`` prefixes (``("",)`` = all),
    ``"freeze"`` elsewhere."""
    def label(p, _):
        name = path_of(p)
        return "train" if any(name == t or name.startswith(t + ".") or t == "" for t in trainable) else "freeze"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(params, *, lr: float, steps: int, warmup: float = 0.0, kind: str = "constant",
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.95, clip: float = 1.0,
                   trainable: Sequence[str] = ("",), accumulate: int = 1,
                   stacked=None) -> optax.GradientTransformation:
    """The stage's optimizer (see the module docstring). ``steps`` counts updates: the
    schedule advances once per applied update. ``accumulate > 1`` averages that many
    micro-batches' gradients into one update (``optax.MultiSteps``). ``stacked``: see
    :func:`decay_mask`."""
    labels = trainable_labels(params, trainable)
    if not any(v == "train" for v in jax.tree.leaves(labels)):
        raise ValueError(f"trainable={tuple(trainable)} matches no parameter")
    tx = optax.chain(
        optax.clip_by_global_norm(clip) if clip else optax.identity(),
        optax.adamw(schedule(lr, steps, warmup, kind), b1=b1, b2=b2, weight_decay=weight_decay,
                    mask=decay_mask(params, stacked=stacked)),
    )
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return optax.MultiSteps(tx, accumulate).gradient_transformation() if accumulate > 1 else tx


def applied(opt_state, accumulate: int) -> jax.Array | bool:
    """Whether the update that produced ``opt_state`` was applied (``MultiSteps`` applies one
    every ``accumulate`` micro-batches and then resets its micro-step counter to 0)."""
    return True if accumulate <= 1 else opt_state.mini_step == 0


def ema_update(ema, params, decay: float, labels=None):
    """``ema ← decay · ema + (1 − decay) · params`` (float32 arithmetic, stored as ``ema``'s
    dtype) for trained parameters; frozen ones (``labels`` from :func:`trainable_labels`) are
    copied, so that they stay bit-identical."""
    def f(e, p, lab="train"):
        if lab != "train":
            return p
        return (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype)

    return jax.tree.map(f, ema, params) if labels is None else jax.tree.map(f, ema, params, labels)
