"""The demo (the main job): a tiny UniPic trained on the built-in shapes world on a CPU, all three tasks.

    python train.py --config configs/demo.py [--workdir runs/demo] [--config.stages.gen32.steps=200]
    python eval.py --checkpoint runs/demo/model --per_category 16 --edit_per_kind 4 --qa 48

Four stages: the tiny VAE (the tokenizer, 600 steps, L2 pixel loss; its latent scale calibrated
to unit variance afterwards) on 32² images; text-to-image, editing and understanding together
(batches 16 / 8 / 8, loss weights 1.0) at 32², then at 48² and 4:3 / 3:4 buckets (progressive
resolution); then the denoising decoder (the VAE decoder fine-tuned on noisy, token-swapped
latents, encoder frozen). Every example is drawn at its bucket's own size (``data.native``). A
labelled grid of samples for fixed prompts every 1000 steps (``WORKDIR/samples``); ends with the
shapes benchmark on held-out prompts and labelled grids (``WORKDIR/eval``).

Runtime, 2-core CPU (shared AMD EPYC), nothing compiled, 2026-12-06: about 25 minutes. Expected
result of the eval.py line (validation split, seed 0): text-to-image overall 0.104 (single object
0.312), editing 0.125, understanding exact match 0.521; reruns move by about ±0.04. The shapes
are mostly not there yet: docs/demo.md.

The generator starts as MAR does (xavier layers, adaLN-zero diffusion head) with two choices
for training from scratch: 2-D sin-cos position tables (``mar.pos_init``; with N(0, 0.02²)
tables a model this small does not learn to use the visible tokens' positions within the
budget, and samples scattered fragments) and the LLM -> MAR residual starting at zero
(``zero_init_proj_out``). Two more make its tokens local: the VAE without attention and with
per-position norms (``vae.attention``, ``vae.norm``: each latent depends on its own
neighbourhood only, not on objects elsewhere in the image), and 2-D ALiBi in MAR's attention
(``mar.attn_bias``: a token attends mostly to its neighbours from the first step on).
Sampling takes 64 MAR iterations (16 leave many neighbouring tokens to be drawn at once) with the
release's sampler; the mode-seeking options (``eval.xt_temperature``, ``eval.ddim_after``) are off.
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
    c.stage_order = ("vae", "gen32", "gen48", "dec")
    c.stages = ml_collections.ConfigDict()
    c.stages.vae = stage("vae", 600, 2e-3, SMALL, dict(t2i=16), trainable=("vae",), kl_weight=1e-6, recon="l2",
                         calibrate_scale=True)
    # all three tasks in every generator step: batches per task, loss weights
    tasks = dict(batch_size=dict(t2i=16, edit=8, understanding=8),
                 loss_weights=dict(t2i=1.0, edit=1.0, understanding=1.0))
    gen = ("mar", "diffloss", "llm", "proj_in", "proj_out")
    c.stages.gen32 = stage("unipic", 3600, 1e-3, SMALL, tasks["batch_size"], trainable=gen, ema=0.99,
                           loss_weights=tasks["loss_weights"])
    c.stages.gen48 = stage("unipic", 400, 5e-4, LARGE, tasks["batch_size"], trainable=gen, ema=0.99,
                           loss_weights=tasks["loss_weights"], max_text_len=dict(edit=256, understanding=256),
                           understanding_size=(48, 48))
    # the denoising decoder: the VAE decoder fine-tuned on latents moved toward Gaussian noise by a share
    # tau ~ U[0, 0.3] per image and with 5 % of tokens swapped, so the generator's imperfect latents decode cleanly
    c.stages.dec = stage("vae", 400, 5e-4, LARGE, dict(t2i=16), trainable=("vae.decoder", "vae.post_quant_conv"),
                         recon="l2", decoder_noise=0.3, decoder_swap=0.05)
    c.train = ml_collections.ConfigDict(dict(log_every=10, checkpoint_every=200, keep=2, progress=True,
                                             sample_every=1000, sample_prompts=()))
    # sampling: the release's sampler (x_T scale 1, no DDIM steps) unless ddim_after is set
    c.eval = ml_collections.ConfigDict(dict(per_category=8, size=(48, 48), num_iter=64, cfg=3.0,
                                            cfg_schedule="constant", temperature=1.0, xt_temperature=1.0,
                                            ddim_after=ml_collections.config_dict.placeholder(float),
                                            ddim_xt_scale=1.0, edit_per_kind=4, qa=24))
    return c
