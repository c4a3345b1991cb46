"""Text-to-image sampling speed on this machine: seconds per image by preset, resolution and
``num_iter``, with compile time reported separately.

    python -m benchmarks.sample_speed [--presets tiny,mid] [--iters 8,32] [--batch 1] [--repeats 2]

Random weights (speed does not depend on them); CFG 3.0 (the batch doubles to [cond; uncond]),
100 diffusion steps per token, float32. ``first`` is the first call of a shape (tracing and
XLA compilation of the prefill, the step and the VAE decoder, plus one run); ``run`` is the
median of the following calls; ``compile ≈ first − run``. Presets:

* ``tiny``: ``UniPicConfig.preset("tiny")`` (VAE stride 4; 16², 32², 64² pixels → 4×4 … 16×16 tokens);
* ``mid``: a ~0.2 B model with the release's KL-16 VAE (stride 16) at 128² and 256² pixels:
  Qwen2 width 512 × 8 layers (vocab 151936), MAR width 512 with 6 + 6 blocks, diffusion head
  width 512 × 6 blocks.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from unipic_jax import sample
from unipic_jax.models import unipic as U


def presets():
    tiny = U.UniPicConfig.preset("tiny")
    full = U.UniPicConfig.preset("unipic_1_5b")
    mid = full.replace(
        llm=full.llm.replace(hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=2,
                             head_dim=None),
        mar=full.mar.replace(width=512, encoder_depth=6, decoder_depth=6, num_heads=8, buffer_size=16, grid=16),
        diffloss=full.diffloss.replace(width=512, depth=6, z_channels=512),
    )
    return {"tiny": (tiny, (16, 32, 64)), "mid": (mid, (128, 256))}


def timed(model, ids, mask, grid, num_iter, seed) -> float:
    t = time.perf_counter()
    sample.decode(model, sample.sample_latents(model, ids, mask, grid=grid, seed=seed, num_iter=num_iter, cfg=3.0))
    return time.perf_counter() - t


flags.DEFINE_string("presets", "tiny,mid", "presets to time, comma-separated (tiny, mid)")
flags.DEFINE_string("iters", "8,32", "num_iter values")
flags.DEFINE_string("sizes", None, "pixel sizes (default: per preset)")
flags.DEFINE_integer("batch", 1, "images per call")
flags.DEFINE_integer("repeats", 2, "timed calls after the first")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    iters = [int(i) for i in args.iters.split(",")]
    print(f"devices: {jax.devices()}  batch {args.batch}, cfg 3.0, float32")
    print(f"{'preset':6} {'params':>8} {'size':>7} {'tokens':>6} {'iters':>5} {'first s':>8} {'compile s':>9} "
          f"{'run s':>7} {'s/image':>8}")
    rows = []
    for name in args.presets.split(","):
        cfg, sizes = presets()[name]
        if args.sizes:
            sizes = [int(s) for s in args.sizes.split(",")]
        model = U.UniPic(cfg, rngs=nnx.Rngs(0))
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        rs = np.random.RandomState(0)
        ids = rs.randint(3, 900, (2 * args.batch, 24)).astype(np.int32)
        mask = np.ones(ids.shape, bool)
        for size in sizes:
            grid = (size // cfg.vae.downsample,) * 2
            for k in iters:
                first = timed(model, ids, mask, grid, k, seed=0)
                run = statistics.median(timed(model, ids, mask, grid, k, seed=s + 1) for s in range(args.repeats))
                rows.append({"preset": name, "params": n_params, "size": size, "tokens": grid[0] * grid[1],
                             "num_iter": k, "first_s": first, "compile_s": max(first - run, 0.0), "run_s": run,
                             "s_per_image": run / args.batch})
                print(f"{name:6} {n_params / 1e6:7.1f}M {size:>4}px² {grid[0] * grid[1]:>6} {k:>5} {first:8.2f} "
                      f"{max(first - run, 0.0):9.2f} {run:7.2f} {run / args.batch:8.2f}", flush=True)
    print(json.dumps({"batch": args.batch, "cfg": 3.0, "dtype": "float32", "results": rows}))


if __name__ == "__main__":
    app.run(main)
