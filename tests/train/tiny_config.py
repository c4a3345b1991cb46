"""The demo's config shrunk for the multi-process tests: a tiny model on 16² images, a VAE stage
(latent scale calibrated) and a text-to-image stage with gradient accumulation and EMA; a global
batch of 8 (one row per device), a checkpoint every update, no final evaluation."""

from pathlib import Path

from unipic_jax.train import run

SIZE = ((16, 16),)


def get_config():
    c = run.load_config(Path(__file__).parents[2] / "configs" / "demo.py")
    c.model.overrides = dict(mar=dict(grid=4), diffloss=dict(sampling_steps="4"))
    c.data.length, c.data.sizes = 64, SIZE
    c.stage_order = ("vae", "gen")
    vae, gen = c.stages.vae, c.stages.gen32
    vae.steps, vae.buckets, vae.batch_size.t2i = 2, SIZE, 8
    gen.steps, gen.buckets, gen.batch_size.t2i, gen.accumulate, gen.max_text_len.t2i = 3, SIZE, 8, 2, 20
    gen.batch_size.edit = gen.batch_size.understanding = 0  # text-to-image only
    gen.lr, gen.warmup, gen.schedule = 3e-3, 0.34, "cosine"
    del c.stages.gen48, c.stages.gen32
    c.stages.gen = gen
    c.train.update(log_every=1, checkpoint_every=1, keep=10, progress=False, sample_every=0)
    c.eval.update(per_category=0, size=(16, 16), num_iter=2, edit_per_kind=0, qa=0)
    return c
