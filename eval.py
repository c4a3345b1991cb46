"""Evaluate a UniPic checkpoint on the shapes world's held-out split.

    python eval.py --checkpoint runs/demo/model [--tokenizer runs/demo/tokenizer] [--out runs/demo/eval]
                   [--size 48] [--per_category 8] [--edit_per_kind 4] [--qa 24] [--num_iter 64] [--cfg 2]
                   [--cfg_schedule linear] [--temperature 1.0]

Scores text-to-image per GenEval category (the shapes scorer on held-out prompts), editing
triplets (the scorer applied to the target's description) and understanding questions (exact
match), and writes ``OUT/results.json`` and ``OUT/t2i.png`` / ``OUT/edit.png`` grids. The
tokenizer defaults to the ``tokenizer/`` folder next to the checkpoint (where train.py puts it).
"""

import json
import logging
import os
from pathlib import Path

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model checkpoint folder (config.json + params/).", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer folder (default: CHECKPOINT/../tokenizer).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: CHECKPOINT/../eval).")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "test"], "Held-out split of the shapes world.")
_SIZE = flags.DEFINE_integer("size", 48, "Image size (pixels, square).")
_PER_CATEGORY = flags.DEFINE_integer("per_category", 8, "Text-to-image prompts per GenEval category.")
_EDIT = flags.DEFINE_integer("edit_per_kind", 4, "Editing triplets per edit kind (0: skip).")
_QA = flags.DEFINE_integer("qa", 24, "Understanding questions (0: skip).")
_NUM_ITER = flags.DEFINE_integer("num_iter", 64, "MAR sampling iterations (64 as in the report's evaluation).")
_CFG = flags.DEFINE_float("cfg", 2.0, "Classifier-free guidance scale.")
_CFG_SCHEDULE = flags.DEFINE_enum("cfg_schedule", "constant", ["constant", "linear"],
                                  "Guidance over the sampling steps: constant, or linear from 1 (MAR's).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    import unipic_jax

    unipic_jax.tune_cpu_malloc()  # before anything starts JAX's backend
    from unipic_jax import checkpoint, sample
    from unipic_jax import tokenizer as tok_lib
    from unipic_jax.eval import shapes as shapes_eval

    unipic_jax.enable_compilation_cache()
    ckpt = Path(_CHECKPOINT.value)
    try:
        model = checkpoint.load_model(ckpt)
        tok = tok_lib.load_tokenizer(_TOKENIZER.value or ckpt.parent / "tokenizer")
    except (checkpoint.CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"eval.py: {e}") from None
    if len(tok) > model.config.llm.vocab_size:
        raise SystemExit(f"eval.py: the tokenizer has {len(tok)} tokens but the model's vocabulary is "
                         f"{model.config.llm.vocab_size}; pass the tokenizer the model was trained with (--tokenizer).")
    out = Path(_OUT.value or ckpt.parent / "eval")
    out.mkdir(parents=True, exist_ok=True)
    size = (_SIZE.value, _SIZE.value)
    kw = dict(num_iter=_NUM_ITER.value, cfg=_CFG.value, cfg_schedule=_CFG_SCHEDULE.value,
              temperature=_TEMPERATURE.value, seed=_SEED.value, split=_SPLIT.value)
    results = {"checkpoint": str(ckpt), "split": _SPLIT.value, "size": size, **kw}
    t2i = shapes_eval.t2i(model, tok, size=size, per_category=_PER_CATEGORY.value, **kw)
    results["t2i"] = t2i["scores"]
    sample.save_png(shapes_eval.grid(t2i["images"], cols=_PER_CATEGORY.value)[None], [out / "t2i.png"])
    print(f"text-to-image overall {t2i['scores']['overall']:.3f}: " +
          ", ".join(f"{k} {v:.3f}" for k, v in t2i["scores"]["categories"].items()) +
          f"; objects per image {t2i['scores']['objects']:.2f} (prompted {t2i['scores']['prompted_objects']:.2f})")
    if _EDIT.value:
        ed = shapes_eval.edit(model, tok, size=size, per_kind=_EDIT.value, **kw)
        results["edit"] = ed["scores"]
        pairs = [im for pair in zip(ed["sources"], ed["images"], strict=True) for im in pair]
        sample.save_png(shapes_eval.grid(pairs, cols=2 * _EDIT.value)[None], [out / "edit.png"])
        print(f"editing overall {ed['scores']['overall']:.3f}: " +
              ", ".join(f"{k} {v:.3f}" for k, v in ed["scores"]["categories"].items()))
    if _QA.value:
        qa = shapes_eval.understanding(model, tok, size=size, n=_QA.value, split=_SPLIT.value, seed=_SEED.value)
        results["understanding"] = {"accuracy": qa["accuracy"], "n": _QA.value}
        print(f"understanding exact match {qa['accuracy']:.3f}")
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    print(f"wrote {out / 'results.json'} and the grids in {out}")


if __name__ == "__main__":
    app.run(main)
