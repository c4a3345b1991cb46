"""Where a trained demo generator loses its shapes: latent locality, per-token precision, and
the number of sampling iterations. A diagnostic for the demo.

    python -m docs.diagnostics.locality --checkpoint runs/demo/model [--size 48] [--per_category 16]

1. **VAE locality.** Three held-out-style scenes at ``--size``: an object alone, with a second
   object added far away, and the empty canvas. Prints the mean change of the background
   latents far from both objects when the second object is added, over the latents' std (the
   LDM VAE's GroupNorm and attention make it large; ``vae.norm="pixel"`` without attention,
   about 0), and how much the empty canvas's latents vary with position.
2. **Per-token precision.** For held-out colour prompts, one interior token of the object is
   masked and every other token is visible (or 70 % / 90 % of them are masked); its latent is
   sampled 64 times by the diffusion head at temperature 1 and 0, written back and decoded, and
   the fraction whose 4 × 4 pixels keep the object's colour is printed. The easiest prediction
   there is: a model that renders shapes needs nearly 1.
3. **Sampling iterations.** The held-out single-object and colour prompts sampled from nothing
   with ``num_iter`` 16, 64 and one token per step (``L``), scored by the shapes scorer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from docs.diagnostics import common
from unipic_jax import sample
from unipic_jax import tokenizer as tok_lib
from unipic_jax.data import shapes as world
from unipic_jax.eval import shapes as shapes_eval


def vae_locality(model, size: int):
    f = model.config.vae.downsample
    r = size / 6
    a = world.Obj("circle", "red", size / 4, size / 4, r)
    b = world.Obj("square", "blue", 3 * size / 4, 3 * size / 4, r)

    def latents(objects):
        image = world.render(world.Scene(size, size, tuple(objects)))
        return np.asarray(sample.encode(model, [image], size, size))[0]

    za, zab, empty = latents([a]), latents([a, b]), latents([])
    g = size // f
    far = (slice(g - g // 3, g), slice(0, g // 3))  # bottom-left: away from both objects
    std = float(za.std())
    print(f"VAE locality at {size}²: adding a far object moves the background latents by "
          f"{np.abs(za[far] - zab[far]).mean() / std:.4f} of the latents' std; "
          f"the empty canvas's latents vary with position by {empty.reshape(-1, empty.shape[-1]).std(0).mean() / std:.3f}")


def token_precision(model, tok, size: int, n_scenes: int = 12, draws: int = 64):
    f = model.config.vae.downsample
    g = size // f
    L = g * g
    rng = np.random.default_rng(0)
    results = {}
    for temperature in (1.0, 0.0):
        for label, ratio in (("all other tokens visible", 0.0), ("70% masked", 0.7), ("90% masked", 0.9)):
            hits = []
            for i in range(n_scenes):
                ex = world.t2i_example(i, "validation", category="colors", sizes=((size, size),))
                image = np.asarray(ex["image"]).astype(int)
                patches = image.reshape(g, f, g, f, 3).transpose(0, 2, 1, 3, 4).reshape(L, f * f, 3)
                uniform = np.all(np.abs(patches - patches[:, :1]).sum(-1) < 10, axis=1) & ~np.all(patches > 240,
                                                                                                   axis=(1, 2))
                if not uniform.any():
                    continue
                t = int(rng.choice(np.flatnonzero(uniform)))
                lat = np.asarray(sample.encode(model, [ex["image"]], size, size))
                ids, am = tok_lib.encode(tok, [tok_lib.generation_prompt(ex["prompt"])])
                mask = (rng.random((draws, L)) < ratio).astype(np.float32)
                mask[:, t] = 1
                z = model.condition(jnp.asarray(np.repeat(ids, draws, 0)), jnp.asarray(np.repeat(am, draws, 0)),
                                    jnp.asarray(np.repeat(lat, draws, 0)), jnp.asarray(mask))
                new = np.asarray(model.diffloss.sample(z[:, t], jax.random.key(i), temperature))
                grid = np.repeat(lat.reshape(1, L, -1), draws, 0)
                grid[:, t] = new
                decoded = sample.decode(model, grid.reshape(draws, g, g, -1)).astype(int)
                r0, c0 = divmod(t, g)
                got = decoded[:, r0 * f:(r0 + 1) * f, c0 * f:(c0 + 1) * f].reshape(draws, f * f, 3)
                err = np.abs(got - patches[t, 0][None, None]).sum(-1).mean(-1)
                hits.append(float(np.mean(err < 60)))
            results[(temperature, label)] = float(np.mean(hits))
            print(f"interior token, {label}, temperature {temperature:g}: keeps the object's colour in "
                  f"{results[(temperature, label)]:.3f} of the draws")
    return results


def iterations(model, tok, size: int, per_category: int, cfg: float):
    L = (size // model.config.vae.downsample) ** 2
    for num_iter in (16, 64, L):
        res = shapes_eval.t2i(model, tok, size=(size, size), per_category=per_category, num_iter=num_iter, cfg=cfg,
                              categories=("single_object", "colors"))
        s = res["scores"]["categories"]
        print(f"num_iter {num_iter:4d}: single object {s['single_object']:.3f}, colours {s['colors']:.3f}")


common.define_checkpoint_flags()
flags.DEFINE_integer("size", 48, "image size in pixels")
flags.DEFINE_integer("per_category", 16, "held-out prompts per category")
flags.DEFINE_float("cfg", 3.0, "classifier-free guidance scale")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    model, tok = common.load_checkpoint(args)
    vae_locality(model, args.size)
    token_precision(model, tok, args.size)
    iterations(model, tok, args.size, args.per_category, args.cfg)


if __name__ == "__main__":
    app.run(main)
