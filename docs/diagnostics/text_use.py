"""How much does a trained generator follow the words of its prompt? A diagnostic for the demo.

    python -m docs.diagnostics.text_use --checkpoint runs/demo/model [--size 48] [--seeds 8] [--cfg 3]

Two families of prompts that differ in one word: ``"a photo of a red {shape}"`` for the five
shapes and ``"a photo of a {colour} circle"`` for the eight colours. Every prompt is sampled
with the same ``--seeds`` noise streams (one batch, seed 0), so image ``(prompt, j)`` and
``(prompt', j)`` differ only by the word. Per family it prints

* ``word/seed``: the mean absolute pixel difference between prompts at the same noise, over
  the difference between noise streams at the same prompt. About 1 when the word changes the
  picture as much as the noise does (as in the data, where a different prompt is a different
  scene); near 0 when the word is ignored and the noise alone decides the image.
* the scorer's hit rate: images with an object of the prompted shape (or colour).

and writes the grid (one row per prompt) to ``--out``.
"""

from __future__ import annotations

import itertools

import numpy as np
from absl import app, flags

from docs.diagnostics import common
from unipic_jax import sample
from unipic_jax.data import shapes as world
from unipic_jax.eval import grids
from unipic_jax.rewards import shapes as scorer


def mean_pairwise(images: np.ndarray, axis: int) -> float:
    """Mean |a - b| over pairs taken along ``axis`` of ``images (P, S, H, W, 3)``."""
    x = np.moveaxis(images.astype(np.float32), axis, 0)
    return float(np.mean([np.abs(x[i] - x[j]).mean() for i, j in itertools.combinations(range(len(x)), 2)]))


def family(model, tokenizer, prompts, hit, args):
    rows = [sample.text_to_image(model, tokenizer, [p] * args.seeds, size=args.size, seed=0, num_iter=args.num_iter,
                                 cfg=args.cfg) for p in prompts]
    images = np.stack(rows)  # (P, S, H, W, 3)
    ratio = mean_pairwise(images, 0) / max(mean_pairwise(images, 1), 1e-9)
    hits = np.mean([any(hit(d, k) for d in scorer.detect(im)) for k, row in enumerate(rows) for im in row])
    return images, ratio, float(hits)


common.define_checkpoint_flags()
flags.DEFINE_integer("size", 48, "image size in pixels")
flags.DEFINE_integer("seeds", 8, "samples per prompt, one seed each")
flags.DEFINE_float("cfg", 3.0, "classifier-free guidance scale")
flags.DEFINE_integer("num_iter", 16, "MAR sampling iterations")
flags.DEFINE_string("out", "text_use.png", "output grid PNG")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    model, tokenizer = common.load_checkpoint(args)
    shapes, colours = list(world.SHAPES), list(world.COLORS)
    grids = []
    for name, prompts, hit in (
        ("shape", [f"a photo of a red {s}" for s in shapes], lambda d, k: d.shape == shapes[k]),
        ("colour", [f"a photo of {'an' if c[0] in 'aeiou' else 'a'} {c} circle" for c in colours],
         lambda d, k: d.color == colours[k]),
    ):
        images, ratio, hits = family(model, tokenizer, prompts, hit, args)
        print(f"{name:6s} word/seed {ratio:.2f}   prompted {name} found in {hits:.0%} of the images")
        grids += list(images.reshape(-1, *images.shape[2:]))
    sample.save_png(grids.grid(grids, cols=args.seeds)[None], [args.out])
    print(f"grid: {args.out} (rows: {', '.join(shapes)}; then {', '.join(colours)})")


if __name__ == "__main__":
    app.run(main)
