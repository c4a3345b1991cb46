"""Do training and sampling agree? The demo's generator memorises a few examples, then samples them.

    python -m docs.diagnostics.memorisation --checkpoint runs/demo/model [--n 8] [--steps 1500] [--workdir DIR]

configs/demo.py's 32² text-to-image stage on its own, with the training set cut to ``--n``
examples (one batch of them at every step), a fresh generator, and the VAE (with its latent
scale) taken from ``--checkpoint``. After ``--steps`` steps it samples the ``n`` training prompts
at 32² and compares the images with the training images: the mean absolute pixel error (0-255)
and the shapes scorer on the examples' metadata, with and without guidance and with 16 and 64
sampling iterations. The error between each training image and the other training images is
printed for reference.

A model that has memorised its examples gives them back only if sampling feeds the prompt, the
positions, the visible tokens and the guidance pair to the network the way training did, and
decodes with the same latent scale; the scorer's figure is then bounded by what the VAE
reconstructs (about 0.8 at 32²). About 4 minutes on two cores.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from absl import app, flags

ROOT = Path(__file__).resolve().parents[2]


flags.DEFINE_string("checkpoint", None, "a model checkpoint whose VAE is used (e.g. runs/demo/model); required")
flags.mark_flag_as_required("checkpoint")
flags.DEFINE_integer("n", 8, "training examples (also the batch size)")
flags.DEFINE_integer("steps", 1500, "training steps")
flags.DEFINE_string("workdir", None, "run folder (default: a new temporary folder); an existing run resumes")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS

    from unipic_jax import checkpoint, sample
    from unipic_jax import tokenizer as tok_lib
    from unipic_jax.eval import grids
    from unipic_jax.rewards import shapes as scorer
    from unipic_jax.train import run

    try:
        checkpoint.read_config(args.checkpoint)  # fail before training on a folder that is not a checkpoint
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"memorisation: {e}") from None
    cfg = run.load_config(ROOT / "configs" / "demo.py")
    cfg.data.length, cfg.data.sizes = args.n, ((32, 32),)
    cfg.stage_order = ("gen32",)
    cfg.stages.gen32.steps = args.steps
    cfg.stages.gen32.batch_size = {"t2i": args.n}
    cfg.init, cfg.init_parts = str(args.checkpoint), ("vae",)
    cfg.train.sample_every, cfg.eval.per_category = 0, 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="memorisation-"))
    summary = run.run(cfg, str(workdir))
    print(f"trained {summary['steps']} steps on {args.n} examples in {workdir}; "
          f"final loss {summary['final_metrics'].get('t2i', float('nan')):.3f}")

    model = checkpoint.load_model(workdir / "model")
    tok = tok_lib.load_tokenizer(workdir / "tokenizer")
    source = run.build_sources(cfg, ["t2i"])["t2i"]  # the training set itself
    examples = [source[i] for i in range(args.n)]
    prompts = [e["text"] for e in examples]
    metadata = [json.loads(e["metadata"]) for e in examples]
    targets = np.stack([e["image"] for e in examples]).astype(np.float64)
    others = np.mean([np.abs(targets - np.roll(targets, k, axis=0)).mean() for k in range(1, args.n)])
    print(f"reference: mean absolute error between different training images {others:.1f}")
    print("| CFG | iterations | mean abs. error | scorer |\n| --- | --- | --- | --- |")
    rows = [targets.astype(np.uint8)]
    for guidance in (1.0, 3.0):
        for num_iter in (16, 64):
            images = sample.text_to_image(model, tok, prompts, size=32, seed=1, num_iter=num_iter, cfg=guidance)
            err = np.abs(images.astype(np.float64) - targets).mean()
            score = scorer.evaluate(images, metadata)["overall"]
            print(f"| {guidance:g} | {num_iter} | {err:.1f} | {score:.3f} |")
            rows.append(images)
    path = workdir / "memorisation.png"
    sample.save_png(grids.grid([im for r in rows for im in r], cols=args.n)[None], [path])
    print(f"grid (training images, then one row per setting): {path}")


if __name__ == "__main__":
    app.run(main)
