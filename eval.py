"""Evaluate a UniPic checkpoint on the shapes world's held-out split.

    python eval.py --checkpoint runs/demo/model [--tokenizer runs/demo/tokenizer] [--out runs/demo/eval]
                   [--size 48] [--per_category 8] [--edit_per_kind 4] [--qa 24] [--num_iter 64] [--cfg 3]
                   [--cfg_schedule linear] [--temperature 1.0]
                   [--xt_temperature 1.0] [--ddim_after 0.5 --ddim_xt_scale 0.5] [--split validation] [--seed 0]

Scores text-to-image per GenEval category (the shapes scorer on held-out prompts), editing
triplets (the scorer applied to the target's description) and understanding questions (exact
match), and writes ``OUT/results.json`` and the grids ``OUT/t2i.png`` / ``OUT/edit.png``.
Settings not given as flags come from ``CHECKPOINT/eval.json`` (the settings training ended
with: ``eval.py --checkpoint W/model`` alone reproduces the evaluation that training
printed), else from ``unipic_jax.eval.shapes.DEFAULTS``. The tokenizer defaults to the
``tokenizer/`` folder next to the checkpoint (where train.py puts it). Runs on several
processes like train.py (docs/multihost.md); process 0 writes the outputs.
"""

import json
import logging
from pathlib import Path

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model checkpoint folder (config.json + params/).", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer folder (default: CHECKPOINT/../tokenizer).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: CHECKPOINT/../eval).")
_MESH = flags.DEFINE_string("mesh", "data=1,fsdp=-1,tensor=1", "Mesh axis sizes over all processes' devices.")
_SPLIT = flags.DEFINE_enum("split", None, ["validation", "test"], "Held-out split of the shapes world.")
_SIZE = flags.DEFINE_integer("size", None, "Image size (pixels, square).")
_PER_CATEGORY = flags.DEFINE_integer("per_category", None, "Text-to-image prompts per GenEval category.")
_EDIT = flags.DEFINE_integer("edit_per_kind", None, "Editing triplets per edit kind (0: skip).")
_QA = flags.DEFINE_integer("qa", None, "Understanding questions (0: skip).")
_NUM_ITER = flags.DEFINE_integer("num_iter", None, "MAR sampling iterations.")
_CFG = flags.DEFINE_float("cfg", None, "Classifier-free guidance scale.")
_CFG_SCHEDULE = flags.DEFINE_enum("cfg_schedule", None, ["constant", "linear"],
                                  "Guidance over the sampling steps: constant, or linear from 1 (MAR's).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Scale of the diffusion head's per-step noise.")
_XT_TEMPERATURE = flags.DEFINE_float("xt_temperature", None, "Scale of the diffusion head's starting noise x_T.")
_DDIM_AFTER = flags.DEFINE_float("ddim_after", None, "Decode the tokens of MAR steps whose visible fraction is at "
                                 "least this deterministically (DDIM, eta 0); unset: off, the release's sampler.")
_DDIM_XT_SCALE = flags.DEFINE_float("ddim_xt_scale", None, "Scale of x_T for the --ddim_after steps.")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed.")


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    import unipic_jax

    unipic_jax.tune_cpu_malloc()  # before anything starts JAX's backend
    from unipic_jax import checkpoint, distributed, sharding
    from unipic_jax import tokenizer as tok_lib
    from unipic_jax.eval import shapes as shapes_eval

    unipic_jax.enable_compilation_cache()
    ckpt = Path(_CHECKPOINT.value)
    try:
        distributed.initialize()
        mesh = sharding.make_mesh(sharding.mesh_arg(_MESH.value))
        model = checkpoint.load_model(ckpt, mesh=mesh)
        tok = tok_lib.load_tokenizer(_TOKENIZER.value or ckpt.parent / "tokenizer")
        saved = json.loads((ckpt / "eval.json").read_text()) if (ckpt / "eval.json").exists() else {}
        s = shapes_eval.settings(saved, split=_SPLIT.value, size=_SIZE.value, per_category=_PER_CATEGORY.value,
                                 edit_per_kind=_EDIT.value, qa=_QA.value, num_iter=_NUM_ITER.value, cfg=_CFG.value,
                                 cfg_schedule=_CFG_SCHEDULE.value, temperature=_TEMPERATURE.value, seed=_SEED.value,
                                 xt_temperature=_XT_TEMPERATURE.value, ddim_after=_DDIM_AFTER.value,
                                 ddim_xt_scale=_DDIM_XT_SCALE.value)
        distributed.check_same("evaluation settings", {"checkpoint": str(ckpt.absolute()), **s},
                               hint="pass the same flags on every process")
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError, distributed.DistributedError) as e:
        raise SystemExit(f"eval.py: {e}") from None
    if len(tok) > model.config.llm.vocab_size:
        raise SystemExit(f"eval.py: the tokenizer has {len(tok)} tokens but the model's vocabulary is "
                         f"{model.config.llm.vocab_size}; pass the tokenizer the model was trained with (--tokenizer).")
    out = Path(_OUT.value or ckpt.parent / "eval")
    results = shapes_eval.benchmark(model, tok, s, out)
    distributed.barrier("evaluation written")
    if distributed.is_main():
        print(shapes_eval.format_summary(results))
        print(f"settings: {json.dumps(results['settings'])}")
        print(f"wrote {out / 'results.json'} and the grids in {out}")


if __name__ == "__main__":
    app.run(main)
