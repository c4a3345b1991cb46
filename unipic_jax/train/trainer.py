"""The training loop: stages, the sharded train step, Orbax checkpoints that resume exactly.

A run is a sequence of **stages** (``cfg.stage_order``, each ``cfg.stages[name]``):

* ``kind="vae"``: the tokenizer's loss (``recon`` L1 or L2 reconstruction + ``kl_weight`` · KL) on the
  text-to-image images;
* ``kind="unipic"``: ``loss_weights`` · (text-to-image diffusion loss, editing loss,
  understanding cross-entropy), the VAE frozen (its latents under ``stop_gradient``).

Each stage sets what is trained (``trainable``: parameter-path prefixes, ``""`` = all; the rest
gets zero updates), its optimizer (lr, ``schedule`` constant/cosine, ``warmup`` fraction,
``weight_decay`` with the recipe's no-decay groups, AdamW β (0.9, 0.95), ``clip``,
``accumulate``), ``ema`` decay (0: none), and its data (``buckets``, per-task ``batch_size``,
``max_text_len``, ``understanding_size``): progressive resolution is a later stage with other
buckets. Parameters carry over between stages; optimizer state and EMA start afresh.

The state ``{"params", "opt", "ema", "step"}`` lives on the mesh (parameters and optimizer
state sharded by the logical rules: FSDP over ``fsdp``, heads/MLP over ``tensor``; the batch
over ``data × fsdp``). Randomness is ``fold_in(seed, global step)`` and the data of a step is
a pure function of its index, so a run killed at step k and restarted with the same command
ends bit-identical to an uninterrupted one. Checkpoints (Orbax ``CheckpointManager`` under
``WORKDIR/checkpoints``) hold the state, the Grain iterator and ``{"stage", "stage_step"}``;
they are written asynchronously every ``checkpoint_every`` steps, at the end of each stage
and on SIGTERM, keeping the last ``keep``. On restart the newest checkpoint that restores is
used (a corrupt one is reported and skipped). A non-finite loss stops the run, naming the
step and the loss part, without saving the broken state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from unipic_jax import sharding
from unipic_jax.data import pipeline as pipeline_lib
from unipic_jax.train import optim

log = logging.getLogger(__name__)
KINDS = ("vae", "unipic")


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or infinite."""


@dataclasses.dataclass
class Stage:
    name: str
    kind: str
    steps: int
    lr: float
    trainable: tuple[str, ...] = ("",)
    schedule: str = "constant"
    warmup: float = 0.0
    weight_decay: float = 0.0
    clip: float = 1.0
    accumulate: int = 1
    ema: float = 0.0
    kl_weight: float = 1e-6
    recon: str = "l1"  # vae stages: the pixel loss, "l1" (LDM) or "l2"
    calibrate_scale: bool = False  # vae stages: afterwards, set the latent scale to 1 / std(latents)
    loss_weights: dict[str, float] = dataclasses.field(default_factory=lambda: {"t2i": 1.0})
    data: pipeline_lib.PipelineConfig = dataclasses.field(default_factory=pipeline_lib.PipelineConfig)

    def optimizer(self, params):
        """The stage's optimizer over ``params``: AdamW with its schedule, clipping, no-decay
        groups, frozen parts and gradient accumulation (``optim.make_optimizer``)."""
        return optim.make_optimizer(params, lr=self.lr, steps=self.steps, warmup=self.warmup, kind=self.schedule,
                                    weight_decay=self.weight_decay, clip=self.clip, trainable=self.trainable,
                                    accumulate=self.accumulate)

    @classmethod
    def from_config(cls, name: str, c, model_cfg, seed: int) -> "Stage":
        c = dict(c)
        if c.get("kind") not in KINDS:
            raise ValueError(f"stage {name!r}: kind must be one of {KINDS}, got {c.get('kind')!r}")
        batch = {k: int(v) for k, v in dict(c.pop("batch_size")).items() if int(v) > 0}
        weights = {k: float(v) for k, v in dict(c.pop("loss_weights", {"t2i": 1.0})).items()}
        if c["kind"] == "unipic":
            batch = {k: v for k, v in batch.items() if weights.get(k, 0.0) > 0}
        data = pipeline_lib.PipelineConfig(
            buckets=tuple(tuple(b) for b in c.pop("buckets")), batch_size=batch,
            max_text_len={k: int(v) for k, v in dict(c.pop("max_text_len")).items()},
            understanding_size=tuple(c.pop("understanding_size")), latent_stride=model_cfg.vae.downsample,
            buffer_size=model_cfg.mar.buffer_size, caption_dropout=float(c.pop("caption_dropout", 0.1)), seed=seed)
        c["trainable"] = tuple(c.get("trainable", ("",)))
        return cls(name=name, loss_weights=weights, data=data, **c)


# -- losses and the step ----------------------------------------------------------------


def stage_loss(model, stage: Stage, batch: dict, key) -> tuple[jax.Array, dict]:
    """The stage's weighted loss and its parts (float32)."""
    if stage.kind == "vae":
        loss, parts = model.vae.loss(batch["t2i/pixels"], key, stage.kl_weight, stage.recon)
        return loss, parts
    enc = lambda x: jax.lax.stop_gradient(model.vae.encode(x))  # noqa: E731  (the VAE is frozen)
    keys = jax.random.split(key, 3)
    parts, total = {}, jnp.float32(0.0)
    w = stage.loss_weights
    if "t2i/pixels" in batch:
        parts["t2i"] = model.t2i_loss(batch["t2i/input_ids"], batch["t2i/attention_mask"],
                                      enc(batch["t2i/pixels"]), keys[0])
        total += w.get("t2i", 0.0) * parts["t2i"]
    if "edit/pixels" in batch:
        parts["edit"] = model.edit_loss(batch["edit/input_ids"], batch["edit/attention_mask"],
                                        enc(batch["edit/source"]), enc(batch["edit/pixels"]), keys[1])
        total += w.get("edit", 0.0) * parts["edit"]
    if "understanding/pixels" in batch:
        parts["understanding"] = model.understanding_loss(
            batch["understanding/input_ids"], batch["understanding/attention_mask"], batch["understanding/labels"],
            enc(batch["understanding/pixels"]))
        total += w.get("understanding", 0.0) * parts["understanding"]
    return total, parts


def make_train_step(graphdef, rest, stage: Stage, tx, seed: int):
    """``step(state, batch) → (state, metrics)``, jitted, donating the old state; ``step.lower``
    lowers it. The new state keeps the shardings of the state of the first call: left free, XLA
    may lay the outputs out differently from the inputs, and every later step then compiles again
    (30-50 s per step on a data × fsdp × tensor mesh)."""

    def loss_fn(params, batch, key):
        return stage_loss(nnx.merge(graphdef, params, rest), stage, batch, key)

    labels = None

    def step(state, batch):
        nonlocal labels
        labels = optim.trainable_labels(state["params"], stage.trainable)  # static strings, computed at trace time
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, key)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = optim.ema_update(state["ema"], params, stage.ema, labels) if stage.ema else state["ema"]
        metrics = {"loss": loss, **parts, "grad_norm": optax.global_norm(grads)}
        return {"params": params, "opt": opt, "ema": ema, "step": state["step"] + 1}, metrics

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


def init_state(params, tx, stage: Stage, step: int):
    """``{"params", "opt", "ema", "step"}``, every array on the parameters' mesh: scalars left
    off it (the step, Adam's counts) would come back from the first step on the mesh, a new
    input type, and the step would compile a second time."""
    opt = jax.jit(tx.init)(params)
    ema = jax.tree.map(jnp.copy, params) if stage.ema else None
    state = {"params": params, "opt": opt, "ema": ema, "step": jnp.asarray(step, jnp.int32)}
    mesh = next((x.sharding.mesh for x in jax.tree.leaves(params) if isinstance(x.sharding, NamedSharding)), None)
    if mesh is None:
        return state
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), state)


# -- checkpoints --------------------------------------------------------------------------


class Checkpoints:
    """Orbax ``CheckpointManager`` over ``{"state", "data", "meta"}``, keyed by global step."""

    def __init__(self, directory: Path, every: int, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.every = every
        self.mgr = ocp.CheckpointManager(
            directory.absolute(), item_names=("state", "data", "meta"),
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

    def restore(self, step: int, abstract_state, iterator):
        import grain

        ocp = self.ocp
        return self.mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator)))["state"]

    def wait(self):
        self.mgr.wait_until_finished()

    def close(self):
        self.mgr.close()


def _abstract(tree):
    def f(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x

    return jax.tree.map(f, tree)


# -- the loop -----------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    steps: int
    last_metrics: dict[str, float]
    history: list[dict[str, float]]
    stopped: bool = False  # by SIGTERM


class Trainer:
    """Runs the stages of a config on a model (see the module docstring)."""

    def __init__(self, model, stages: list[Stage], sources: dict, tokenizer, workdir: str | os.PathLike, *,
                 seed: int = 0, log_every: int = 10, checkpoint_every: int = 100, keep: int = 3,
                 sample_every: int = 0, sample_fn=None, progress: bool = True, tensorboard: bool = True):
        self.model, self.stages, self.sources, self.tok = model, stages, sources, tokenizer
        self.workdir = Path(workdir)
        self.seed, self.log_every, self.progress = seed, log_every, progress
        self.sample_every, self.sample_fn = sample_every, sample_fn
        self.ckpt = Checkpoints(self.workdir / "checkpoints", checkpoint_every, keep)
        self.checkpoint_every = checkpoint_every
        self.mesh = sharding.mesh_of(model)
        self.tb = None
        if tensorboard and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.fspath(self.workdir / "tb"))
        self._stop = False

    def _on_sigterm(self, *_):
        log.warning("SIGTERM: saving a checkpoint after the current step, then stopping")
        self._stop = True

    def offsets(self) -> list[int]:
        out, total = [], 0
        for s in self.stages:
            out.append(total)
            total += s.steps
        return out

    def run(self, max_steps: int | None = None) -> RunResult:
        """Trains (resuming from the newest good checkpoint) until every stage is done, or
        ``max_steps`` global steps have run in this call (a deliberate interruption, as a kill
        would be; the state at that step is checkpointed)."""
        graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        params = sharding.pure(params)  # plain arrays: jit's per-step flatten/unflatten stays cheap
        offsets = self.offsets()
        start_stage, start_step, restored = 0, 0, None
        for ckpt_step, meta in self.ckpt.metas():
            names = [s.name for s in self.stages]
            if meta.get("stage") not in names:
                log.warning("checkpoint %d is for stage %r, not in this config; skipped", ckpt_step, meta.get("stage"))
                continue
            start_stage, start_step, restored = names.index(meta["stage"]), int(meta["stage_step"]), ckpt_step
            if "vae_scale" in meta:
                set_vae_scale(self.model, float(meta["vae_scale"]))
            break
        history: list[dict[str, float]] = []
        last: dict[str, float] = {}
        done_here = 0
        old = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        try:
            for si in range(start_stage, len(self.stages)):
                stage = self.stages[si]
                first = start_step if si == start_stage else 0
                pipe = pipeline_lib.Pipeline({t: self.sources[t] for t in stage.data.batch_size}, stage.data, self.tok)
                it = pipe.iterator()
                tx = stage.optimizer(params)
                with _mesh(self.mesh):
                    state = init_state(params, tx, stage, offsets[si] + first)
                    if restored is not None and si == start_stage:
                        state = self._restore(restored, state, it, stage)
                        log.info("resumed from checkpoint %d (stage %s, step %d)", restored, stage.name, first)
                        restored = None
                    graphdef, _, rest = nnx.split(self.model, nnx.Param, ...)  # the config may have changed
                    step_fn = make_train_step(graphdef, rest, stage, tx, self.seed)
                    state, last, n, stop = self._run_stage(si, stage, state, it, step_fn, first, history,
                                                           None if max_steps is None else max_steps - done_here,
                                                           view=lambda p, g=graphdef, r=rest: nnx.merge(g, p, r))
                done_here += n
                params = state["ema"] if (stage.ema and not stop and first + n == stage.steps) else state["params"]
                if stage.kind == "vae" and stage.calibrate_scale and not stop and first + n == stage.steps:
                    self._calibrate(params, pipe)
                if stop:
                    return RunResult(offsets[si] + first + n, last, history, stopped=True)
            nnx.update(self.model, params)
            return RunResult(offsets[-1] + self.stages[-1].steps, last, history)
        finally:
            self.ckpt.wait()
            if old is not None:
                signal.signal(signal.SIGTERM, old)
            if self.tb is not None:
                self.tb.flush()

    def _restore(self, ckpt_step, state, it, stage: Stage):
        try:
            return self.ckpt.restore(ckpt_step, _abstract(state), it)
        except Exception as e:
            try:  # written before the state held plain arrays: parameters as NNX Variables
                legacy = self.ckpt.restore(ckpt_step, _abstract(self._as_variables(state, stage)), it)
                log.warning("checkpoint %d holds the state as NNX Variables (an older unipic-jax); converted",
                            ckpt_step)
                return jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(legacy))  # Variables → values
            except Exception:  # noqa: BLE001  (the first error is the one to report)
                pass
            raise RuntimeError(f"Checkpoint {ckpt_step} in {self.workdir / 'checkpoints'} does not restore onto this "
                               f"config ({type(e).__name__}: {e}). Move it away to start over.") from e

    def _as_variables(self, state, stage: Stage):
        """``state`` laid out as the trainer held it before :func:`sharding.pure`: parameters,
        EMA and the optimizer's moments as NNX Variables (values and shardings kept)."""
        _, template, _ = nnx.split(self.model, nnx.Param, ...)
        wrap = lambda p: jax.tree.map(lambda v, x: v.replace(x), template, p, is_leaf=sharding.is_variable)  # noqa: E731
        params = wrap(state["params"])
        return {**state, "params": params, "opt": jax.jit(stage.optimizer(params).init)(params),
                "ema": None if state["ema"] is None else wrap(state["ema"])}

    def _run_stage(self, si, stage: Stage, state, it, step_fn, first: int, history, budget, view=None):
        offset = self.offsets()[si]
        examples = sum(stage.data.batch_size.values())
        bar = None
        if self.progress and jax.process_index() == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=stage.steps, initial=first, desc=f"stage {stage.name}", unit="step", dynamic_ncols=True)
        last: dict[str, float] = {}
        n = 0
        t0 = time.perf_counter()
        try:
            for k in range(first, stage.steps):
                if budget is not None and n >= budget:
                    self._save(state, it, stage, k, force=True)
                    return state, last, n, True
                host = next(it)
                batch = {key: v for key, v in host.items() if key not in ("step", "bucket")}
                batch = pipeline_lib.global_batch(batch, self.mesh) if self.mesh is not None else batch
                new_state, metrics = step_fn(state, batch)
                if (k + 1) % self.log_every == 0 or k + 1 == stage.steps:
                    host_metrics = {m: float(v) for m, v in jax.device_get(metrics).items()}
                    bad = [m for m, v in host_metrics.items() if not math.isfinite(v)]
                    if bad:
                        raise NonFiniteLoss(f"stage {stage.name}, global step {offset + k}: non-finite {bad} "
                                            f"({ {m: host_metrics[m] for m in bad} }); the last checkpoint is intact")
                    last = host_metrics
                    dt = time.perf_counter() - t0
                    rate = (n + 1) / max(dt, 1e-9)
                    history.append({"step": offset + k + 1, **host_metrics})
                    if bar is not None:
                        bar.set_postfix({**{m: f"{v:.4g}" for m, v in host_metrics.items()},
                                         "ex/s": f"{rate * examples:.1f}"}, refresh=False)
                    if self.tb is not None:
                        for m, v in host_metrics.items():
                            self.tb.add_scalar(f"{stage.name}/{m}", v, offset + k + 1)
                        self.tb.add_scalar("perf/steps_per_s", rate, offset + k + 1)
                state = new_state
                n += 1
                if bar is not None:
                    bar.update(1)
                if self.sample_every and self.sample_fn and view and (k + 1) % self.sample_every == 0:
                    self._samples(view(state["ema"] if stage.ema else state["params"]), stage, offset + k + 1)
                if (k + 1) % self.checkpoint_every == 0 or k + 1 == stage.steps or self._stop:
                    self._save(state, it, stage, k + 1, force=self._stop or k + 1 == stage.steps)
                if self._stop:
                    return state, last, n, True
        finally:
            if bar is not None:
                bar.close()
        return state, last, n, False

    def _samples(self, model, stage: Stage, step: int):
        """``sample_fn(model, stage, step)`` → a uint8 ``(H, W, 3)`` grid (or None), written to
        ``WORKDIR/samples/{step}_{stage}.png`` and TensorBoard's ``samples`` image."""
        grid = self.sample_fn(model, stage, step)
        if grid is None or jax.process_index() != 0:
            return
        from unipic_jax import sample

        grid = np.asarray(grid, np.uint8)
        sample.save_png(grid[None], [self.workdir / "samples" / f"{step:07d}_{stage.name}.png"])
        if self.tb is not None:
            self.tb.add_image("samples", grid, step, dataformats="HWC")

    def _save(self, state, it, stage: Stage, stage_step: int, force: bool):
        step = self.offsets()[self.stages.index(stage)] + stage_step
        meta = {"stage": stage.name, "stage_step": stage_step, "vae_scale": self.model.config.vae.scale}
        self.ckpt.save(step, state, it, meta, force=force)

    def _calibrate(self, params, pipe, batches: int = 4):
        """Latent scale = 1 / std of the (unscaled) posterior means of the stage's first batches,
        so the generator sees unit-variance tokens (as Stable Diffusion's scaling factor does)."""
        nnx.update(self.model, params)
        means = [np.asarray(jax.jit(lambda x: self.model.vae.posterior(x)[0])(pipe[k]["t2i/pixels"]))
                 for k in range(batches)]
        std = float(np.concatenate([m.ravel() for m in means]).std())
        set_vae_scale(self.model, 1.0 / max(std, 1e-6))
        log.info("VAE latent scale calibrated: std %.4f -> scale %.4f", std, self.model.config.vae.scale)


def set_vae_scale(model, scale: float):
    """Sets the VAE's latent scale (a static config field) on a UniPic model."""
    cfg = model.config
    model.vae.config = cfg.vae.replace(scale=scale)
    model.config = dataclasses.replace(cfg, vae=model.vae.config)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _mesh:
    """``jax.set_mesh(mesh)`` when there is a mesh."""

    def __init__(self, mesh):
        self.mesh, self.ctx = mesh, None

    def __enter__(self):
        if self.mesh is not None:
            self.ctx = jax.set_mesh(self.mesh)
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def write_json(path: Path, obj: Any):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)

