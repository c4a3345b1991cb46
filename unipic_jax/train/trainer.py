"""The training loop: runs the stages of a config (:mod:`unipic_jax.train.stages`) on a model.

For each stage: the Grain pipeline of its data (:mod:`unipic_jax.data.pipeline`), its
optimizer, the train state and the jitted step of its kind (:mod:`unipic_jax.train.step`),
then ``steps`` updates of ``accumulate`` micro-batches each. The data of a micro-batch is a
pure function of its index and its randomness of the global micro-batch count, so a run
killed at any point and restarted with the same command ends bit-identical to an
uninterrupted one (on one process; across processes as far as the collectives are
deterministic).

Checkpoints (:mod:`unipic_jax.train.checkpointing`) are written every ``checkpoint_every``
updates, at the end of each stage and on SIGTERM (after the update in flight), keeping the
last ``keep``; on restart the newest checkpoint that restores is used. Every ``log_every``
updates the figures (means over the update's micro-batches, and the count of texts the
pipeline shortened in this call, over all processes) go to ``metrics.jsonl``,
TensorBoard and the progress bar (:mod:`unipic_jax.train.metrics`). A non-finite loss stops
the run at the next log or checkpoint, naming the step and the loss parts; the step froze the
state at the last finite update, and no checkpoint is written from it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from unipic_jax import sharding
from unipic_jax.data import pipeline as pipeline_lib
from unipic_jax.train import optim
from unipic_jax.train.checkpointing import Checkpoints, as_variables
from unipic_jax.train.metrics import RunLog
from unipic_jax.train.stages import Stage, set_vae_scale
from unipic_jax.train.step import init_state, make_train_step

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or infinite."""


@dataclasses.dataclass
class RunResult:
    steps: int
    last_metrics: dict[str, float]
    history: list[dict[str, float]]
    stopped: bool = False  # by SIGTERM or max_steps


class Trainer:
    """Runs the stages of a config on a model (see the module docstring)."""

    def __init__(self, model, stages: list[Stage], sources: dict, tokenizer, workdir: str | os.PathLike, *,
                 seed: int = 0, log_every: int = 10, checkpoint_every: int = 100, keep: int = 3,
                 sample_every: int = 0, sample_fn=None, progress: bool = True, tensorboard: bool = True):
        self.model, self.stages, self.sources, self.tok = model, stages, sources, tokenizer
        self.workdir = Path(workdir)
        self.seed, self.log_every, self.progress = seed, log_every, progress
        self.sample_every, self.sample_fn = sample_every, sample_fn
        self.checkpoint_every, self.tensorboard = checkpoint_every, tensorboard
        self.ckpt = Checkpoints(self.workdir / "checkpoints", checkpoint_every, keep)
        self.mesh = sharding.mesh_of(model)
        self.log: RunLog | None = None
        self._stop = False

    def _on_sigterm(self, *_):
        log.warning("SIGTERM: saving a checkpoint after the current update, then stopping")
        self._stop = True

    def offsets(self) -> list[int]:
        """Global update step at which each stage starts."""
        return [sum(s.steps for s in self.stages[:i]) for i in range(len(self.stages))]

    def _micro_offsets(self) -> list[int]:
        return [sum(s.batches for s in self.stages[:i]) for i in range(len(self.stages))]

    def _resume_point(self):
        names = [s.name for s in self.stages]
        for ckpt_step, meta in self.ckpt.metas():
            if meta.get("stage") not in names:
                log.warning("checkpoint %d is for stage %r, not in this config; skipped", ckpt_step, meta.get("stage"))
                continue
            if "vae_scale" in meta:
                set_vae_scale(self.model, float(meta["vae_scale"]))
            return names.index(meta["stage"]), int(meta["stage_step"]), ckpt_step
        return 0, 0, None

    def run(self, max_steps: int | None = None) -> RunResult:
        """Trains (resuming from the newest good checkpoint) until every stage is done, or
        ``max_steps`` updates have run in this call (a deliberate interruption, as a kill
        would be; the state at that update is checkpointed)."""
        graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        params = sharding.pure(params)  # plain arrays: jit's per-step flatten/unflatten stays cheap
        offsets, micro = self.offsets(), self._micro_offsets()
        start_stage, start_step, restored = self._resume_point()
        self.log = RunLog(self.workdir, resume_step=restored or 0, tensorboard=self.tensorboard)
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
                stacked = optim.stacked_leaves(nnx.state(self.model, nnx.Param))
                tx = stage.optimizer(params, stacked)
                with _mesh(self.mesh):
                    state = init_state(params, tx, stage, micro[si] + first * stage.accumulate,
                                       vae_scale=self.model.config.vae.scale)
                    if restored is not None and si == start_stage:
                        state = self.ckpt.restore(restored, state, it,
                                                  legacy=lambda s=state, st=stage: as_variables(s, self.model,
                                                                                                st.optimizer))
                        log.info("resumed from checkpoint %d (stage %s, update %d)", restored, stage.name, first)
                        restored = None
                    graphdef, _, rest = nnx.split(self.model, nnx.Param, ...)  # the config may have changed
                    make_step = stage.spec.make_step or make_train_step
                    step_fn = make_step(graphdef, rest, stage, tx, self.seed)
                    state, last, n, stop = self._run_stage(
                        si, stage, state, it, pipe, step_fn, first, history,
                        None if max_steps is None else max_steps - done_here,
                        view=lambda p, g=graphdef, r=rest: nnx.merge(g, p, r))
                done_here += n
                finished = not stop and first + n == stage.steps
                params = state["ema"] if (stage.ema and finished) else state["params"]
                if finished and stage.spec.finish is not None:
                    stage.spec.finish(self, stage, params, pipe)
                if stop:
                    return RunResult(offsets[si] + first + n, last, history, stopped=True)
            nnx.update(self.model, params)
            return RunResult(offsets[-1] + self.stages[-1].steps, last, history)
        finally:
            self.ckpt.wait()
            if old is not None:
                signal.signal(signal.SIGTERM, old)
            self.log.close()

    def _check_finite(self, stage: Stage, state, window: list[dict]):
        """Raises :class:`NonFiniteLoss` if the step flagged a non-finite micro-batch."""
        bad = int(jax.device_get(state["nonfinite"]))
        if bad < 0:
            return
        micro = self._micro_offsets()[self.stages.index(stage)]
        update = self.offsets()[self.stages.index(stage)] + (bad - micro) // stage.accumulate
        parts = {}
        for m in window:  # the first logged micro-batch with a non-finite figure
            host = {k: float(v) for k, v in jax.device_get(m).items()}
            parts = {k: v for k, v in host.items() if not math.isfinite(v)}
            if parts:
                break
        raise NonFiniteLoss(f"stage {stage.name}, global step {update + 1}: non-finite {sorted(parts) or ['loss']} "
                            f"({parts}); training stopped with the state of the update before it, and the last "
                            f"checkpoint in {self.ckpt.directory} is intact. Lower the learning rate or check the data.")

    def _run_stage(self, si, stage: Stage, state, it, pipe, step_fn, first: int, history, budget, view=None):
        offset = self.offsets()[si]
        examples = sum(stage.data.batch_size.values()) * stage.accumulate
        bar = None
        if self.progress and jax.process_index() == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=stage.steps, initial=first, desc=f"stage {stage.name}", unit="step", dynamic_ncols=True)
        last: dict[str, float] = {}
        window: list[dict] = []  # device metrics of the micro-batches since the last look
        n = 0
        t0 = time.perf_counter()
        try:
            for u in range(first, stage.steps):
                if budget is not None and n >= budget:
                    self._save(state, it, stage, u, force=True, window=window)
                    return state, last, n, True
                micro = []
                for _ in range(stage.accumulate):
                    host = next(it)
                    batch = {key: v for key, v in host.items() if key not in ("step", "bucket")}
                    batch = pipeline_lib.global_batch(batch, self.mesh) if self.mesh is not None else batch
                    state, metrics = step_fn(state, batch)
                    micro.append(metrics)
                window.extend(micro)
                n += 1
                step = offset + u + 1
                if (u + 1) % self.log_every == 0 or u + 1 == stage.steps:
                    self._check_finite(stage, state, window)
                    window = []
                    got = jax.device_get(micro)
                    last = {m: float(np.mean([g[m] for g in got])) for m in got[0]}
                    # texts shortened to max_text_len in this call's global batches so far (a collective)
                    last["truncated_texts"] = float(pipeline_lib.global_truncated(pipe, (u + 1) * stage.accumulate))
                    rate = n / max(time.perf_counter() - t0, 1e-9)
                    history.append({"step": step, **last})
                    self.log.scalars(stage.name, step, last, rate)
                    if bar is not None:
                        bar.set_postfix({**{m: f"{v:.4g}" for m, v in last.items()},
                                         "ex/s": f"{rate * examples:.1f}"}, refresh=False)
                if bar is not None:
                    bar.update(1)
                if self.sample_every and self.sample_fn and view and (u + 1) % self.sample_every == 0:
                    self.log.grid(self.sample_fn(view(state["ema"] if stage.ema else state["params"]), stage, step),
                                  stage.name, step)
                if (u + 1) % self.checkpoint_every == 0 or u + 1 == stage.steps or self._stop:
                    self._save(state, it, stage, u + 1, force=self._stop or u + 1 == stage.steps, window=window)
                    window = []
                if self._stop:
                    return state, last, n, True
        finally:
            if bar is not None:
                bar.close()
        return state, last, n, False

    def _save(self, state, it, stage: Stage, stage_step: int, force: bool, window):
        self._check_finite(stage, state, window)
        step = self.offsets()[self.stages.index(stage)] + stage_step
        meta = {"stage": stage.name, "stage_step": stage_step, "vae_scale": self.model.config.vae.scale}
        self.ckpt.save(step, state, it, meta, force=force)


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
