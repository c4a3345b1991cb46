"""The shapes world: procedural scenes with exact ground truth, for every UniPic task.

A scene is a canvas of any ``height × width`` (white background) holding 1–4 flat-coloured,
non-overlapping objects. Everything is drawn deterministically from ``(split, seed, index)``
(``numpy.random.default_rng([split_id, seed, index])``), so held-out splits never share a
random stream with training.

* shapes: circle, square, triangle (apex up), diamond, cross (a plus sign);
* colours: :data:`COLORS` (8 saturated colours, far apart in RGB and from any blend with the
  white background, so blurred edges are not mistaken for another colour);
* an object is ``(shape, color, cx, cy, r)`` in pixels: centre and half-size (every shape
  fits its ``2r × 2r`` box, which lies inside the canvas); objects keep ``r·√2`` clearance
  plus a margin from each other (crowded scenes: their boxes 1 px apart), and ``r`` is a fraction of the canvas's shorter side, never
  below the legibility floor :func:`min_radius`. Draw scenes at the size they are used at
  (``sizes=``): a crop can cut objects and a downscale can take them below the floor.

Each scene yields:

* **text-to-image** (:func:`t2i_example`): a GenEval-style prompt and its GenEval-format
  metadata, in the six GenEval categories with GenEval's wording — ``single_object`` "a photo of
  a circle", ``two_object`` "a photo of a circle and a square", ``counting`` "a photo of three
  triangles", ``colors`` "a photo of a red circle", ``position`` "a photo of a circle right of a
  square", ``color_attr`` "a photo of a red circle and a blue square";
* **editing** (:func:`edit_example`): source, instruction, target and the target's metadata —
  recolour, add, remove, move;
* **understanding** (:func:`qa_example`): a question with a one-word answer — a colour, a count
  word, a shape, or left/right/above/below.

Metadata follows GenEval's ``evaluation_metadata.jsonl``: ``{"tag", "include": [{"class",
"count", "color"?, "position"?: [relation, index into include]}], "exclude": [...]}``, plus a
``"region"`` (``left``/``right``/``top``/``bottom`` half of the canvas) for moved objects.
:mod:`unipic_jax.rewards.shapes` grades images against it.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (235, 210, 0),
    "green": (30, 150, 50),
    "cyan": (0, 185, 200),
    "blue": (30, 60, 220),
    "purple": (120, 40, 170),
    "pink": (240, 70, 190),
}
BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"cross": "crosses"}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
EDITS = ("recolor", "add", "remove", "move")
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = {"train": 0, "validation": 1, "test": 2}
SIZES = ((64, 64), (48, 64), (64, 48))  # default canvases: square and 4:3 / 3:4
MIN_RADIUS = 5.5


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cx: float
    cy: float
    r: float


@dataclasses.dataclass(frozen=True)
class Scene:
    height: int
    width: int
    objects: tuple[Obj, ...]


def rng_for(split: str, seed: int, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose from {sorted(SPLITS)}")
    return np.random.default_rng([SPLITS[split], seed, index])


# -- drawing -----------------------------------------------------------------------------


def outline(o: Obj) -> list[tuple[float, float]] | None:
    """Polygon vertices of an object (``None`` for a circle)."""
    x, y, r = o.cx, o.cy, o.r
    if o.shape == "circle":
        return None
    if o.shape == "square":
        s = 0.9 * r
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if o.shape == "triangle":
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    if o.shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    if o.shape == "cross":
        a = r / 3
        return [(x - a, y - r), (x + a, y - r), (x + a, y - a), (x + r, y - a), (x + r, y + a), (x + a, y + a),
                (x + a, y + r), (x - a, y + r), (x - a, y + a), (x - r, y + a), (x - r, y - a), (x - a, y - a)]
    raise ValueError(f"Unknown shape {o.shape!r}; shapes are {SHAPES}")


def render(scene: Scene, supersample: int = 4) -> np.ndarray:
    """The scene as RGB uint8 ``(height, width, 3)``, antialiased by supersampling."""
    from PIL import Image, ImageDraw

    k = supersample
    img = Image.new("RGB", (scene.width * k, scene.height * k), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fill = COLORS[o.color]
        pts = outline(o)
        if pts is None:
            draw.ellipse([(o.cx - o.r) * k, (o.cy - o.r) * k, (o.cx + o.r) * k, (o.cy + o.r) * k], fill=fill)
        else:
            draw.polygon([(px * k, py * k) for px, py in pts], fill=fill)
    return np.asarray(img.reduce(k) if k > 1 else img)


# -- scenes ------------------------------------------------------------------------------


def min_radius(height: int, width: int) -> float:
    """The legibility floor: the least half-size of an object on a ``height × width`` canvas,
    ``min(MIN_RADIUS, side / 6)`` px for the shorter ``side`` (smaller diamonds, circles and
    crosses are ambiguous pixel patterns; a sixth of the side leaves room for four objects).
    Every object of every scene is at least this large."""
    return min(MIN_RADIUS, min(height, width) / 6)


def _radius(rng, height, width, n) -> float:
    """Half-size of an object in a scene of ``n``: a fraction of the shorter side (drawn from a
    range that shrinks with ``n``), and at least :func:`min_radius`."""
    lo, hi = {1: (0.16, 0.24), 2: (0.12, 0.17), 3: (0.10, 0.13), 4: (0.09, 0.11)}[max(1, min(n, 4))]
    return max(float(rng.uniform(lo, hi)) * min(height, width), min_radius(height, width))


def _fits(o: Obj, others: Sequence[Obj], height, width, tight: bool = False) -> bool:
    """Inside the canvas, and clear of ``others``: centres farther apart than the boxes'
    circumcircles (``(r + r')·√2``) plus 1 px, or, ``tight``, the boxes 1 px apart."""
    if not (o.r <= o.cx <= width - o.r and o.r <= o.cy <= height - o.r):
        return False
    if tight:
        return all(max(abs(o.cx - p.cx), abs(o.cy - p.cy)) > o.r + p.r + 1.0 for p in others)
    return all(math.hypot(o.cx - p.cx, o.cy - p.cy) > (o.r + p.r) * math.sqrt(2) + 1.0 for p in others)


def place(rng, shape, color, others, height, width, r, region=None, tries: int = 200,
          tight: bool = False) -> Obj | None:
    """A random non-overlapping position for a new object (optionally within a half-canvas
    ``region``; ``tight``: see :func:`_fits`), or ``None`` if there is no room."""
    x0, x1, y0, y1 = 0.0, float(width), 0.0, float(height)
    if region == "left":
        x1 = width / 2
    elif region == "right":
        x0 = width / 2
    elif region == "top":
        y1 = height / 2
    elif region == "bottom":
        y0 = height / 2
    for _ in range(tries):
        if x1 - x0 < 2 * r or y1 - y0 < 2 * r:
            return None
        o = Obj(shape, color, float(rng.uniform(x0 + r, x1 - r)), float(rng.uniform(y0 + r, y1 - r)), r)
        if _fits(o, others, height, width, tight):
            return o
    return None


def random_scene(rng, height, width, specs: Sequence[tuple[str, str]], region_of=None) -> Scene:
    """Places objects ``specs = [(shape, color), ...]`` (and retries until ``region_of(objs)``
    holds); shrinks them if they do not fit, never below :func:`min_radius`, and after 50
    attempts packs them tighter (boxes apart rather than circumcircles)."""
    for attempt in range(100):
        objs: list[Obj] = []
        for shape, color in specs:
            r = max(_radius(rng, height, width, len(specs)) * (0.9 ** (attempt // 5)), min_radius(height, width))
            o = place(rng, shape, color, objs, height, width, r, tight=attempt >= 50)
            if o is None:
                break
            objs.append(o)
        else:
            if region_of is None or region_of(objs):
                return Scene(height, width, tuple(objs))
    raise RuntimeError(f"Could not place {specs} on a {height}x{width} canvas")


def relation(a: Obj, b: Obj, threshold: float = 0.1) -> set[str]:
    """GenEval's relative position of ``a`` with respect to ``b``: the centre offset, shrunk by
    ``threshold`` times the summed box sizes, normalised; a component beyond ±0.5 names the
    relation (image ``y`` grows downwards, so negative ``dy`` is "above")."""
    return relation_from_boxes((a.cx - a.r, a.cy - a.r, a.cx + a.r, a.cy + a.r),
                               (b.cx - b.r, b.cy - b.r, b.cx + b.r, b.cy + b.r), threshold)


def relation_from_boxes(box_a, box_b, threshold: float = 0.1) -> set[str]:
    ca = np.array([(box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2])
    cb = np.array([(box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2])
    da = np.array([box_a[2] - box_a[0], box_a[3] - box_a[1]])
    db = np.array([box_b[2] - box_b[0], box_b[3] - box_b[1]])
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - threshold * (da + db), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def canvas(rng, sizes) -> tuple[int, int]:
    h, w = sizes[int(rng.integers(len(sizes)))]
    return int(h), int(w)


def describe(scene: Scene, tag: str, absent: Sequence[tuple[str, str]] = ()) -> dict:
    """Metadata that a scene satisfies exactly: every (shape, colour) group with its count,
    no more of any of them, and none of the ``absent`` (shape, colour) pairs."""
    groups = Counter((o.shape, o.color) for o in scene.objects)
    include = [{"class": s, "count": n, "color": c} for (s, c), n in sorted(groups.items())]
    exclude = [{"class": s, "count": n + 1, "color": c} for (s, c), n in sorted(groups.items())]
    exclude += [{"class": s, "count": 1, "color": c} for s, c in sorted(set(absent)) if (s, c) not in groups]
    return {"tag": tag, "include": include, "exclude": exclude}


def a(word: str) -> str:
    """``word`` with its indefinite article."""
    return ("an " if word[0] in "aeiou" else "a ") + word


# -- the three tasks ---------------------------------------------------------------------


def _pick(rng, items, k=1, exclude=()):
    pool = [i for i in items if i not in exclude]
    idx = rng.choice(len(pool), size=k, replace=False)
    return [pool[int(i)] for i in idx]


def t2i_example(index: int, split: str = "train", seed: int = 0, category: str | None = None,
                sizes: Sequence[tuple[int, int]] = SIZES) -> dict:
    """``{"image", "prompt", "metadata", "scene"}`` for one text-to-image pair."""
    rng = rng_for(split, seed, index)
    h, w = canvas(rng, sizes)  # the first draw of every example: its size is known without drawing it
    category = category or CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    if category not in CATEGORIES:
        raise ValueError(f"Unknown category {category!r}; choose from {CATEGORIES}")
    colors = list(COLORS)
    if category == "single_object":
        (s,) = _pick(rng, SHAPES)
        scene = random_scene(rng, h, w, [(s, _pick(rng, colors)[0])])
        prompt, include, exclude = f"a photo of {a(s)}", [{"class": s, "count": 1}], []
    elif category == "two_object":
        sa, sb = _pick(rng, SHAPES, 2)
        scene = random_scene(rng, h, w, [(sa, _pick(rng, colors)[0]), (sb, _pick(rng, colors)[0])])
        prompt = f"a photo of {a(sa)} and {a(sb)}"
        include, exclude = [{"class": sa, "count": 1}, {"class": sb, "count": 1}], []
    elif category == "counting":
        (s,) = _pick(rng, SHAPES)
        n = int(rng.integers(2, 5))
        scene = random_scene(rng, h, w, [(s, _pick(rng, colors)[0]) for _ in range(n)])
        prompt = f"a photo of {NUMBERS[n]} {plural(s)}"
        include, exclude = [{"class": s, "count": n}], [{"class": s, "count": n + 1}]
    elif category == "colors":
        (s,), (c,) = _pick(rng, SHAPES), _pick(rng, colors)
        scene = random_scene(rng, h, w, [(s, c)])
        prompt, include, exclude = f"a photo of {a(c)} {s}", [{"class": s, "count": 1, "color": c}], []
    elif category == "position":
        sa, sb = _pick(rng, SHAPES, 2)
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        scene = random_scene(rng, h, w, [(sb, _pick(rng, colors)[0]), (sa, _pick(rng, colors)[0])],
                             region_of=lambda objs: rel in relation(objs[1], objs[0], threshold=0.25))
        prompt = f"a photo of {a(sa)} {rel} {a(sb)}"
        include, exclude = [{"class": sb, "count": 1}, {"class": sa, "count": 1, "position": [rel, 0]}], []
    else:  # color_attr
        sa, sb = _pick(rng, SHAPES, 2)
        ca, cb = _pick(rng, colors, 2)
        scene = random_scene(rng, h, w, [(sa, ca), (sb, cb)])
        prompt = f"a photo of {a(ca)} {sa} and {a(cb)} {sb}"
        include, exclude = [{"class": sa, "count": 1, "color": ca}, {"class": sb, "count": 1, "color": cb}], []
    meta = {"tag": category, "include": include, "exclude": exclude, "prompt": prompt}
    return {"image": render(scene), "prompt": prompt, "metadata": meta, "scene": scene}


def _unique(scene: Scene) -> list[int]:
    """Indices of objects whose (shape, colour) is unique in the scene (nameable as "the red circle")."""
    groups = Counter((o.shape, o.color) for o in scene.objects)
    return [i for i, o in enumerate(scene.objects) if groups[(o.shape, o.color)] == 1]


def _try_edit(rng, kind: str, h: int, w: int, n: int):
    """One attempt at an edit: ``(source, edited object, target objects, instruction, extra)``
    or ``None`` when the canvas has no room for it."""
    specs = [(_pick(rng, SHAPES)[0], _pick(rng, list(COLORS))[0]) for _ in range(n)]
    src = random_scene(rng, h, w, specs)
    names = _unique(src)
    if not names:
        return None
    i = names[int(rng.integers(len(names)))]
    o = src.objects[i]
    others = [p for j, p in enumerate(src.objects) if j != i]
    extra = {}
    if kind == "recolor":
        (c2,) = _pick(rng, list(COLORS), exclude=(o.color,))
        objs = list(src.objects)
        objs[i] = dataclasses.replace(o, color=c2)
        instruction = f"Change the color of the {o.color} {o.shape} to {c2}."
    elif kind == "add":
        s2, c2 = _pick(rng, SHAPES)[0], _pick(rng, list(COLORS))[0]
        new = place(rng, s2, c2, src.objects, h, w, _radius(rng, h, w, len(src.objects) + 1))
        if new is None:
            return None
        objs = [*src.objects, new]
        instruction = f"Add {a(c2)} {s2}."
    elif kind == "remove":
        objs = others
        instruction = f"Remove the {o.color} {o.shape}."
    else:  # move, to a half of the canvas the object is not in now, so that the edit is visible
        sides = [side for side, away in (("left", o.cx > w / 2), ("right", o.cx < w / 2), ("top", o.cy > h / 2),
                                         ("bottom", o.cy < h / 2)) if away]
        side = sides[int(rng.integers(len(sides)))]
        moved = place(rng, o.shape, o.color, others, h, w, o.r, region=side)
        if moved is None:
            return None
        objs = [*others, moved]
        instruction = f"Move the {o.color} {o.shape} to the {side}."
        extra = {"class": o.shape, "color": o.color, "region": side}
    return src, o, objs, instruction, extra


def edit_example(index: int, split: str = "train", seed: int = 0, kind: str | None = None,
                 sizes: Sequence[tuple[int, int]] = SIZES) -> dict:
    """``{"source", "target", "instruction", "metadata", "kind"}``: the target's metadata
    describes the whole target scene (groups and their exact counts)."""
    rng = rng_for(split, seed, index)
    h, w = canvas(rng, sizes)  # the first draw, as in t2i_example
    kind = kind or EDITS[int(rng.integers(len(EDITS)))]
    if kind not in EDITS:
        raise ValueError(f"Unknown edit {kind!r}; choose from {EDITS}")
    n = int(rng.integers(1, 3)) + (1 if kind == "remove" else 0)
    for _ in range(100):  # a new source scene until the edit fits the canvas
        edited = _try_edit(rng, kind, h, w, n)
        if edited is not None:
            break
    else:
        raise RuntimeError(f"Could not make a {kind} edit on a {h}x{w} canvas")
    src, o, objs, instruction, extra = edited
    tgt = Scene(h, w, tuple(objs))
    meta = describe(tgt, f"edit_{kind}", absent=[(o.shape, o.color)] if kind in ("recolor", "remove") else ())
    if extra:
        for req in meta["include"]:
            if req["class"] == extra["class"] and req.get("color") == extra["color"]:
                req["region"] = extra["region"]
    meta["prompt"] = instruction
    return {"source": render(src), "target": render(tgt), "instruction": instruction, "metadata": meta,
            "kind": kind, "source_scene": src, "target_scene": tgt}


def qa_example(index: int, split: str = "train", seed: int = 0, sizes: Sequence[tuple[int, int]] = SIZES) -> dict:
    """``{"image", "question", "answer", "scene"}``; answers are single lowercase words."""
    rng = rng_for(split, seed, index)
    h, w = canvas(rng, sizes)  # the first draw, as in t2i_example
    n = int(rng.integers(1, 5))
    kinds = ["color", "count", "shape"] + (["where"] if n >= 2 else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "count":
        (s,) = _pick(rng, SHAPES)
        k = int(rng.integers(1, n + 1))
        specs = [(s, _pick(rng, list(COLORS))[0]) for _ in range(k)]
        specs += [(_pick(rng, SHAPES, exclude=(s,))[0], _pick(rng, list(COLORS))[0]) for _ in range(n - k)]
        scene = random_scene(rng, h, w, specs)
        question, answer = f"How many {plural(s)} are there?", NUMBERS[k]
    else:
        shapes = _pick(rng, SHAPES, n if n <= len(SHAPES) else len(SHAPES))
        colors = _pick(rng, list(COLORS), len(shapes))
        scene = random_scene(rng, h, w, list(zip(shapes, colors, strict=True)))
        i = int(rng.integers(len(scene.objects)))
        o = scene.objects[i]
        if kind == "color":
            question, answer = f"What color is the {o.shape}?", o.color
        elif kind == "shape":
            question, answer = f"What shape is the {o.color} object?", o.shape
        else:
            j = (i + 1 + int(rng.integers(len(scene.objects) - 1))) % len(scene.objects)
            p = scene.objects[j]
            dx, dy = o.cx - p.cx, o.cy - p.cy
            if abs(dx) >= abs(dy):
                question, answer = f"Is the {o.shape} left or right of the {p.shape}?", "left" if dx < 0 else "right"
            else:
                question, answer = f"Is the {o.shape} above or below the {p.shape}?", "above" if dy < 0 else "below"
    return {"image": render(scene), "question": question, "answer": answer, "scene": scene}
