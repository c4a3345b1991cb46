"""The demo (the main job): a tiny UniPic trained on the built-in shapes world on a CPU.

    python train.py --config configs/demo.py [--workdir runs/demo] [--config.stages.gen32.steps=200]

Three stages: the tiny VAE (the tokenizer, 600 steps, L2 pixel loss; its latent scale
calibrated to unit variance afterwards) on 32² images, then text-to-image at 32², then at 48²
and 4:3 / 3:4 buckets (progressive resolution), with a grid of samples for fixed prompts every
1000 steps (``WORKDIR/samples``). Ends with the shapes benchmark on held-out prompts and a
sample grid.

The generator starts as MAR does (xavier layers, adaLN-zero diffusion head) with two choices
for training from scratch: 2-D sin-cos position tables (``mar.pos_init``; with N(0, 0.02²)
tables a model this small does not learn to use the visible tokens' positions within the
budget, and samples scattered fragments) and the LLM -> MAR residual starting at zero
(``zero_init_proj_out``). Two more make its tokens local: the VAE without attention and with
per-position norms (``vae.attention``, ``vae.norm``: each latent depends on its own
neighbourhood only, not on objects elsewhere in the image), and 2-D ALiBi in MAR's attention
(``mar.attn_bias``: a token attends mostly to its neighbours from the first step on).
Sampling takes 64 MAR iterations (16 leave many neighbouring tokens to be drawn at once).
"""

import ml_collections

SMALL = ((32, 32),)
LARGE = ((48, 48), (48, 64), (64, 48))


def stage(kind, steps, lr, buckets, batch_size, **kw):
    base = dict(kind=kind, steps=steps, lr=lr, buckets=buckets, batch_size=dict(t2i=0, edit=0, understanding=0),
                trainable=("",), schedule="constant", warmup=0.0, weight_decay=0.0, clip=1.0, accumulate=1, ema=0.0,
                max_text_len=dict(t2i=24, edit=112, understanding=112), understanding_size=(32, 32),
                loss_weights=dict(t2i=1.0, edit=0.0, understanding=0.0), caption_dropout=0.1)
    base["batch_size"].update(batch_size)
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(base.get(k), dict) else v
    return ml_collections.ConfigDict(base)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.tokenizer = "shapes"
    c.init = ""  # initial weights: a model checkpoint, HF folder or UniPic release (see train/warm_start.py)
    c.init_parts = ("",)
    # the tiny preset widened (LLM 64, MAR 64, diffusion head 64 x 3), with local tokens
    c.model = ml_collections.ConfigDict(dict(preset="tiny", overrides=dict(
        zero_init_proj_out=True,
        vae=dict(attention=False, norm="pixel"),
        llm=dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
        mar=dict(grid=8, width=64, num_heads=4, pos_init="sincos", attn_bias="alibi"),
        diffloss=dict(sampling_steps="100", z_channels=64, width=64, depth=3, batch_mul=4))))
    # native: every example drawn at its stage's own bucket sizes (no crop, objects above the legibility
    # floor); sizes: the canvases otherwise
    c.data = ml_collections.ConfigDict(dict(source="shapes", length=50_000, sizes=SMALL + LARGE, native=True))
    c.stage_order = ("vae", "gen32", "gen48")
    c.stages = ml_collections.ConfigDict()
    c.stages.vae = stage("vae", 600, 2e-3, SMALL, dict(t2i=16), trainable=("vae",), kl_weight=1e-6, recon="l2",
                         calibrate_scale=True)
    c.stages.gen32 = stage("unipic", 3600, 1e-3, SMALL, dict(t2i=16), trainable=("mar", "diffloss", "llm", "proj_in",
                                                                              "proj_out"), ema=0.99)
    c.stages.gen48 = stage("unipic", 400, 5e-4, LARGE, dict(t2i=16), trainable=("mar", "diffloss", "llm", "proj_in",
                                                                              "proj_out"), ema=0.99,
                           max_text_len=dict(edit=256))
    c.train = ml_collections.ConfigDict(dict(log_every=10, checkpoint_every=200, keep=2, progress=True,
                                             sample_every=1000, sample_prompts=()))
    c.eval = ml_collections.ConfigDict(dict(per_category=8, size=(48, 48), num_iter=64, cfg=3.0,
                                            cfg_schedule="constant", temperature=1.0, edit_per_kind=0, qa=0))
    return c
