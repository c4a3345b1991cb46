"""Bidirectional key-mapping tables between PyTorch state dicts and NNX states.

A table is a sequence of :class:`Rule`. Each rule pairs a PyTorch key template with an
NNX path template (dotted; ``{}`` stands for a layer index) and says how the tensor
changes on the way:

``copy``     same shape and layout.
``reshape``  same memory order, axes split or merged: the first ``split`` axes of our
             tensor merge into PyTorch's first axis and the rest into its second (if any).
             Our kernels use PyTorch's ``nn.Linear`` layout ``(out, in)`` with head axes
             split out, so e.g. ``q_proj`` ``(H·hd, D)`` ↔ ``(H, hd, D)`` is ``split=2``, a
             bias ``(H·hd,)`` ↔ ``(H, hd)`` is ``split=2`` and ``o_proj`` ``(D, H·hd)`` ↔
             ``(D, H, hd)`` is ``split=1``. No tensor is ever transposed.

``transpose`` a permutation ``perm``: ours = ``torch.transpose(perm)`` (e.g. a Conv2d weight
             ``(O, C, kh, kw)`` as ``(O, kh, kw, C)`` to match channels-last patches).

``stack=i`` (with any kind) says the PyTorch tensor is slice ``i`` of our tensor's
leading axis: several PyTorch tensors stacked into one parameter (e.g. the SwiGLU
``gate_proj`` and ``up_proj`` as ``gate_up_proj[0]`` and ``[1]``, one matmul instead of two).

Templates compile to anchored regular expressions both ways, so every key maps in both
directions from one line of the table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Rule(NamedTuple):
    torch: str
    ours: str
    kind: str = "copy"  # copy | reshape | transpose
    split: int = 1  # reshape: how many of our leading axes form PyTorch's first axis
    stack: int | None = None  # the torch tensor is ours[stack]
    perm: tuple[int, ...] = ()  # transpose: ours = torch.transpose(perm)


def _compile(template: str) -> re.Pattern:
    parts = template.split("{}")
    return re.compile(r"(\d+)".join(re.escape(p) for p in parts) + r"\Z")


class KeyMap:
    """A compiled table. ``to_ours(key)`` returns ``(path, rule)`` or ``None``;
    ``to_torch(path)`` returns every ``(key, rule)`` that fills the parameter (several for
    a stacked parameter, none for an unmapped one)."""

    def __init__(self, rules: Sequence[Rule], ignore_torch: Sequence[str] = (), prefixes: Sequence[str] = ()):
        """``prefixes``: optional leading parts of torch keys that are stripped before matching
        (e.g. ``vision_model.`` when a vision tower is read out of a full model)."""
        for r in rules:
            if r.kind not in ("copy", "reshape", "transpose") or (r.kind == "transpose") != bool(r.perm):
                raise ValueError(f"Malformed rule {r}")
        self.rules = tuple(rules)
        self.prefixes = tuple(prefixes)
        self._torch = [(_compile(r.torch), r) for r in rules]
        self._ours = [(_compile(r.ours), r) for r in rules]
        self._ignore = [re.compile(p) for p in ignore_torch]

    def ignored(self, torch_key: str) -> bool:
        return any(p.fullmatch(torch_key) for p in self._ignore)

    def to_ours(self, torch_key: str) -> tuple[str, Rule] | None:
        candidates = [torch_key] + [torch_key[len(p):] for p in self.prefixes if torch_key.startswith(p)]
        for key in candidates:
            for pat, r in self._torch:
                if m := pat.match(key):
                    return r.ours.format(*m.groups()), r
        return None

    def to_torch(self, our_path: str) -> list[tuple[str, Rule]]:
        return [(r.torch.format(*m.groups()), r) for pat, r in self._ours if (m := pat.match(our_path))]


def torch_shape(rule: Rule, our_shape: Sequence[int]) -> tuple[int, ...]:
    """The PyTorch tensor shape that corresponds to our parameter shape under ``rule``."""
    our_shape = tuple(our_shape)[(rule.stack is not None) :]
    if rule.kind == "copy":
        return our_shape
    if rule.kind == "transpose":
        out = [0] * len(our_shape)
        for k, src in enumerate(rule.perm):
            out[src] = our_shape[k]
        return tuple(out)
    head, tail = our_shape[: rule.split], our_shape[rule.split :]
    return (math.prod(head),) + ((math.prod(tail),) if tail else ())


def torch_to_ours(rule: Rule, x: np.ndarray, our_shape: Sequence[int]) -> np.ndarray:
    """The PyTorch tensor laid out as our parameter (as its slice ``stack`` if stacked)."""
    if rule.kind == "transpose":
        x = np.ascontiguousarray(x.transpose(rule.perm))
    return x.reshape(tuple(our_shape)[(rule.stack is not None) :])


def ours_to_torch(rule: Rule, x: np.ndarray) -> np.ndarray:
    shape = torch_shape(rule, x.shape)
    x = x if rule.stack is None else x[rule.stack]
    if rule.kind == "transpose":
        return np.ascontiguousarray(x.transpose(np.argsort(rule.perm)))
    return np.ascontiguousarray(x.reshape(shape))


def path_str(path: Sequence) -> str:
    """NNX flat-state path tuple → dotted string (``('layers', 0, 'attn')`` → ``layers.0.attn``)."""
    return ".".join(str(p) for p in path)
