"""UniPic-1 at full size (1.5B): the four training stages of the report's Table 1.

    python train.py --config configs/unipic_1p5b.py:ct --workdir gs://bucket/unipic/ct \\
        --config.tokenizer=/ckpt/Qwen2.5-1.5B-Instruct --config.data.tfds.t2i=my_t2i_dataset

The argument after ``:`` picks the stage (``pt``, ``align``, ``ct``, ``sft``); each stage is
its own run. Every stage trains with AdamW β (0.9, 0.95), clipping at 1.0, bf16 compute with
float32 master weights and rematerialisation; the VAE is frozen throughout. The repeated blocks
(LLM layers, MAR blocks, diffusion-head blocks) are stacked and scanned (``scan_layers``), so a
step compiles each block once.

| stage | trained | lr / schedule | wd / warmup | EMA | generation / understanding px | und:gen:edit |
| --- | --- | --- | --- | --- | --- | --- |
| pt    | MAR (generation only)   | 5e-5 constant | 0 / 0.05    | 0.9999 | 512 / 256  | 0:1:0 |
| align | projectors (LLM frozen) | 1e-5 cosine   | 0.02 / 0.05 | –      | 1024 / 512 | 0.01:1:1 |
| ct    | all but the VAE         | 1e-5 cosine   | 0.02 / 0.01 | 0.9999 | 1024 / 512 | 0.01:1:1 |
| sft   | all but the VAE         | 5e-6 cosine   | 0.02 / 0.01 | 0.995  | 1024 / 512 | 0.01:1:1 |

(The report gives no loss weights for Align; this config uses the later stages'.) Data: TFDS
ArrayRecord data sets (``data.source="tfds"``, names per task) or JSONL manifests
(``data.source="jsonl"``); the batch sizes below are global (for a v5p-128-class pod) and are
divided among hosts.
"""

import ml_collections

ALL_BUT_VAE = ("mar", "diffloss", "llm", "proj_in", "proj_out")
STAGES = {
    "pt": dict(trainable=("mar", "diffloss"), lr=5e-5, schedule="constant", weight_decay=0.0, warmup=0.05,
               ema=0.9999, gen=512, und=256, weights=dict(understanding=0.0, t2i=1.0, edit=0.0)),
    "align": dict(trainable=("proj_in", "proj_out"), lr=1e-5, schedule="cosine", weight_decay=0.02, warmup=0.05,
                  ema=0.0, gen=1024, und=512, weights=dict(understanding=0.01, t2i=1.0, edit=1.0)),
    "ct": dict(trainable=ALL_BUT_VAE, lr=1e-5, schedule="cosine", weight_decay=0.02, warmup=0.01, ema=0.9999,
               gen=1024, und=512, weights=dict(understanding=0.01, t2i=1.0, edit=1.0)),
    "sft": dict(trainable=ALL_BUT_VAE, lr=5e-6, schedule="cosine", weight_decay=0.02, warmup=0.01, ema=0.995,
                gen=1024, und=512, weights=dict(understanding=0.01, t2i=1.0, edit=1.0)),
}


def buckets(size):
    """A square bucket and 4:3 / 3:4 variants, in multiples of the 16-pixel latent stride."""
    q = size * 3 // 4 // 16 * 16
    return ((size, size), (q, size), (size, q))


def get_config(stage: str = "ct") -> ml_collections.ConfigDict:
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; choose from {sorted(STAGES)}")
    s = STAGES[stage]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.tokenizer = "Qwen2.5-1.5B-Instruct"  # a local folder: tokenizers are never downloaded
    # initial weights: the UniPic-1 release or a converted checkpoint (all parts), or an HF
    # Qwen2.5 folder with init_parts=("llm",); see unipic_jax/train/warm_start.py
    c.init = ""
    c.init_parts = ("",)
    c.model = ml_collections.ConfigDict(dict(
        preset="unipic_1_5b",
        overrides=dict(llm=dict(dtype="bfloat16", param_dtype="float32", remat="full", scan_layers=True),
                       mar=dict(dtype="bfloat16", param_dtype="float32", remat=True, scan_layers=True),
                       diffloss=dict(dtype="bfloat16", param_dtype="float32", scan_layers=True),
                       vae=dict(dtype="bfloat16", param_dtype="float32"))))
    c.data = ml_collections.ConfigDict(dict(
        source="tfds", data_dir="", tfds=dict(t2i="t2i_dataset", edit="edit_dataset", understanding="qa_dataset"),
        jsonl=dict(t2i="", edit="", understanding=""), split="train"))
    c.stage_order = (stage,)
    c.stages = ml_collections.ConfigDict()
    c.stages[stage] = ml_collections.ConfigDict(dict(
        kind="unipic", steps=100_000, lr=s["lr"], schedule=s["schedule"], warmup=s["warmup"],
        weight_decay=s["weight_decay"], clip=1.0, accumulate=1, ema=s["ema"], trainable=s["trainable"],
        buckets=buckets(s["gen"]), understanding_size=(s["und"], s["und"]),
        batch_size=dict(t2i=256, edit=128 if s["weights"]["edit"] else 0,
                        understanding=128 if s["weights"]["understanding"] else 0),
        max_text_len=dict(t2i=128, edit=(s["gen"] // 16) ** 2 + 64 + 96,
                          understanding=(s["und"] // 16) ** 2 + 64 + 160),
        loss_weights=s["weights"], caption_dropout=0.1))
    c.train = ml_collections.ConfigDict(dict(log_every=50, checkpoint_every=1000, keep=3, progress=True,
                                             sample_every=1000, sample_prompts=()))
    c.eval = ml_collections.ConfigDict(dict(per_category=0, size=(512, 512), num_iter=32, cfg=3.0,
                                            cfg_schedule="constant", temperature=1.0, edit_per_kind=0, qa=0))
    return c
