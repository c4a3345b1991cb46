"""How precisely does a trained generator know a token from its context? A diagnostic for the demo.

    python -m docs.diagnostics.context_precision --checkpoint runs/demo/model [--size 48] [--n 64]

Held-out text-to-image examples (``--n``, the six GenEval categories in turn) at ``--size``,
with their prompts; a random share of each image's tokens is visible (0, 30 %, 70 %, 97 %)
and the rest masked. For every masked token the diffusion head's estimate of the clean token
at high noise (``x̂0`` at ``t = 900`` of 1000, averaged over 8 noise draws: nearly the mean of
what the head would sample given ``z`` alone) is compared with the true latent. Printed per
token kind, from the image's 4 × 4 patch under the token: *background* (all white),
*interior* (one flat colour) and *edge* (anything else), as the mean squared error per latent
channel (the latents are scaled to unit variance), with each kind's share of the tokens and
the variance of its true latents. Once a token's neighbours are visible its latent is nearly
determined, and a model that renders shapes needs an error near 0 there, for interior and
edge tokens above all; the demo model's is not (docs/demo.md).
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
from unipic_jax.models import diffusion
from unipic_jax.models import mar as mar_lib

KINDS = ("background", "interior", "edge")
VISIBLE = (0.0, 0.3, 0.7, 0.97)


def token_kinds(images: np.ndarray, f: int) -> np.ndarray:
    """``(B, L)`` 0 / 1 / 2 (background / interior / edge) from uint8 images ``(B, H, W, 3)``."""
    B, H, W, _ = images.shape
    p = images.reshape(B, H // f, f, W // f, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(B, -1, f * f, 3).astype(int)
    background = np.all(p == 255, axis=(2, 3))
    flat = np.all(p == p[:, :, :1], axis=(2, 3))
    return np.where(background, 0, np.where(flat, 1, 2))


def precision(model, tok, size: int, n: int, t: int = 900, draws: int = 8, seed: int = 0) -> tuple[dict, dict]:
    """``({visible share: {kind: mse}}, {kind: (share of tokens, variance of their latents)})``."""
    ex = [world.t2i_example(i, "validation", category=world.CATEGORIES[i % len(world.CATEGORIES)],
                            sizes=((size, size),)) for i in range(n)]
    images = np.stack([e["image"] for e in ex])
    lat = sample.encode(model, list(images), size, size)
    B, h, w, C = lat.shape
    L = h * w
    kinds = token_kinds(images, model.config.vae.downsample).reshape(-1)
    ids, am = tok_lib.encode(tok, [tok_lib.generation_prompt(e["prompt"]) for e in ex])
    head = model.diffloss
    x0 = lat.reshape(B * L, C)

    @jax.jit
    def estimate(mask, key):
        z = model.condition(jnp.asarray(ids), jnp.asarray(am), lat, mask).reshape(B * L, -1)
        tt = jnp.full((B * L,), t)

        def one(k):
            xt = diffusion.q_sample(head.train_schedule, x0, tt, jax.random.normal(k, x0.shape))
            return diffusion.predicted_x0(head.train_schedule, head.net(xt, tt, z)[:, :C], xt, tt)

        return jnp.mean(jax.vmap(one)(jax.random.split(key, draws)), axis=0)

    out = {}
    target = np.asarray(x0)
    stats = {name: (float(np.mean(kinds == k)), float(np.var(target[kinds == k], axis=0).mean()))
             for k, name in enumerate(KINDS)}
    for share in VISIBLE:
        key = jax.random.fold_in(jax.random.key(seed), int(share * 100))
        mask = mar_lib.mask_by_order(mar_lib.random_orders(key, B, L), L - round(share * L))
        est = np.asarray(estimate(mask, key))
        masked = np.asarray(mask).reshape(-1) > 0
        out[share] = {}
        for k, name in enumerate(KINDS):
            sel = masked & (kinds == k)
            out[share][name] = float(np.mean((est[sel] - target[sel]) ** 2)) if sel.any() else float("nan")
    return out, stats


common.define_checkpoint_flags()
flags.DEFINE_integer("size", 48, "image size in pixels")
flags.DEFINE_integer("n", 64, "held-out examples")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    model, tok = common.load_checkpoint(args)
    res, stats = precision(model, tok, args.size, args.n)
    print(f"x̂0 of the masked tokens at t=900 against their true latents, MSE ({args.n} held-out images at "
          f"{args.size}²)")
    print("| visible | " + " | ".join(KINDS) + " |\n|---|" + "---|" * len(KINDS))
    for share, row in res.items():
        print(f"| {share:.0%} | " + " | ".join(f"{mse:.3f}" for mse in row.values()) + " |")
    print("| share of tokens (variance of their latents) | "
          + " | ".join(f"{frac:.2f} ({var:.2f})" for frac, var in stats.values()) + " |")


if __name__ == "__main__":
    app.run(main)
