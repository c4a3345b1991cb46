"""Data sources: random-access collections of raw examples for the three tasks.

Every source has ``len(source)``, ``source.size(i) → (height, width)`` of the example's
(target) image, known without decoding it (the pipeline assigns resolution buckets from
it, reading sizes lazily), optionally ``source.all_sizes()`` → an ``(N, 2)`` int array of
every size when stored metadata gives them at no cost per example (``None`` otherwise), and
``source[i]`` → a raw example dict::

    t2i            {"image": uint8 HWC, "text": caption, "metadata": json str ("" if none)}
    edit           {"source": uint8 HWC, "image": uint8 HWC (target), "text": instruction, "metadata": ...}
    understanding  {"image": uint8 HWC, "text": question, "answer": str}

* :class:`ShapesSource`: the built-in shapes world, generated on the fly from
  ``(split, seed, index)`` (no files).
* :class:`TfdsSource`: any TFDS data set in ArrayRecord format, through ``tfds.data_source``
  (no TensorFlow), with configurable feature names; :class:`ShapesWorldBuilder` writes the
  shapes world as one.
* :class:`JsonlSource`: the user's own data, a JSONL manifest of image paths (relative to
  the manifest's folder) with captions, instructions or questions and answers.

Bad data never stops an epoch and is never dropped silently: malformed manifest rows are
skipped when the manifest is read, and an image that cannot be decoded is replaced by the
next readable example of the same task (see :class:`Guarded`); both are counted and logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unipic_jax.data import shapes as world
from unipic_jax.data.image import ImageError, load_image, to_rgb_uint8

log = logging.getLogger(__name__)
TASKS = ("t2i", "edit", "understanding")


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; tasks are {TASKS}")
    return task


class ShapesSource:
    """``length`` examples of one task from the shapes world's ``split``, each drawn on a
    canvas picked from ``sizes``.

    ``native=True``: every example is drawn at the size it is trained at. The pipeline calls
    :meth:`at_sizes` with its stage's buckets (its ``understanding_size`` for
    understanding), so each scene is drawn on one of them, with objects sized for it: no
    crop cuts an object, no resize shrinks one below the legibility floor
    (:func:`unipic_jax.data.shapes.min_radius`). Until then ``sizes`` are used."""

    def __init__(self, task: str, split: str = "train", seed: int = 0, length: int = 10_000,
                 sizes: Sequence[tuple[int, int]] = world.SIZES, native: bool = False):
        self.task, self.split, self.seed, self.length = _check_task(task), split, seed, length
        self.sizes, self.native = tuple(tuple(int(x) for x in s) for s in sizes), bool(native)
        if not self.sizes or any(len(s) != 2 or min(s) < 1 for s in self.sizes):
            raise ValueError(f"sizes must be (height, width) pairs of positive ints, got {sizes!r}")
        world.rng_for(split, seed, 0)  # validates the split
        self._sizes: dict[int, tuple[int, int]] = {}  # every stage's pipeline asks again

    def at_sizes(self, sizes: Sequence[tuple[int, int]]) -> "ShapesSource":
        """A native source drawn on ``sizes`` (itself when not native, or when they are its sizes)."""
        sizes = tuple(tuple(int(x) for x in s) for s in sizes)
        if not self.native or sizes == self.sizes:
            return self
        return ShapesSource(self.task, self.split, self.seed, self.length, sizes, native=True)

    def __len__(self) -> int:
        return self.length

    def size(self, i: int) -> tuple[int, int]:
        if i not in self._sizes:  # the first draw of every example (a generator each: 40 µs)
            self._sizes[i] = world.canvas(world.rng_for(self.split, self.seed, i), self.sizes)
        return self._sizes[i]

    def __getitem__(self, i: int) -> dict:
        kw = dict(split=self.split, seed=self.seed, sizes=self.sizes)
        if self.task == "t2i":
            ex = world.t2i_example(i, **kw)
            return {"image": ex["image"], "text": ex["prompt"], "metadata": json.dumps(ex["metadata"])}
        if self.task == "edit":
            ex = world.edit_example(i, **kw)
            return {"source": ex["source"], "image": ex["target"], "text": ex["instruction"],
                    "metadata": json.dumps(ex["metadata"])}
        ex = world.qa_example(i, **kw)
        return {"image": ex["image"], "text": ex["question"], "answer": ex["answer"]}


# -- TFDS ----------------------------------------------------------------------------------

FEATURES = {  # our field -> the TFDS feature it is read from, per task (override with `features=`)
    "t2i": {"image": "image", "text": "caption", "metadata": "metadata"},
    "edit": {"source": "source_image", "image": "image", "text": "instruction", "metadata": "metadata"},
    "understanding": {"image": "image", "text": "question", "answer": "answer"},
}


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class TfdsSource:
    """A split of a TFDS ArrayRecord data set, read with ``tfds.data_source``.

    ``name`` is a registered builder name (``"shapes_world/t2i"``) or a prepared data
    folder (``.../shapes_world/t2i/1.0.0``). ``size(i)`` reads record ``i`` without decoding
    its images: the ``height``/``width`` features when the data set has them, otherwise the
    header of the encoded (target) image."""

    def __init__(self, task: str, name: str, split: str = "train", data_dir: str | None = None,
                 features: dict[str, str] | None = None):
        import tensorflow_datasets as tfds

        self.task = _check_task(task)
        self.features = {**FEATURES[task], **(features or {})}
        self.name = name
        if os.path.isdir(name):
            builder = tfds.builder_from_directory(name)
        else:
            builder = tfds.builder(name, data_dir=data_dir)
        info_feats = set(builder.info.features)
        missing = [f for k, f in self.features.items() if k != "metadata" and f not in info_feats]
        if missing:
            raise ValueError(f"{name} has no features {missing} (has {sorted(info_feats)}); map them with "
                             f"features={{our_name: their_name}} (ours: {sorted(self.features)})")
        self.ds = builder.as_data_source(split=split)
        images = [f for k, f in self.features.items() if k in ("image", "source")]
        self._hw = {"height", "width"} <= info_feats  # sizes from features, else from image headers
        self._meta = builder.as_data_source(split=split, decoders={f: tfds.decode.SkipDecoding() for f in images})

    def __len__(self) -> int:
        return len(self.ds)

    def size(self, i: int) -> tuple[int, int]:
        ex = self._meta[i]
        if self._hw:
            return int(ex["height"]), int(ex["width"])
        import io

        from PIL import Image

        try:
            with Image.open(io.BytesIO(bytes(ex[self.features["image"]]))) as im:
                w, h = im.size
        except OSError as e:
            raise ImageError(f"record {i} of {self.name}: unreadable image header ({e})") from e
        return h, w

    def __getitem__(self, i: int) -> dict:
        ex = self.ds[i]
        out: dict[str, Any] = {}
        for ours, theirs in self.features.items():
            if ours in ("image", "source"):
                out[ours] = to_rgb_uint8(np.asarray(ex[theirs]))
            elif theirs in ex:
                out[ours] = _text(ex[theirs])
            elif ours == "metadata":
                out[ours] = ""
        return out


def shapes_world_builder():
    """The TFDS builder class of the shapes world (imported lazily: tensorflow_datasets is slow
    to import). Configs ``t2i``, ``edit``, ``understanding``; images are stored as PNG (TFDS
    encodes PIL images without TensorFlow) with their ``height``/``width`` and the world's
    ``index`` (TFDS shuffles the order of records)."""
    import tensorflow_datasets as tfds

    global _BUILDER
    if _BUILDER is not None:
        return _BUILDER

    class ShapesWorld(tfds.core.GeneratorBasedBuilder):
        """The unipic-jax shapes world (see unipic_jax.data.shapes)."""

        VERSION = tfds.core.Version("1.0.0")

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):  # TFDS's default probes importlib_resources, which we do not depend on
            from etils import epath

            return epath.Path(__file__)

        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=t, description=f"shapes world, {t} examples") for t in TASKS]

        def __init__(self, *, num_examples: dict[str, int] | None = None, seed: int = 0,
                     sizes: Sequence[tuple[int, int]] = world.SIZES, **kwargs):
            self.num_examples = {"train": 1000, "validation": 200, "test": 200, **(num_examples or {})}
            self.seed, self.sizes = seed, tuple(tuple(s) for s in sizes)
            super().__init__(**kwargs)

        def _info(self):
            img = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
            feats = {"index": np.int64, "height": np.int32, "width": np.int32, "image": img}
            task = self.builder_config.name
            if task == "t2i":
                feats.update(caption=tfds.features.Text(), metadata=tfds.features.Text())
            elif task == "edit":
                feats.update(source_image=img, instruction=tfds.features.Text(), metadata=tfds.features.Text())
            else:
                feats.update(question=tfds.features.Text(), answer=tfds.features.Text())
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(feats),
                                         homepage="https://github.com/SkyworkAI/UniPic")

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split, n) for split, n in self.num_examples.items()}

        def _generate_examples(self, split, n):
            from PIL import Image

            src = ShapesSource(self.builder_config.name, split, self.seed, n, self.sizes)
            for i in range(n):
                ex = src[i]
                h, w = ex["image"].shape[:2]
                rec = {"index": i, "height": h, "width": w, "image": Image.fromarray(ex["image"])}
                if src.task == "t2i":
                    rec.update(caption=ex["text"], metadata=ex["metadata"])
                elif src.task == "edit":
                    rec.update(source_image=Image.fromarray(ex["source"]), instruction=ex["text"],
                               metadata=ex["metadata"])
                else:
                    rec.update(question=ex["text"], answer=ex["answer"])
                yield i, rec

    _BUILDER = ShapesWorld
    return ShapesWorld


_BUILDER = None


def build_shapes_tfds(data_dir: str | os.PathLike, task: str, num_examples: dict[str, int] | None = None,
                      seed: int = 0, sizes: Sequence[tuple[int, int]] = world.SIZES) -> str:
    """Writes the shapes world's ``task`` config as an ArrayRecord TFDS data set under
    ``data_dir``; returns the prepared folder (give it to :class:`TfdsSource`)."""
    builder = shapes_world_builder()(config=_check_task(task), data_dir=os.fspath(data_dir),
                                     num_examples=num_examples, seed=seed, sizes=sizes,
                                     file_format="array_record")
    builder.download_and_prepare()
    return os.fspath(builder.data_dir)


# -- JSONL ---------------------------------------------------------------------------------

JSONL_FIELDS = {  # task -> (required keys, optional keys)
    "t2i": (("image", "caption"), ("metadata",)),
    "edit": (("source", "image", "instruction"), ("metadata",)),
    "understanding": (("image", "question", "answer"), ()),
}


class JsonlSource:
    """A JSONL manifest, one example per line::

        {"image": "img/0.png", "caption": "a red circle"}                                   t2i
        {"source": "a.png", "image": "b.png", "instruction": "make it blue"}                edit
        {"image": "c.png", "question": "What colour is it?", "answer": "red"}               understanding

    Paths are relative to the manifest's folder. Rows that are not JSON objects, lack a
    required key or name a missing file are skipped (``self.skipped`` counts them, and one
    warning names the first few). The (target) image's size is the row's ``height`` and
    ``width`` when it has both (positive integers; then the file is only checked to exist),
    else it is read from the file's header."""

    def __init__(self, task: str, path: str | os.PathLike):
        from PIL import Image

        self.task = _check_task(task)
        self.path = Path(path)
        required, _ = JSONL_FIELDS[task]
        self.rows: list[dict] = []
        self.sizes: list[tuple[int, int]] = []
        problems: list[str] = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                    lacking = [k for k in required if k not in row]
                    if lacking:
                        raise ValueError(f"missing {lacking}")
                    for k in ("source", "image"):
                        if k in row:
                            row[k] = str(self.path.parent / row[k])
                    if "height" in row or "width" in row:
                        h, w = row.get("height"), row.get("width")
                        if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (h, w)):
                            raise ValueError(f"height/width must both be positive integers, got {h!r}/{w!r}")
                        if not os.path.isfile(row["image"]):
                            raise OSError(f"no such file: {row['image']}")
                    else:
                        with Image.open(row["image"]) as im:
                            w, h = im.size
                except (ValueError, OSError) as e:
                    problems.append(f"line {lineno}: {e}")
                    continue
                self.rows.append(row)
                self.sizes.append((h, w))
        self.skipped = len(problems)
        if problems:
            log.warning("%s: skipped %d malformed row(s): %s%s", self.path, len(problems), "; ".join(problems[:3]),
                        " ..." if len(problems) > 3 else "")
        if not self.rows:
            raise ValueError(f"{self.path} has no usable {task} rows ({self.skipped} skipped)")

    def __len__(self) -> int:
        return len(self.rows)

    def size(self, i: int) -> tuple[int, int]:
        return self.sizes[i]

    def all_sizes(self) -> np.ndarray:
        return np.asarray(self.sizes, np.int64).reshape(-1, 2)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        out: dict[str, Any] = {"image": load_image(row["image"])}
        if self.task == "t2i":
            out.update(text=row["caption"], metadata=json.dumps(row["metadata"]) if "metadata" in row else "")
        elif self.task == "edit":
            out.update(source=load_image(row["source"]), text=row["instruction"],
                       metadata=json.dumps(row["metadata"]) if "metadata" in row else "")
        else:
            out.update(text=row["question"], answer=str(row["answer"]))
        return out


class Guarded:
    """Wraps a source: an example whose image cannot be decoded is replaced by the next
    readable one (cyclically), and counted (``self.failures``) and logged."""

    def __init__(self, source, max_tries: int = 16):
        self.source, self.max_tries = source, max_tries
        self.failures = 0

    def __len__(self) -> int:
        return len(self.source)

    def size(self, i: int) -> tuple[int, int]:
        return self.source.size(i)

    def all_sizes(self) -> np.ndarray | None:
        fn = getattr(self.source, "all_sizes", None)
        return None if fn is None else fn()

    def __getitem__(self, i: int) -> dict:
        for k in range(self.max_tries):
            j = (i + k) % len(self.source)
            try:
                return self.source[j]
            except (ImageError, OSError) as e:
                self.failures += 1
                log.warning("skipping unreadable example %d of %s (%s); %d so far", j, type(self.source).__name__, e,
                            self.failures)
        raise RuntimeError(f"{self.max_tries} consecutive unreadable examples from index {i}: "
                           "is the data set readable?")
