"""Training-step speed of the demo model on this CPU, and the compiled per-device memory of a
full-size step.

    python -m benchmarks.train_step speed  [--devices 1,8] [--steps 20]
    python -m benchmarks.train_step memory [--devices 8,64] [--size 256] [--batch N]

``speed``: the demo's generation stage (configs/demo.py, 32² bucket, batch 16) on 1 and on 8
simulated CPU devices (each count in its own process; 8 devices share the same 2 cores, so
this measures sharding overhead, not a speed-up); median step time after compilation, and
examples/s. ``memory``: the CT stage of configs/unipic_1p5b.py lowered and compiled ahead of
time with FSDP over N simulated devices; prints XLA's memory analysis per device. XLA:CPU
does not schedule for memory as the TPU/GPU compilers do, so its temporaries overstate what
an accelerator needs. ``--batch`` is the examples per task (default: one per device, so each
device holds the same share at every count). The compile takes 12-35 minutes on two cores
and hardly depends on the device count.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags


def speed_child(steps: int):
    import jax
    from flax import nnx

    from unipic_jax import sharding
    from unipic_jax.data import pipeline as P
    from unipic_jax.data import shapes_tokenizer
    from unipic_jax.models import unipic
    from unipic_jax.train import run
    from unipic_jax.train.stages import Stage
    from unipic_jax.train.step import init_state, make_train_step

    cfg = run.load_config("configs/demo.py")
    tok = shapes_tokenizer.build()
    mc = run.model_config(cfg, tok)
    n = jax.device_count()
    mesh = sharding.make_mesh({"data": 1, "fsdp": n, "tensor": 1}) if n > 1 else None
    model = sharding.create_sharded(lambda: unipic.UniPic(mc, rngs=nnx.Rngs(0)), mesh)
    stage = Stage.from_config("gen32", cfg.stages.gen32, mc, 0)
    pipe = P.Pipeline(run.build_sources(cfg, ["t2i"]), stage.data, tok, process_index=0, process_count=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = sharding.pure(params)  # as the trainer holds them
    tx = stage.optimizer(params)
    ctx = jax.set_mesh(mesh) if mesh is not None else None
    if ctx:
        ctx.__enter__()
    state = init_state(params, tx, stage, 0)
    step = make_train_step(graphdef, rest, stage, tx, 0)
    batches = []
    for k in range(steps + 1):
        b = {key: v for key, v in pipe[k].items() if key not in ("step", "bucket")}
        batches.append(P.global_batch(b, mesh) if mesh is not None else b)
    t = time.perf_counter()
    state, m = step(state, batches[0])
    jax.block_until_ready(m)
    first = time.perf_counter() - t
    times = []
    for b in batches[1:]:
        t = time.perf_counter()
        state, m = step(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps({"devices": n, "first_s": first, "step_s": med,
                      "examples_per_s": sum(stage.data.batch_size.values()) / med}))


def memory_child(size: int, batch: int):
    from unipic_jax import sharding
    from unipic_jax.train import aot, run

    c = run.load_config("configs/unipic_1p5b.py", "ct")
    st = c.stages.ct
    st.buckets, st.understanding_size = ((size, size),), (size, size)
    import jax

    batch = batch or jax.device_count()
    st.batch_size.t2i = st.batch_size.edit = st.batch_size.understanding = batch
    st.max_text_len.edit = st.max_text_len.understanding = (size // 16) ** 2 + 64 + 32

    mesh = sharding.make_mesh({"data": 1, "fsdp": jax.device_count(), "tensor": 1})
    t = time.perf_counter()
    lowered, info = aot.lower_train_step(c, mesh)
    t_lower = time.perf_counter() - t
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    gib = 2**30
    print(json.dumps({"devices": jax.device_count(), "batch": batch, "params": info["params"], "lower_s": t_lower,
                      "compile_s": time.perf_counter() - t - t_lower,
                      "argument_gib": m.argument_size_in_bytes / gib, "output_gib": m.output_size_in_bytes / gib,
                      "alias_gib": m.alias_size_in_bytes / gib, "temp_gib": m.temp_size_in_bytes / gib}))


flags.DEFINE_string("devices", None, "device counts (speed: 1,8; memory: 8)")
flags.DEFINE_integer("steps", 20, "timed training steps after the first (speed)")
flags.DEFINE_integer("size", 256, "square bucket resolution in pixels (memory)")
flags.DEFINE_integer("batch", 0, "examples per task (memory; default one per device)")
flags.DEFINE_integer("child", 0, "internal: measure in this process on this many simulated devices")


def main(argv):
    if len(argv) != 2 or argv[1] not in ("speed", "memory"):
        raise app.UsageError(f"takes one mode, speed or memory; got {argv[1:]}")
    args = flags.FLAGS
    mode = argv[1]
    if args.child:
        import jax

        import unipic_jax

        jax.config.update("jax_num_cpu_devices", args.child)
        unipic_jax.tune_cpu_malloc()  # as train.py does (on one device only)
        return speed_child(args.steps) if mode == "speed" else memory_child(args.size, args.batch)
    results = []
    for n in (int(d) for d in (args.devices or ("1,8" if mode == "speed" else "8")).split(",")):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.getcwd()}
        out = subprocess.run([sys.executable, __file__, mode, "--child", str(n), "--steps", str(args.steps),
                              "--size", str(args.size), "--batch", str(args.batch)], env=env, capture_output=True,
                             text=True, check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        print(lines[-1] if lines else f"devices={n} failed:\n{out.stderr[-2000:]}", flush=True)
        results.append(json.loads(lines[-1]) if lines else {"devices": n, "failed": True})
    print(json.dumps({"mode": mode, "results": results}))


if __name__ == "__main__":
    app.run(main)
