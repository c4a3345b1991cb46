"""Shapes-world evaluation of a UniPic model: GenEval-style text-to-image scores per category,
editing scores (the scorer applied to the target's description), understanding exact-match.

Prompts come from a held-out split (``validation`` by default), ``per_category`` of each
GenEval category (and of each edit kind), so scores never see training scenes. Generation
uses :mod:`unipic_jax.sample` in batches; everything is deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from unipic_jax import distributed, sample
from unipic_jax.files import write_json
from unipic_jax.data import shapes as world
from unipic_jax.eval import grids
from unipic_jax.rewards import shapes as scorer

# the evaluation's settings: held-out split and seed, image size, how many prompts, sampling
DEFAULTS = dict(split="validation", seed=0, size=(48, 48), per_category=8, edit_per_kind=4, qa=24, num_iter=64,
                cfg=3.0, cfg_schedule="constant", temperature=1.0, xt_temperature=1.0, ddim_after=None,
                ddim_xt_scale=1.0)
SAMPLING = ("num_iter", "cfg", "cfg_schedule", "temperature", "xt_temperature", "ddim_after", "ddim_xt_scale")


def _batches(items, n):
    for i in range(0, len(items), n):
        yield items[i: i + n]


def t2i(model, tok, *, size=(32, 32), per_category: int = 4, split: str = "validation", seed: int = 0,
        batch: int = 8, categories: Sequence[str] = world.CATEGORIES, **sample_kw) -> dict:
    """``{"scores": evaluate(...), "images", "prompts"}`` for held-out prompts of ``categories``."""
    exs = [world.t2i_example(i, split, seed=seed, category=c, sizes=(tuple(size),))
           for c in categories for i in range(per_category)]
    images = []
    for k, chunk in enumerate(_batches(exs, batch)):
        images.extend(sample.text_to_image(model, tok, [e["prompt"] for e in chunk], size=tuple(size),
                                           seed=seed + k, **sample_kw))
    return {"scores": scorer.evaluate(images, [e["metadata"] for e in exs]), "images": images,
            "prompts": [e["prompt"] for e in exs]}


def edit(model, tok, *, size=(32, 32), per_kind: int = 4, split: str = "validation", seed: int = 0,
         batch: int = 8, **sample_kw) -> dict:
    exs = [world.edit_example(i, split, seed=seed, kind=k, sizes=(tuple(size),))
           for k in world.EDITS for i in range(per_kind)]
    images = []
    for k, chunk in enumerate(_batches(exs, batch)):
        images.extend(sample.edit(model, tok, [e["source"] for e in chunk], [e["instruction"] for e in chunk],
                                  size=tuple(size), seed=seed + k, **sample_kw))
    return {"scores": scorer.evaluate(images, [e["metadata"] for e in exs]), "images": images,
            "sources": [e["source"] for e in exs], "instructions": [e["instruction"] for e in exs]}


def understanding(model, tok, *, size=(32, 32), n: int = 24, split: str = "validation", seed: int = 0,
                  batch: int = 8, max_new_tokens: int = 4) -> dict:
    exs = [world.qa_example(i, split, seed=seed, sizes=(tuple(size),)) for i in range(n)]
    answers = []
    for chunk in _batches(exs, batch):
        answers.extend(sample.describe(model, tok, [e["image"] for e in chunk], [e["question"] for e in chunk],
                                       size=tuple(size), max_new_tokens=max_new_tokens))
    correct = [a.strip().lower().rstrip(".") == e["answer"] for a, e in zip(answers, exs, strict=True)]
    return {"accuracy": float(np.mean(correct)), "answers": answers, "questions": [e["question"] for e in exs],
            "expected": [e["answer"] for e in exs], "correct": correct, "images": [e["image"] for e in exs]}


def settings(given: Mapping | None = None, **overrides) -> dict:
    """:data:`DEFAULTS` updated by ``given`` (e.g. a config's ``eval`` section or a model's
    ``eval.json``) and then by ``overrides`` that are not None; unknown keys are an error."""
    out = dict(DEFAULTS)
    for src in (dict(given or {}), {k: v for k, v in overrides.items() if v is not None}):
        unknown = sorted(set(src) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"unknown evaluation settings {unknown}; known: {sorted(DEFAULTS)}")
        out.update(src)
    out["size"] = tuple(int(x) for x in (out["size"] if isinstance(out["size"], (list, tuple)) else
                                         (out["size"], out["size"])))
    for k in ("seed", "per_category", "edit_per_kind", "qa", "num_iter"):
        out[k] = int(out[k])
    for k in ("cfg", "temperature", "xt_temperature", "ddim_xt_scale"):
        out[k] = float(out[k])
    out["ddim_after"] = None if out["ddim_after"] is None else float(out["ddim_after"])
    sample.check_sampling(out["temperature"], out["xt_temperature"], out["ddim_after"], out["ddim_xt_scale"])
    return out


def benchmark(model, tok, s: Mapping, out: Path | None = None) -> dict:
    """The shapes benchmark with settings ``s`` (:func:`settings`): text-to-image scores per
    GenEval category, editing scores (``edit_per_kind``) and understanding exact match
    (``qa``). Process 0 writes ``OUT/results.json`` and labelled grids (:mod:`grids`): ``t2i.png``
    (a row a category, each image with its prompt and verdict), ``edit.png`` (source and result
    side by side with the instruction and verdict) and ``qa.png`` (the image with its question,
    the answer given and the expected one). Every process must call it."""
    size = tuple(s["size"])
    kw = dict({k: s[k] for k in SAMPLING}, seed=s["seed"], split=s["split"])
    results: dict = {"settings": {**s, "size": list(size)}}
    res = t2i(model, tok, size=size, per_category=s["per_category"], **kw)
    verdicts = res["scores"].pop("correct")
    results["t2i"] = res["scores"]
    grids_ = {"t2i.png": grids.labelled(res["images"], res["prompts"], verdicts, cols=s["per_category"])}
    if s["edit_per_kind"]:
        ed = edit(model, tok, size=size, per_kind=s["edit_per_kind"], **kw)
        verdicts = ed["scores"].pop("correct")
        results["edit"] = ed["scores"]
        pairs = [grids.side_by_side(a, b) for a, b in zip(ed["sources"], ed["images"], strict=True)]
        grids_["edit.png"] = grids.labelled(pairs, ed["instructions"], verdicts, cols=s["edit_per_kind"])
    if s["qa"]:
        qa = understanding(model, tok, size=size, n=s["qa"], split=s["split"], seed=s["seed"])
        results["understanding"] = {"accuracy": qa["accuracy"], "n": s["qa"]}
        captions = [f"Q: {q} A: {a.strip() or '(nothing)'} (expected: {e})"
                    for q, a, e in zip(qa["questions"], qa["answers"], qa["expected"], strict=True)]
        grids_["qa.png"] = grids.labelled(qa["images"], captions, qa["correct"], cols=8)
    if out is not None:
        out = Path(out)
        if distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
            for name, g in grids_.items():
                sample.save_png(g[None], [out / name])
            write_json(out / "results.json", results)
        results["samples"] = str(out / "t2i.png")
    return results


def format_summary(summary: dict) -> str:
    """The lines ``train.py`` and ``eval.py`` print for a summary or results dict."""
    lines = [f"trained {summary['steps']} steps; model in {summary.get('model')}"] if "steps" in summary else []
    if "t2i" in summary:
        s = summary["t2i"]
        lines.append("shapes benchmark (held-out prompts, GenEval rules): overall %.3f" % s["overall"])
        lines += [f"  {k:14s} {v:.3f}" for k, v in s["categories"].items()]
        lines.append(f"  objects per image: {s['objects']:.2f} detected, {s['prompted_objects']:.2f} prompted")
    if "edit" in summary:
        lines.append("editing: overall %.3f  %s" % (summary["edit"]["overall"], {k: round(v, 3) for k, v in
                                                                                 summary["edit"]["categories"].items()}))
    if "understanding" in summary:
        lines.append("understanding exact match: %.3f" % summary["understanding"]["accuracy"])
    if "samples" in summary:
        lines.append(f"sample grid: {summary['samples']}")
    return "\n".join(lines)


def sample_prompts(cfg) -> tuple[list[str], list[dict] | None]:
    """``train.sample_prompts`` (no metadata: their grid has no verdicts), or the first two
    held-out shapes prompts of each GenEval category with their metadata."""
    prompts = list(cfg.train.get("sample_prompts", ()) or ())
    if prompts:
        return prompts, None
    exs = [world.t2i_example(i, "validation", seed=cfg.seed, category=c) for i in range(2) for c in world.CATEGORIES]
    return [e["prompt"] for e in exs], [e["metadata"] for e in exs]


def sample_fn(cfg, tok):
    """The periodic sample grid of a run (``train.sample_every`` updates): the fixed prompts of
    :func:`sample_prompts` at the stage's first bucket, sampled with the run's evaluation
    settings (same seed every time, so grids of successive steps compare), each image labelled
    with its prompt and, for the built-in prompts, the scorer's verdict; None for stages that
    do not train the generator."""
    if not int(cfg.train.get("sample_every", 0)):
        return None
    (prompts, metadata), s = sample_prompts(cfg), settings(cfg.eval)

    def fn(model, stage, step):
        del step
        if stage.kind != "unipic":
            return None
        images = sample.text_to_image(model, tok, prompts, size=tuple(stage.data.buckets[0]), seed=cfg.seed,
                                      **{k: s[k] for k in SAMPLING})
        verdicts = scorer.evaluate(images, metadata)["correct"] if metadata else None
        return grids.labelled(images, prompts, verdicts, cols=min(len(prompts), 6))

    return fn
