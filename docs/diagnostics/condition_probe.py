"""What does the diffusion head's condition know? Linear probes on MAR's per-token ``z``.

    python -m docs.diagnostics.condition_probe --checkpoint runs/demo/model [--size 32] [--n 600]

Held-out single-object scenes ("a photo of a red circle"), VAE-encoded; a random fraction of
each image's tokens is visible (``--visible``, default 0 and 0.7) and :meth:`UniPic.condition`
gives ``z`` for every token. The features are the ``z`` of the MASKED tokens that touch the
object (over a tenth of their pixels are not background); the labels are the object's shape
(5 classes) and colour (8). A multinomial logistic regression (AdamW, 500 steps) is fitted on
the tokens of two thirds of the images and scored on the tokens of the rest. With nothing
visible, ``z`` can know the shape or the colour only from the prompt; with part of the image
visible, the probe is run with the prompt and with the unconditional one, which separates what
the words add from what the visible tokens give.

A generator that follows its prompt carries both words into ``z`` with nothing visible, and
when the shape is in ``z`` but the samples still miss it, the diffusion head and decoder (the
rendering) are what is left to learn.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from docs.diagnostics import common
from unipic_jax import tokenizer as tok_lib
from unipic_jax.data import shapes as world
from unipic_jax.models import mar as mar_lib


def features(model, tokenizer, examples, visible: float, with_prompt: bool, batch: int = 100):
    """``(z, shape, colour, image index)`` of the masked tokens that touch the object."""
    cond = nnx.jit(lambda m, ids, am, lat, mask: m.condition(ids, am, lat, mask))
    f = model.config.vae.downsample
    zs, shapes, colours, images = [], [], [], []
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        prompts = [tok_lib.generation_prompt(e["prompt"] if with_prompt else None) for e in chunk]
        ids, am = tok_lib.encode(tokenizer, prompts)
        pix = np.stack([e["image"] for e in chunk])
        lat = model.vae.encode(jnp.asarray(pix.astype(np.float32) / 127.5 - 1))
        B, h, w, _ = lat.shape
        orders = mar_lib.random_orders(jax.random.key(start), B, h * w)
        mask = mar_lib.mask_by_order(orders, int(round(h * w * (1 - visible))))
        z = np.asarray(cond(model, jnp.asarray(ids), jnp.asarray(am), lat, mask))
        fg = np.abs(pix.astype(np.float32) - np.asarray(world.BACKGROUND, np.float32)).sum(-1) > 60
        cover = fg.reshape(B, h, f, w, f).mean((2, 4)).reshape(B, h * w)
        for k, e in enumerate(chunk):
            sel = (np.asarray(mask[k]) > 0) & (cover[k] > 0.1)
            obj = e["scene"].objects[0]
            zs.append(z[k][sel])
            n = int(sel.sum())
            shapes += [world.SHAPES.index(obj.shape)] * n
            colours += [list(world.COLORS).index(obj.color)] * n
            images += [start + k] * n
    return np.concatenate(zs), np.asarray(shapes), np.asarray(colours), np.asarray(images)


def probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, classes: int, steps: int = 500) -> float:
    """Held-out accuracy of a linear softmax classifier fitted on the ``train`` rows."""
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    x = jnp.asarray((x - mu) / sd)
    params = (jnp.zeros((x.shape[1], classes)), jnp.zeros(classes))
    tx = optax.adamw(1e-2, weight_decay=1e-3)
    state = tx.init(params)
    xt, yt = x[train], jnp.asarray(y[train])

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(xt @ p[0] + p[1], yt).mean())(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    pred = np.asarray(jnp.argmax(x[~train] @ params[0] + params[1], -1))
    return float((pred == y[~train]).mean())


common.define_checkpoint_flags()
flags.DEFINE_integer("size", 32, "image size in pixels")
flags.DEFINE_integer("n", 600, "held-out scenes")
flags.DEFINE_string("visible", "0,0.7", "fractions of tokens visible")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    model, tokenizer = common.load_checkpoint(args)
    examples = [world.t2i_example(i, "validation", category="colors", sizes=((args.size, args.size),))
                for i in range(args.n)]
    for visible in (float(v) for v in args.visible.split(",")):
        for with_prompt in (True, False) if visible > 0 else (True,):
            z, shape, colour, image = features(model, tokenizer, examples, visible, with_prompt)
            train = image < int(args.n * 2 / 3)
            chance = np.bincount(shape[~train]).max() / (~train).sum()
            print(f"{visible:4.0%} visible, {'prompt' if with_prompt else 'no prompt'}: {len(z)} masked object "
                  f"tokens; shape probe {probe(z, shape, train, len(world.SHAPES)):.2f} (majority class "
                  f"{chance:.2f}), colour probe {probe(z, colour, train, len(world.COLORS)):.2f}")


if __name__ == "__main__":
    app.run(main)
