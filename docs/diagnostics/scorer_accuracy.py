"""How well does the shapes scorer read images back? Its accuracy on perturbed ground truth.

    python -m docs.diagnostics.scorer_accuracy [--n 300] [--checkpoint runs/demo/model]

Held-out text-to-image prompts (``--n``, the six GenEval categories in turn), drawn natively at
each of the demo's bucket sizes (32², 48², 48×64, 64×48), scored against their own metadata after
a perturbation: none, Gaussian pixel noise σ = 10 and 25 (of 255), Gaussian blur σ = 1 and
2 px, a 2× bilinear downscale; with ``--checkpoint``, also the model's VAE reconstruction
(encode, decode), the ceiling for anything that model generates. Prints one markdown table
row per perturbation (GenEval's overall: the mean over categories), then editing targets and
sources against the targets' metadata.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags
from PIL import Image, ImageFilter

from unipic_jax.data import shapes as world
from unipic_jax.rewards import shapes as scorer


def perturbations(checkpoint: str | None):
    rs = np.random.RandomState(0)

    def noise(s):
        return lambda x: np.clip(x + rs.randn(*x.shape) * s, 0, 255).astype(np.uint8)

    def blur(s):
        return lambda x: np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(s)))

    def half(x):
        return np.asarray(Image.fromarray(x).resize((x.shape[1] // 2, x.shape[0] // 2), Image.BILINEAR))

    out = {"rendered ground truth": lambda x: x, "Gaussian noise σ = 10": noise(10),
           "Gaussian noise σ = 25": noise(25), "Gaussian blur σ = 1 px": blur(1), "Gaussian blur σ = 2 px": blur(2),
           "downscaled 2× (bilinear)": half}
    if checkpoint:
        from unipic_jax import checkpoint as ckpt_lib
        from unipic_jax import sample

        model = ckpt_lib.load_model(checkpoint)
        f = model.config.vae.downsample

        def recon(x):
            h, w = x.shape[0] // f * f, x.shape[1] // f * f
            return sample.decode(model, sample.encode(model, [x[:h, :w]], h, w))[0]

        out["VAE reconstruction"] = recon
    return out


flags.DEFINE_integer("n", 300, "prompts per canvas setting")
flags.DEFINE_string("checkpoint", None, "a model checkpoint whose VAE reconstructions to score")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    settings = {f"{h}×{w}": ((h, w),) for h, w in ((32, 32), (48, 48), (48, 64), (64, 48))}  # the demo's buckets
    examples = {k: [world.t2i_example(i, "validation", category=world.CATEGORIES[i % len(world.CATEGORIES)], sizes=s)
                    for i in range(args.n)] for k, s in settings.items()}
    print("| image | " + " | ".join(settings) + " |\n| --- |" + " --- |" * len(settings))
    for name, f in perturbations(args.checkpoint).items():
        accs = [scorer.evaluate([f(e["image"]) for e in ex], [e["metadata"] for e in ex])["overall"]
                for ex in examples.values()]
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    edits = [world.edit_example(i, "validation") for i in range(args.n)]
    for part in ("target", "source"):
        acc = np.mean([scorer.score(e[part], e["metadata"])["correct"] for e in edits])
        print(f"editing {part}s against the target's metadata: {acc:.3f}")


if __name__ == "__main__":
    app.run(main)
