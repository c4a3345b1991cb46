"""Rewards: frozen functions ``reward(prompts, images, metadata) → scores``, by name.

A reward takes the batch's prompts (``B`` strings), its images (uint8 ``(B, H, W, 3)``, NumPy,
on the host) and one metadata dict per image (the shapes world's GenEval-style entries, or
whatever the prompt source carries) and returns ``B`` finite scores. Nothing a reward computes
is ever differentiated, so any host code serves: a NumPy scorer, a frozen Flax model, a
PyTorch model, a request to a remote service. Built in:

=================  ==============================================================================
``shapes``         1 where the shapes scorer grades the image correct (GenEval's rule), else 0
``shapes_checks``  the fraction of the prompt's checks that pass (partial credit)
``shapes_fit``     dense: how well detected objects of the prompted colours fit the prompted
                   shapes (:func:`shapes.shape_fit`), visible before a check flips
``redness``        the mean of ``(R − (G + B)/2) / 255``: a toy reward for testing the loop
=================  ==============================================================================

Select rewards by name with weights (``{"shapes": 1.0, "shapes_fit": 0.5}``,
:func:`combine`). A name of the form ``"package.module:function"`` imports that function, so a
user's reward plugs in without registering: e.g. a PyTorch scorer wrapped as ::

    def clip_score(prompts, images, metadata):       # my_rewards.py
        with torch.no_grad():
            return model(preprocess(images), prompts).cpu().numpy()

selected as ``"my_rewards:clip_score"``. Each process scores its own images (its prompts'
groups stay on it), so a remote scorer sees one request a process a batch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

RewardFn = Callable[[Sequence[str], np.ndarray, Sequence[dict]], "np.typing.ArrayLike"]
REGISTRY: dict[str, RewardFn] = {}


def register(name: str, fn: RewardFn | None = None):
    """Registers ``fn`` under ``name`` (usable as a decorator)."""
    def add(f):
        if name in REGISTRY:
            raise ValueError(f"a reward named {name!r} is registered already")
        REGISTRY[name] = f
        return f

    return add if fn is None else add(fn)


def get(name: str) -> RewardFn:
    """The reward called ``name``: a registered one, or ``"module:function"`` imported."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {name!r}: cannot import {attr!r} from {module!r} ({e})") from e
        if not callable(fn):
            raise ValueError(f"reward {name!r} is not callable")
        return fn
    raise ValueError(f"unknown reward {name!r}; choose from {sorted(REGISTRY)} or give 'package.module:function'")


def check_scores(name: str, scores, batch: int) -> np.ndarray:
    """``scores`` as float32 ``(batch,)``, or a ``ValueError`` naming the reward."""
    try:
        out = np.asarray(scores, np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward {name!r} returned {type(scores).__name__}, not {batch} numbers ({e})") from e
    if out.shape != (batch,):
        raise ValueError(f"reward {name!r} returned shape {out.shape}; it must return one score per image, "
                         f"({batch},)")
    if not np.all(np.isfinite(out)):
        bad = np.flatnonzero(~np.isfinite(out)).tolist()
        raise ValueError(f"reward {name!r} returned non-finite scores for images {bad[:8]}: {out[bad[:8]].tolist()}")
    return out


class Combined:
    """``Σ_i w_i · reward_i``: ``__call__`` returns ``(total (B,), {name: scores (B,)})``."""

    def __init__(self, weights: Mapping[str, float]):
        if not weights:
            raise ValueError("no reward selected: give at least one {name: weight}")
        self.weights = {str(k): float(v) for k, v in weights.items()}
        self.fns = {k: get(k) for k in self.weights}

    def __call__(self, prompts: Sequence[str], images, metadata: Sequence[dict]):
        images = np.asarray(images)
        B = len(images)
        if len(prompts) != B or len(metadata) != B:
            raise ValueError(f"{B} images, {len(prompts)} prompts and {len(metadata)} metadata entries")
        parts = {k: check_scores(k, fn(list(prompts), images, list(metadata)), B) for k, fn in self.fns.items()}
        total = sum(self.weights[k] * v for k, v in parts.items())
        return np.asarray(total, np.float32), parts


def combine(weights: Mapping[str, float]) -> Combined:
    return Combined(weights)


def _shapes(field):
    def fn(prompts, images, metadata):
        from unipic_jax.rewards import shapes

        del prompts
        out = []
        for im, meta in zip(images, metadata, strict=True):
            dets = shapes.detect(im)
            if field == "fit":
                out.append(shapes.shape_fit(dets, meta))
            else:
                g = shapes.grade(dets, meta, im.shape[0], im.shape[1])
                out.append(float(g["correct"]) if field == "correct" else g["reward"])
        return np.asarray(out, np.float32)

    return fn


def redness(prompts, images, metadata):
    del prompts, metadata
    x = np.asarray(images, np.float32)
    return ((x[..., 0] - 0.5 * (x[..., 1] + x[..., 2])) / 255.0).mean(axis=(1, 2))


register("shapes", _shapes("correct"))
register("shapes_checks", _shapes("reward"))
register("shapes_fit", _shapes("fit"))
register("redness", redness)
