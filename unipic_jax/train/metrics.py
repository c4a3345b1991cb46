"""What a run reports: ``WORKDIR/metrics.jsonl``, TensorBoard, sample grids, run files.

Only process 0 writes (every process computes the same figures: losses are global means).

* ``WORKDIR/metrics.jsonl``: one JSON object a logged update, ``{"stage", "step", "loss", …}``
  with every logged figure (``step`` is the global update step). A resumed run first drops
  the lines after the checkpoint it resumes from (they will be logged again), then appends,
  so no step appears twice and any tool can compare runs.
* ``WORKDIR/tb``: the same scalars as ``{stage}/{name}``, ``perf/steps_per_s`` and the
  ``samples`` image (tensorboardX, no TensorFlow).
* ``WORKDIR/samples/{step:07d}_{stage}.png``: the periodic sample grids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import numpy as np

from unipic_jax import distributed

METRICS = "metrics.jsonl"


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of ``WORKDIR/metrics.jsonl`` (empty if there is none)."""
    path = Path(workdir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    """The run's metrics file, TensorBoard writer and sample grids (process 0 only)."""

    def __init__(self, workdir: Path, resume_step: int = 0, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.main = distributed.is_main()
        self.tb = None
        self._file = None
        if not self.main:
            return
        path = self.workdir / METRICS
        if path.exists():
            kept = [r for r in read_metrics(self.workdir) if int(r["step"]) <= resume_step]
            tmp = path.with_name(f".{METRICS}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)
        self._file = open(path, "a")  # noqa: SIM115  (held for the run)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.fspath(self.workdir / "tb"))

    def scalars(self, stage: str, step: int, metrics: dict[str, float], steps_per_s: float | None = None):
        if not self.main:
            return
        self._file.write(json.dumps({"stage": stage, "step": step, **metrics}) + "\n")
        self._file.flush()
        if self.tb is not None:
            for m, v in metrics.items():
                self.tb.add_scalar(f"{stage}/{m}", v, step)
            if steps_per_s is not None:
                self.tb.add_scalar("perf/steps_per_s", steps_per_s, step)

    def grid(self, grid, stage: str, step: int):
        """A uint8 ``(H, W, 3)`` sample grid: ``samples/{step}_{stage}.png`` and TensorBoard."""
        if not self.main or grid is None:
            return
        from unipic_jax import sample

        grid = np.asarray(grid, np.uint8)
        sample.save_png(grid[None], [self.workdir / "samples" / f"{step:07d}_{stage}.png"])
        if self.tb is not None:
            self.tb.add_image("samples", grid, step, dataformats="HWC")

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tb is not None:
            self.tb.flush()
