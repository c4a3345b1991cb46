"""Does a small MAR learn to use the visible tokens' positions? A control task for ``mar.pos_init``.

    python -m docs.diagnostics.mar_position_init [--steps 600] [--inits normal,sincos]

Every image is an 8 × 8 grid of 4-channel tokens, constant over each 4 × 4 block (one random
vector per block), so a masked token is known exactly from any visible token of its block and
from nothing else: a model that uses the positions of the visible tokens drives the diffusion
loss with half the tokens visible far below the loss with none visible; one that does not stays
at the no-context level. MAR (the demo's size: width 64, 2 + 2 blocks, 4 heads, buffer 4) and
its diffusion head (64 × 3) are trained with MAR's masking (ratio from the truncated normal on
[0.7, 1]), AdamW lr 1e-3, batch 16, once per position initialisation. Prints the held-out loss
at 32 of 64 tokens masked and at all masked, every 100 steps.

On the project's 2-core CPU machine on 2026-12-01 (600 steps, about a minute per
initialisation): N(0, 0.02²) tables 0.49 → 0.41 at half masked (0.51 with none visible); 2-D
sin-cos tables 0.12 by step 300 and 0.07 at 600.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from unipic_jax.models import diffloss as diffloss_lib
from unipic_jax.models import mar as mar_lib

B, GRID, C = 16, 8, 4


def blocks(key):
    v = jax.random.normal(key, (B, 2, 1, 2, 1, C))
    return jnp.broadcast_to(v, (B, 2, GRID // 2, 2, GRID // 2, C)).reshape(B, GRID * GRID, C)


class Generator(nnx.Module):
    def __init__(self, pos_init: str, rngs: nnx.Rngs):
        cfg = mar_lib.MARConfig(token_dim=C, width=64, encoder_depth=2, decoder_depth=2, num_heads=4, buffer_size=4,
                                grid=GRID, pos_init=pos_init)
        self.mar = mar_lib.MAR(cfg, rngs=rngs)
        self.head = diffloss_lib.DiffLoss(diffloss_lib.DiffLossConfig(in_channels=C, z_channels=64, width=64, depth=3,
                                                                      batch_mul=4), rngs=rngs)

    def loss(self, tokens, mask, key):
        z = self.mar.decode(self.mar.encode(tokens, mask), mask)
        L = tokens.shape[1]
        return self.head.loss(tokens.reshape(B * L, C), z.reshape(B * L, -1), mask.reshape(B * L), key)


def run(pos_init: str, steps: int, seed: int = 0):
    model = Generator(pos_init, nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.0), wrt=nnx.Param)
    L = GRID * GRID

    @nnx.jit
    def step(model, opt, key):
        k1, k2, k3 = jax.random.split(key, 3)
        tokens, mask = blocks(k1), mar_lib.training_mask(k2, B, L)
        loss, grads = nnx.value_and_grad(lambda m: m.loss(tokens, mask, k3))(model)
        opt.update(model, grads)
        return loss

    @nnx.jit
    def held_out(model, key, n_masked):
        k1, k2, k3 = jax.random.split(key, 3)
        return model.loss(blocks(k1), mar_lib.mask_by_order(mar_lib.random_orders(k2, B, L), n_masked), k3)

    for i in range(steps + 1):
        if i % 100 == 0:
            keys = [jax.random.key(10**6 + j) for j in range(4)]
            half = np.mean([float(held_out(model, k, L // 2)) for k in keys])
            none = np.mean([float(held_out(model, k, L)) for k in keys])
            print(f"pos_init={pos_init:7s} step {i:5d}: loss half masked {half:.3f}, all masked {none:.3f}", flush=True)
        if i < steps:
            step(model, opt, jax.random.key(i))


flags.DEFINE_integer("steps", 600, "training steps per initialisation")
flags.DEFINE_string("inits", ",".join(mar_lib.POS_INITS), "position initialisations to compare, comma-separated")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    for init in args.inits.split(","):
        run(init, args.steps)


if __name__ == "__main__":
    app.run(main)
