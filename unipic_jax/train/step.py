"""The train state and the jitted train step.

The state is ``{"params", "opt", "ema", "step", "vae_scale", "nonfinite"}``, every array on
the mesh (parameters and optimizer state sharded by the logical rules: FSDP over ``fsdp``,
heads/MLP over ``tensor``; the batch over ``data × fsdp``). ``step`` counts micro-batches
over the whole run (with ``accumulate = a`` a stage's update ``u`` reads micro-batches
``a·u … a·u + a − 1``); the randomness of a micro-batch is ``fold_in(key(seed), step)``.

One call of the step is one micro-batch: gradients, the optimizer (``optax.MultiSteps`` sums
``a`` micro-batches' gradients and applies one update on the last; the schedule counts
updates), and the EMA ``ema ← d·ema + (1 − d)·params`` only when an update was applied.
Non-finite losses are caught on device every micro-batch: from the first micro-batch whose
loss or gradient norm is not finite, ``nonfinite`` holds its ``step`` and parameters,
optimizer state and EMA stop changing, so the trainer can report it at its next look and a
broken state is never checkpointed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from unipic_jax.train import optim
from unipic_jax.train.stages import Stage


def make_train_step(graphdef, rest, stage: Stage, tx, seed: int):
    """``step(state, batch) → (state, metrics)``, jitted, donating the old state; ``step.lower``
    lowers it. The new state keeps the shardings of the state of the first call: left free, XLA
    may lay the outputs out differently from the inputs, and every later step then compiles again
    (30-50 s per step on a data × fsdp × tensor mesh)."""
    loss_of = stage.spec.loss

    def loss_fn(params, batch, key, state):
        return loss_of(nnx.merge(graphdef, params, rest), stage, batch, key, state)

    def step(state, batch):
        labels = optim.trainable_labels(state["params"], stage.trainable)  # static strings, computed at trace time
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        aux = {k: v for k, v in state.items() if k not in ("params", "opt", "ema")}
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, key, aux)
        grad_norm = optax.global_norm(grads)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = state["ema"]
        if stage.ema:
            moved = optim.ema_update(state["ema"], params, stage.ema, labels)
            ema = _select(optim.applied(opt, stage.accumulate), moved, ema)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        for v in parts.values():
            finite &= jnp.all(jnp.isfinite(v))
        ok = finite & (state["nonfinite"] < 0)
        new = _select(ok, {"params": params, "opt": opt, "ema": ema},
                      {k: state[k] for k in ("params", "opt", "ema")})
        nonfinite = jnp.where((state["nonfinite"] < 0) & ~finite, state["step"], state["nonfinite"])
        metrics = {"loss": loss, **parts, "grad_norm": grad_norm}
        return {**state, **new, "step": state["step"] + 1, "nonfinite": nonfinite}, metrics

    jitted = None

    def compiled(state):
        nonlocal jitted
        if jitted is None:
            # only on a mesh: pinning single-device arrays would make them "committed" and cost a compile
            shardings = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else None, state)
            jitted = jax.jit(step, donate_argnums=(0,), out_shardings=(shardings, None))
        return jitted

    def run(state, batch):
        return compiled(state)(state, batch)

    run.lower = lambda state, batch: compiled(state).lower(state, batch)
    return run


def _select(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def init_state(params, tx, stage: Stage, step: int, vae_scale: float = 1.0):
    """The state at micro-batch ``step``, every array on the parameters' mesh: scalars left
    off it (the step, Adam's counts) would come back from the first step on the mesh, a new
    input type, and the step would compile a second time."""
    opt = jax.jit(tx.init)(params)
    ema = jax.jit(lambda p: jax.tree.map(jnp.copy, p))(params) if stage.ema else None
    scalars = {"step": np.asarray(step, np.int32), "vae_scale": np.asarray(vae_scale, np.float32),
               "nonfinite": np.asarray(-1, np.int32)}
    mesh = next((x.sharding.mesh for x in jax.tree.leaves(params) if isinstance(x.sharding, NamedSharding)), None)
    if mesh is None:
        return {"params": params, "opt": opt, "ema": ema, **jax.tree.map(jnp.asarray, scalars)}
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {"params": params, "opt": opt, "ema": ema, **scalars}
    return jax.tree.map(lambda x: x if isinstance(getattr(x, "sharding", None), NamedSharding)
                        else jax.device_put(x, replicated), state)
