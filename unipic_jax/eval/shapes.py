"""Shapes-world evaluation of a UniPic model: GenEval-style text-to-image scores per category,
editing scores (the scorer applied to the target's description), understanding exact-match.

Prompts come from a held-out split (``validation`` by default), ``per_category`` of each
GenEval category (and of each edit kind), so scores never see training scenes. Generation
uses :mod:`unipic_jax.sample` in batches; everything is deterministic for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from unipic_jax import sample
from unipic_jax.data import shapes as world
from unipic_jax.rewards import shapes as scorer


def grid(images: Sequence[np.ndarray], cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles same-sized uint8 images into one image (white gutters)."""
    images = [np.asarray(im) for im in images]
    if not images:
        raise ValueError("grid needs at least one image")
    h, w = images[0].shape[:2]
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return out


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
            "expected": [e["answer"] for e in exs]}
