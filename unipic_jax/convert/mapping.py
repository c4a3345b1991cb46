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

``scanned=True`` says our tensor stacks one PyTorch tensor per block on its leading axis
(a model built with ``scan_layers``): the first ``{}`` of the torch template is the block
index and has no counterpart in ours (``model.layers.{}.mlp.down_proj.weight`` ↔
``layers.mlp.down_proj.kernel[i]``); :func:`layer_form` rewrites a table written for the
unrolled model. With ``stack`` too, the torch tensor is ``ours[i, stack]``.

Templates compile to anchored regular expressions both ways, so every key maps in both
directions from one line of the table. A mapped tensor is a :class:`Slot`: the torch key, its
rule and ``index``, the leading indices of our tensor that it fills (``()`` for all of it).
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
    scanned: bool = False  # the torch tensor is ours[block] (block = the first {} of the torch key)


class Slot(NamedTuple):
    key: str  # the torch key
    rule: Rule
    index: tuple[int, ...]  # the leading indices of our tensor this torch tensor fills


def lead(rule: Rule) -> int:
    """How many leading axes of our tensor index the torch tensors that fill it."""
    return int(rule.scanned) + (rule.stack is not None)


def layer_form(rules: Sequence[Rule], stacks: Sequence[str]) -> tuple[Rule, ...]:
    """The table for a model whose block lists ``stacks`` (our path prefixes, e.g. ``"layers"``)
    are stacked: ``{s}.{}.rest`` becomes ``{s}.rest`` with ``scanned=True``."""
    out = []
    for r in rules:
        for s in stacks:
            head = f"{s}.{{}}."
            if r.ours.startswith(head):
                if "{}" not in r.torch:
                    raise ValueError(f"Rule {r} has no block index in its torch key")
                r = r._replace(ours=f"{s}." + r.ours[len(head):], scanned=True)
                break
        out.append(r)
    return tuple(out)


def _compile(template: str) -> re.Pattern:
    parts = template.split("{}")
    return re.compile(r"(\d+)".join(re.escape(p) for p in parts) + r"\Z")


class KeyMap:
    """A compiled table. ``to_ours(key)`` returns ``(path, rule, index)`` or ``None``;
    ``to_torch(path, shape)`` returns every :class:`Slot` that fills the parameter (several
    for a stacked parameter, none for an unmapped one)."""

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

    def to_ours(self, torch_key: str) -> tuple[str, Rule, tuple[int, ...]] | None:
        candidates = [torch_key] + [torch_key[len(p):] for p in self.prefixes if torch_key.startswith(p)]
        for key in candidates:
            for pat, r in self._torch:
                if m := pat.match(key):
                    g = m.groups()
                    block = (int(g[0]),) if r.scanned else ()
                    stack = () if r.stack is None else (r.stack,)
                    return r.ours.format(*g[len(block):]), r, block + stack
        return None

    def to_torch(self, our_path: str, shape: Sequence[int] | None = None) -> list[Slot]:
        """The slots of parameter ``our_path``; a scanned one needs its ``shape`` (its leading
        axis counts the blocks)."""
        out = []
        for pat, r in self._ours:
            if m := pat.match(our_path):
                stack = () if r.stack is None else (r.stack,)
                if not r.scanned:
                    out.append(Slot(r.torch.format(*m.groups()), r, stack))
                    continue
                if shape is None:
                    raise ValueError(f"{our_path} is a stacked parameter: to_torch needs its shape")
                out += [Slot(r.torch.format(i, *m.groups()), r, (i,) + stack) for i in range(shape[0])]
        return out


def torch_shape(rule: Rule, our_shape: Sequence[int]) -> tuple[int, ...]:
    """The PyTorch tensor shape that corresponds to our parameter shape under ``rule``."""
    our_shape = tuple(our_shape)[lead(rule) :]
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
    """The PyTorch tensor laid out as our parameter's slice (its ``index``)."""
    if rule.kind == "transpose":
        x = np.ascontiguousarray(x.transpose(rule.perm))
    return x.reshape(tuple(our_shape)[lead(rule) :])


def ours_to_torch(rule: Rule, x: np.ndarray, index: tuple[int, ...] | None = None) -> np.ndarray:
    """Our parameter's slice ``index`` (default: the rule's ``stack``, for an unscanned rule)
    as the PyTorch tensor."""
    shape = torch_shape(rule, x.shape)
    if index is None:
        if rule.scanned:
            raise ValueError(f"Rule {rule} is scanned: pass the block index")
        index = () if rule.stack is None else (rule.stack,)
    x = x[index] if index else x
    if rule.kind == "transpose":
        return np.ascontiguousarray(x.transpose(np.argsort(rule.perm)))
    return np.ascontiguousarray(x.reshape(shape))


def path_str(path: Sequence) -> str:
    """NNX flat-state path tuple → dotted string (``('layers', 0, 'attn')`` → ``layers.0.attn``)."""
    return ".".join(str(p) for p in path)
