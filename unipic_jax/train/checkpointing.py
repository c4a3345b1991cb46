"""Train checkpoints: Orbax ``CheckpointManager`` over ``{"state", "data", "meta"}``.

Under ``WORKDIR/checkpoints/<global update step>/``: ``state`` (the train state of
:mod:`unipic_jax.train.step`, every process writing its own shards), ``data`` (the Grain
iterator's position, one file per process) and ``meta`` (``{"stage", "stage_step",
"vae_scale"}``, JSON). Saves are asynchronous and collective (every process calls
:meth:`Checkpoints.save` with the same step); Orbax writes into a temporary folder and
renames it when every process has finished, so a run killed mid-save leaves the previous
checkpoints intact, and :meth:`Checkpoints.metas` lists only finished ones (a checkpoint whose
meta cannot be read is reported and skipped).
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
from flax import nnx

from unipic_jax import sharding

log = logging.getLogger(__name__)


class Checkpoints:
    """Orbax ``CheckpointManager`` over ``{"state", "data", "meta"}``, keyed by global update step."""

    def __init__(self, directory: Path, every: int, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.every = every
        self.directory = directory.absolute()
        self.mgr = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True))

    def save(self, step: int, state, iterator, meta: dict, force: bool = False):
        import grain

        ocp = self.ocp
        if step in self.mgr.all_steps():
            return
        self.mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta)), force=force)

    def metas(self) -> list[tuple[int, dict]]:
        """``(step, meta)`` of every finished checkpoint, newest first (unreadable ones skipped)."""
        out = []
        for step in sorted(self.mgr.all_steps(), reverse=True):
            try:
                meta = self.mgr.restore(step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore()))["meta"]
                out.append((step, dict(meta)))
            except Exception as e:  # noqa: BLE001  (reported, then the previous one is tried)
                log.warning("checkpoint %d is unreadable (%s: %s); trying an older one", step, type(e).__name__, e)
        return out

    def restore(self, step: int, state, iterator, legacy=None):
        """The state of checkpoint ``step`` laid out as ``state`` (its shapes, dtypes and
        shardings); the iterator is moved to the checkpoint's position. ``legacy()``, if given,
        returns the state as older versions saved it (parameters as NNX Variables), tried when
        the current layout does not restore."""
        import grain

        ocp = self.ocp

        def load(target):
            return self.mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(target)), data=grain.checkpoint.CheckpointRestore(iterator)))[
                "state"]

        try:
            return load(state)
        except Exception as e:
            if legacy is not None:
                try:
                    old = load(legacy())
                    log.warning("checkpoint %d holds the state as NNX Variables (an older unipic-jax); converted", step)
                    return jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(old))  # Variables → values
                except Exception:  # noqa: BLE001  (the first error is the one to report)
                    pass
            raise RuntimeError(f"Checkpoint {step} in {self.directory} does not restore onto this config "
                               f"({type(e).__name__}: {e}). Move it away to start over.") from e

    def wait(self):
        self.mgr.wait_until_finished()

    def close(self):
        self.mgr.close()


def abstract(tree):
    """``tree`` with its arrays as ``ShapeDtypeStruct`` s (shardings kept): a restore target."""
    def f(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x

    return jax.tree.map(f, tree)


def as_variables(state, model, optimizer):
    """``state`` laid out as the trainer held it before :func:`sharding.pure`: parameters, EMA
    and the optimizer's moments as NNX Variables (values and shardings kept)."""
    _, template, _ = nnx.split(model, nnx.Param, ...)
    wrap = lambda p: jax.tree.map(lambda v, x: v.replace(x), template, p, is_leaf=sharding.is_variable)  # noqa: E731
    params = wrap(state["params"])
    return {**state, "params": params, "opt": jax.jit(optimizer(params).init)(params),
            "ema": None if state["ema"] is None else wrap(state["ema"])}
