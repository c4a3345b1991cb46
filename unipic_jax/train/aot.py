"""Ahead-of-time lowering of a training step from a config, without any full-size array.

The model is built with ``nnx.eval_shape``; parameters, optimizer state (each optimizer
leaf takes the sharding of the parameter it tracks), EMA and the batch become
``ShapeDtypeStruct`` s with their shardings on the mesh; the jitted train step is lowered and
(optionally) compiled for them. This checks that a full-size config fits together on a pod
layout and, compiled, gives XLA's per-device memory analysis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from unipic_jax import sharding
from unipic_jax.models import unipic
from unipic_jax.train import optim
from unipic_jax.train.run import base_model_config as model_config
from unipic_jax.train.stages import Stage
from unipic_jax.train.step import make_train_step


def _sds(shape, dtype, mesh, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def abstract_batch(stage: Stage, mesh, bucket: int = 0) -> dict:
    d = stage.data
    H, W = d.buckets[bucket]
    Hu, Wu = d.understanding_size
    out = {}

    def batch_spec(shape):
        return sharding.logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh)

    def add(name, shape, dtype):
        out[name] = _sds(shape, dtype, mesh, batch_spec(shape))

    for task, B in d.batch_size.items():
        T = d.max_text_len[task]
        if task == "understanding":
            add("understanding/pixels", (B, Hu, Wu, 3), jnp.float32)
            add("understanding/labels", (B, T), jnp.int32)
        else:
            add(f"{task}/pixels", (B, H, W, 3), jnp.float32)
            if task == "edit":
                add("edit/source", (B, H, W, 3), jnp.float32)
        add(f"{task}/input_ids", (B, T), jnp.int32)
        add(f"{task}/attention_mask", (B, T), jnp.bool_)
    return out


def _opt_shardings(opt_abstract, params_abstract, mesh):
    """Each optimizer leaf takes the sharding of the parameter whose path ends its own path
    (Adam's moments mirror the parameters); scalars and the rest are replicated."""
    by_path = {optim.path_of(p): (x.shape, x.sharding)
               for p, x in jax.tree_util.tree_flatten_with_path(params_abstract)[0]}

    def f(path, x):
        name = optim.path_of(path)
        for p, (shape, s) in by_path.items():
            if name.endswith(p) and x.shape == shape:
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec()))

    return jax.tree_util.tree_map_with_path(f, opt_abstract)


def lower_train_step(cfg, mesh, stage_name: str | None = None, bucket: int = 0):
    """``(lowered, info)`` for one train step of ``cfg``'s stage on ``mesh``."""
    mc = model_config(cfg)
    name = stage_name or cfg.stage_order[0]
    stage = Stage.from_config(name, cfg.stages[name], mc, cfg.seed)
    abstract_model = nnx.eval_shape(lambda: unipic.UniPic(mc, rngs=nnx.Rngs(0)))  # logical names stay names
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    with jax.set_mesh(mesh):
        shardings = sharding.state_shardings(params, mesh)
        params = sharding.pure(jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                            params, shardings))  # as the trainer feeds it
        tx = stage.optimizer(params, optim.stacked_leaves(nnx.state(abstract_model, nnx.Param)))
        opt = _opt_shardings(jax.eval_shape(tx.init, params), params, mesh)
        scalar = lambda dtype: _sds((), dtype, mesh, PartitionSpec())  # noqa: E731
        state = {"params": params, "opt": opt, "ema": params if stage.ema else None, "step": scalar(jnp.int32),
                 "vae_scale": scalar(jnp.float32), "nonfinite": scalar(jnp.int32)}
        batch = abstract_batch(stage, mesh, bucket)
        step = make_train_step(graphdef, rest, stage, tx, cfg.seed)
        lowered = step.lower(state, batch)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return lowered, {"params": n_params, "stage": name, "bucket": stage.data.buckets[bucket],
                     "batch": dict(stage.data.batch_size)}
