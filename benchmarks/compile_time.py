"""Compile time and per-device memory of one full-size training step on 8 simulated CPU devices.

    python -m benchmarks.compile_time --config configs/unipic_1p5b.py:ct
    python -m benchmarks.compile_time --config configs/unipic_1p5b.py:ct --config.model.overrides.llm.scan_layers=False

The stage's step is lowered with ``unipic_jax.train.aot.lower_train_step`` (the model built
abstractly, nothing allocated) on an FSDP mesh over the 8 devices and compiled ahead of time.
Progress goes to stderr; the last stdout line is a JSON object ``{"stage", "compile_s",
"lower_s", "temp_bytes_per_device", "argument_bytes_per_device", ...}`` from
``compiled.memory_analysis()``. ``compile_s`` is XLA's compile alone; ``lower_s`` the tracing
and lowering before it.
"""

from __future__ import annotations

import json
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any backend use

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file and stage, e.g. configs/unipic_1p5b.py:ct")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(_):
    from unipic_jax import sharding
    from unipic_jax.train import aot

    cfg = _CONFIG.value
    stage = cfg.stage_order[0]
    mesh = sharding.make_mesh({"data": 1, "fsdp": jax.device_count(), "tensor": 1})
    _log(f"lowering stage {stage} on {jax.device_count()} devices ...")
    t = time.perf_counter()
    lowered, info = aot.lower_train_step(cfg, mesh, stage)
    lower_s = time.perf_counter() - t
    _log(f"lowered in {lower_s:.1f}s ({info['params'] / 1e9:.2f}B parameters); compiling ...")
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    m = compiled.memory_analysis()
    _log(f"compiled in {compile_s:.1f}s")
    print(json.dumps({"stage": stage, "compile_s": round(compile_s, 1), "lower_s": round(lower_s, 1),
                      "temp_bytes_per_device": int(m.temp_size_in_bytes),
                      "argument_bytes_per_device": int(m.argument_size_in_bytes),
                      "output_bytes_per_device": int(m.output_size_in_bytes),
                      "alias_bytes_per_device": int(m.alias_size_in_bytes),
                      "devices": jax.device_count(), "params": info["params"]}), flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
