"""The training input pipeline (Grain): task mixing, resolution buckets, host sharding,
exact resume.

One training step consumes a **global batch** per task (``batch_size = {"t2i": 8, "edit": 4,
"understanding": 4}``; the per-task sizes set the mixing weights, 0 leaves a task out). All
generation images of a step (text-to-image targets, editing sources and targets) share one
**resolution bucket** ``(height, width)`` from the stage's list, so every step has static
shapes for ``jit``. Every choice below is a function of ``(seed, step)`` and the data only,
never of the process: all ``P`` hosts compute the same global batch, and host ``p`` keeps rows
``[p·B/P, (p+1)·B/P)`` of it (:func:`global_batch` assembles the hosts' rows into one sharded
``jax.Array``), so ``P`` hosts see exactly the global batches of one.

* **Buckets.** Each generation example goes to the bucket nearest to its aspect ratio (in log
  space; ties to the larger area) and is centre-cropped to that aspect and resized (bicubic)
  to the bucket; understanding images are padded (gray 127) to ``understanding_size``
  instead. A source that draws at any size (the shapes world with ``native=True``) is
  drawn at the stage's own sizes instead (``source.at_sizes``), so neither happens. A bucket needs the example's size, ``source.size(i)``; sizes are read **lazily**:
  only a source's ``all_sizes()`` (sizes from stored metadata, when it offers them) is read
  whole at construction, otherwise an example's size is read the first time the pipeline
  reaches it (below), once.
* **Epoch order.** Epoch ``e`` of task ``t`` visits the examples in the permutation
  ``π_e = default_rng([seed, 11, t, e]).permutation(N)``; the stream of bucket ``b`` in epoch
  ``e`` is ``π_e`` restricted to the examples of ``b``, and the ``k``-th step that uses bucket
  ``b`` takes examples ``[kG, (k+1)G)`` of that bucket's streams, epoch after epoch, whole
  batches only (an epoch of ``b`` holds ``⌊n_b/G⌋`` batches for its ``n_b`` examples: the
  remainder is skipped, so a batch never holds an example twice and every example of ``b`` is
  used at most once per epoch of ``b``). Understanding has no buckets: step ``s`` takes batch
  ``s mod ⌊N/G⌋`` of epoch ``⌊s / ⌊N/G⌋⌋``.
* **Lazy sizes.** The stream of bucket ``b`` in epoch 0 is a prefix of ``π_0``'s order, so it is
  known once the sizes of ``π_0[:m]`` are: the pipeline reads them in blocks of
  ``SCAN_BLOCK`` positions as steps need them. Later epochs (and buckets with fewer than ``G``
  examples) need every size, which are then read once. A fresh run therefore reads sizes
  about as fast as it consumes examples; a resume re-reads the sizes of the examples already
  consumed (at most one pass over the data), when its first batch is made.
* **Plan.** Construction reads the sizes of the first ``bucket_probe`` examples of ``π_0`` (the
  *probe*; all of them when ``N ≤ bucket_probe`` or ``all_sizes()`` gives them) and estimates
  the examples per bucket, ``n̂_b = c_b · N / K`` for ``c_b`` of the ``K`` probed examples
  (exact when every size is known). Step ``s``'s bucket is drawn, for steps in blocks of
  ``PLAN_BLOCK``, by ``default_rng([seed, 12, ⌊s / PLAN_BLOCK⌋]).choice(p=…)``, with
  probabilities proportional to ``Σ_t n̂_{t,b}`` over the generation tasks, over the buckets
  with ``n̂_{t,b} ≥ G_t`` and ``c_{t,b} ≥ 1`` for every generation task (others are never
  drawn); ``k`` = how many earlier steps drew ``b``. A bucket whose estimate was too high and
  that holds fewer than ``G`` examples of a task is still served: its batches then run on
  across epochs (an example can appear twice in such a batch; logged once).

So the host batch of step ``s`` is a pure function of ``s``: a Grain ``MapDataset`` over
step indices, and a Grain iterator whose checkpointed state (one integer) resumes exactly.
Progressive resolution = a later stage builds its pipeline with another bucket list.

A host batch is a dict of NumPy arrays (``B`` = host rows of that task)::

    t2i/pixels (B, H, W, 3) f32 in [-1, 1]    t2i/input_ids, t2i/attention_mask (B, T)
    edit/source, edit/pixels (B, H, W, 3)     edit/input_ids, edit/attention_mask (B, T_edit)
    understanding/pixels (B, Hu, Wu, 3)       understanding/input_ids, /attention_mask, /labels (B, T_und)
    bucket ()                                  step ()

Text uses the release's chat templates (:mod:`unipic_jax.tokenizer`); for CFG a caption is
replaced by the unconditional prompt where ``u < caption_dropout`` for
``u = default_rng([seed, 13, s]).random(G)[r]`` at global row ``r`` of step ``s`` (one draw
per global row: the same rows drop for any number of hosts); ``<image>`` is expanded to the
image's ``L + S`` slots; understanding labels are the answer tokens only (-100 elsewhere).
Texts are right-padded to the per-task lengths in ``max_text_len``; a longer caption,
instruction or question is shortened word by word and counted **per step**: the count of a
step's host batch is recorded under its step (making a batch twice records the same figure
once), ``Pipeline.truncated_before(s)`` sums the steps before ``s`` that this process has made
(batches made in Grain worker processes included) and :func:`global_truncated` sums that over
all processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from unipic_jax import tokenizer as tok_lib
from unipic_jax.data import image as image_lib
from unipic_jax.data.sources import TASKS, Guarded

log = logging.getLogger(__name__)
GENERATION = ("t2i", "edit")
SCAN_BLOCK = 4096  # positions of an epoch's order whose sizes are read at a time
PLAN_BLOCK = 1024  # steps whose buckets are drawn by one generator
_MAX_ORDERS = 8  # epoch permutations kept per pipeline


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    buckets: tuple[tuple[int, int], ...] = ((256, 256),)
    batch_size: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"t2i": 8})
    max_text_len: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"t2i": 64, "edit": 64, "understanding": 96})
    understanding_size: tuple[int, int] = (256, 256)
    latent_stride: int = 16  # pixels per image token (the VAE's downsampling)
    buffer_size: int = 64  # MAR buffer tokens (also <image> slots)
    caption_dropout: float = 0.1
    seed: int = 0
    num_steps: int = 10**9  # length of the step index space (steps are generated lazily)
    bucket_probe: int = 4096  # sizes read per generation task at construction (see the module docstring)

    def __post_init__(self):
        unknown = set(self.batch_size) - set(TASKS)
        if unknown:
            raise ValueError(f"batch_size has unknown tasks {sorted(unknown)}; tasks are {TASKS}")
        if not any(self.batch_size.get(t, 0) for t in TASKS):
            raise ValueError("batch_size gives no task a positive batch")
        if not self.buckets or len(self.buckets) > 127:
            raise ValueError(f"Give between 1 and 127 buckets, not {len(self.buckets)}")
        for h, w in list(self.buckets) + [tuple(self.understanding_size)]:
            if h <= 0 or w <= 0 or h % self.latent_stride or w % self.latent_stride:
                raise ValueError(f"Bucket {h}x{w} is not a positive multiple of the latent stride "
                                 f"{self.latent_stride}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1], got {self.caption_dropout}")
        if self.bucket_probe < 1:
            raise ValueError(f"bucket_probe must be at least 1, got {self.bucket_probe}")

    def slots(self, height: int, width: int) -> int:
        """``<image>`` slots of an image: its tokens plus the buffer."""
        return (height // self.latent_stride) * (width // self.latent_stride) + self.buffer_size


def assign_buckets(sizes, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Bucket of each ``(height, width)`` row of ``sizes`` (``(N, 2)``): the closest in aspect
    ratio (log space); ties go to the larger area, then to the earlier bucket."""
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    if len(sizes) and not (sizes > 0).all():
        bad = int(np.flatnonzero(~(sizes > 0).all(1))[0])
        raise ValueError(f"Image size {sizes[bad].astype(int).tolist()} (row {bad}) is not positive")
    bk = np.asarray(buckets, np.float64)
    d = np.abs(np.log(bk[:, 1] / bk[:, 0])[None, :] - np.log(sizes[:, 1] / sizes[:, 0])[:, None])
    area = np.where(d == d.min(1, keepdims=True), bk[:, 0] * bk[:, 1], -1.0)
    return area.argmax(1).astype(np.int8)


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket closest in aspect ratio (log space); ties go to the larger area."""
    return int(assign_buckets([(height, width)], buckets)[0])


def _native(source, task: str, cfg: PipelineConfig):
    """A source that draws at any size (``at_sizes``) drawn at this pipeline's own sizes: the
    buckets an example can reach by aspect ratio (one per aspect), or ``understanding_size``."""
    if not getattr(source, "native", False):
        return source
    if task not in GENERATION:
        return source.at_sizes((tuple(cfg.understanding_size),))
    buckets = [tuple(b) for b in cfg.buckets]
    return source.at_sizes([b for i, b in enumerate(buckets) if nearest_bucket(*b, buckets) == i])


def _guarded(source):
    return source if isinstance(source, Guarded) else Guarded(source)


class Pipeline:
    """Host batches by step index (see the module docstring). ``sources`` maps tasks to
    sources (:mod:`unipic_jax.data.sources`); ``process_index``/``process_count`` default to
    ``jax.process_index()``/``jax.process_count()``."""

    def __init__(self, sources: Mapping[str, Any], cfg: PipelineConfig, tokenizer, *,
                 process_index: int | None = None, process_count: int | None = None):
        import jax

        self.cfg, self.tok = cfg, tokenizer
        self.tasks = tuple(t for t in TASKS if cfg.batch_size.get(t, 0) > 0)
        missing = [t for t in self.tasks if t not in sources]
        if missing:
            raise ValueError(f"batch_size asks for {missing} but no source was given for them")
        self.sources = {t: _guarded(_native(sources[t], t, cfg)) for t in self.tasks}
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} is not in [0, {self.process_count})")
        for t in self.tasks:
            if cfg.batch_size[t] % self.process_count:
                raise ValueError(f"batch_size[{t!r}] = {cfg.batch_size[t]} is not divisible by {self.process_count} "
                                 "hosts")
        self.image_id = tok_lib.image_token_id(tokenizer)
        self._n = {t: len(self.sources[t]) for t in self.tasks}
        nb = len(cfg.buckets)
        self._lock = threading.RLock()
        self._orders: dict[tuple[str, int], np.ndarray] = {}  # (task, epoch) -> π_e
        self._streams: dict[tuple[str, int], list[np.ndarray]] = {}  # (task, epoch) -> stream of each bucket
        self._assign: dict[str, np.ndarray] = {}  # task -> bucket of each example (-1: size not read yet)
        self._scanned: dict[str, int] = {}  # task -> length of π_0's prefix whose sizes are read
        self._counts: dict[str, np.ndarray] = {}  # task -> examples per bucket, once every size is read
        self._short_warned: set[tuple[str, int]] = set()
        if "understanding" in self.tasks and self._n["understanding"] < cfg.batch_size["understanding"]:
            raise ValueError(f"The understanding source has {self._n['understanding']} examples, fewer than "
                             f"one global batch ({cfg.batch_size['understanding']})")
        gen = [t for t in self.tasks if t in GENERATION]
        est, found = {}, {}
        for t in gen:
            N = self._n[t]
            if N == 0:
                raise ValueError(f"The {t} source is empty")
            self._assign[t] = np.full(N, -1, np.int8)
            self._scanned[t] = 0
            sizes = self.sources[t].all_sizes()
            if sizes is not None:
                sizes = np.asarray(sizes)
                if sizes.shape != (N, 2):
                    raise ValueError(f"The {t} source's all_sizes() has shape {sizes.shape}, not ({N}, 2)")
                self._assign[t][:] = assign_buckets(sizes, cfg.buckets)
                self._scanned[t] = N
                self._counts[t] = np.bincount(self._assign[t], minlength=nb)
            else:
                self._scan(t, min(N, cfg.bucket_probe))  # the probe: the head of epoch 0's order
            if t in self._counts:
                found[t] = est[t] = self._counts[t].astype(float)
            else:
                K = self._scanned[t]
                found[t] = np.bincount(self._assign[t][self._order(t, 0)[:K]], minlength=nb).astype(float)
                est[t] = found[t] * N / K
        # a bucket is drawn only if it (probably) holds a whole global batch of every generation task
        usable = np.asarray([all(est[t][b] >= cfg.batch_size[t] and found[t][b] >= 1 for t in gen)
                             for b in range(nb)])
        if gen and not usable.any():
            per = {t: np.round(est[t]).astype(int).tolist() for t in gen}
            raise ValueError(f"No bucket of {cfg.buckets} holds a global batch of every generation task {gen} "
                             f"(examples per bucket, estimated: {per})")
        counts = np.sum([est[t] for t in gen], axis=0) if gen else np.ones(nb)
        probs = np.where(usable, counts, 0.0) if gen else np.ones(nb)
        self.bucket_probs = probs / probs.sum()
        self._plan = np.zeros(0, np.int8)  # bucket of each step
        self._rank = np.zeros(0, np.int64)  # how many earlier steps drew the same bucket
        self._trunc = np.zeros(0, np.int32)  # texts shortened in each step's host batch (0: not made)

    def __getstate__(self):  # picklable for worker processes (locks are not); caches are rebuilt there
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state["_orders"], state["_streams"] = {}, {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # -- sizes and streams ------------------------------------------------------------------

    def _order(self, task: str, epoch: int) -> np.ndarray:
        """π_epoch: the order of the task's examples in that epoch."""
        key = (task, epoch)
        with self._lock:
            if key not in self._orders:
                N = self._n[task]
                perm = np.random.default_rng([self.cfg.seed, 11, TASKS.index(task), epoch]).permutation(N)
                if len(self._orders) >= _MAX_ORDERS:
                    self._orders.pop(next(iter(self._orders)))
                self._orders[key] = perm.astype(np.int32 if N < 2**31 else np.int64)
            return self._orders[key]

    def _scan(self, task: str, upto: int):
        """Reads the sizes of π_0[:upto] (those not read yet)."""
        with self._lock:
            lo, hi = self._scanned[task], min(upto, self._n[task])
            if hi <= lo:
                return
            idx = self._order(task, 0)[lo:hi]
            a = self._assign[task]
            todo = idx[a[idx] < 0]
            if len(todo):
                src = self.sources[task]
                a[todo] = assign_buckets([src.size(int(i)) for i in todo], self.cfg.buckets)
            self._scanned[task] = hi
            self._streams.pop((task, 0), None)
            if hi == self._n[task]:
                self._counts[task] = np.bincount(a, minlength=len(self.cfg.buckets))

    def _stream(self, task: str, epoch: int) -> list[np.ndarray]:
        """Each bucket's examples in π_epoch's order (epoch 0 before every size is read: of
        the prefix read so far)."""
        with self._lock:
            key = (task, epoch)
            if key not in self._streams:
                if epoch and task not in self._counts:
                    self._scan(task, self._n[task])
                order = self._order(task, epoch)[: self._scanned[task]]
                a = self._assign[task][order]
                if len(self._streams) >= 2 * _MAX_ORDERS:
                    self._streams.pop(next(iter(self._streams)))
                self._streams[key] = [order[a == b] for b in range(len(self.cfg.buckets))]
            return self._streams[key]

    def _bucket_rows(self, task: str, b: int, k: int) -> np.ndarray:
        """The ``k``-th global batch of bucket ``b`` of a generation task."""
        G = self.cfg.batch_size[task]
        with self._lock:
            while task not in self._counts:  # still in epoch 0's prefix
                s = self._stream(task, 0)[b]
                if len(s) >= (k + 1) * G:
                    return s[k * G: (k + 1) * G]
                self._scan(task, self._scanned[task] + SCAN_BLOCK)
            n = int(self._counts[task][b])
            if n == 0:  # cannot happen for a drawn bucket: its probe found an example
                raise RuntimeError(f"Bucket {self.cfg.buckets[b]} holds no {task} example")
            if n >= G:
                epoch, j = divmod(k, n // G)
                return self._stream(task, epoch)[b][j * G: (j + 1) * G]
            if (task, b) not in self._short_warned:
                self._short_warned.add((task, b))
                log.warning("bucket %s holds %d %s examples, fewer than a global batch (%d): its batches run across "
                            "epochs", self.cfg.buckets[b], n, task, G)
            epoch, off = divmod(k * G, n)
            parts, need = [], G
            while need:
                part = self._stream(task, epoch)[b][off: off + need]
                parts.append(part)
                need -= len(part)
                epoch, off = epoch + 1, 0
            return np.concatenate(parts)

    def bucket_examples(self, task: str, b: int) -> np.ndarray:
        """The examples of ``task`` in bucket ``b``, ascending (reads every size)."""
        self._check_task(task)
        if task not in GENERATION:
            raise ValueError(f"{task!r} has no buckets")
        self._scan(task, self._n[task])
        return np.flatnonzero(self._assign[task] == b)

    # -- the plan ------------------------------------------------------------------------

    def _extend(self, upto: int):
        if upto < len(self._rank):
            return
        with self._lock:  # Grain's prefetch threads call in concurrently
            if upto < len(self._rank):
                return
            nb = len(self.bucket_probs)
            first = len(self._plan) // PLAN_BLOCK
            last = max(upto // PLAN_BLOCK + 1, 2 * first)
            plan = [np.random.default_rng([self.cfg.seed, 12, j]).choice(nb, PLAN_BLOCK, p=self.bucket_probs)
                    for j in range(first, last)]
            plan = np.concatenate(plan).astype(np.int8)
            counts = np.bincount(self._plan, minlength=nb).astype(np.int64)
            rank = np.empty(len(plan), np.int64)
            for lo in range(0, len(plan), PLAN_BLOCK):
                blk = plan[lo: lo + PLAN_BLOCK]
                onehot = blk[:, None] == np.arange(nb)
                before = np.cumsum(onehot, 0) - onehot + counts
                rank[lo: lo + PLAN_BLOCK] = before[np.arange(len(blk)), blk]
                counts += onehot.sum(0)
            self._plan = np.concatenate([self._plan, plan])
            self._rank = np.concatenate([self._rank, rank])  # last: readers check len(self._rank)

    def _check_task(self, task: str):
        if task not in self.tasks:
            raise ValueError(f"Task {task!r} is not in this pipeline (tasks: {self.tasks})")

    @staticmethod
    def _check_step(step) -> int:
        step = int(step)
        if step < 0:
            raise ValueError(f"Steps start at 0, got {step}")
        return step

    def bucket(self, step: int) -> int:
        step = self._check_step(step)
        self._extend(step)
        return int(self._plan[step])

    def global_indices(self, task: str, step: int) -> np.ndarray:
        """The example indices of ``task``'s global batch at ``step`` (every host's rows)."""
        self._check_task(task)
        step = self._check_step(step)
        G = self.cfg.batch_size[task]
        if task == "understanding":
            epoch, k = divmod(step, self._n[task] // G)
            return self._order(task, epoch)[k * G: (k + 1) * G]
        self._extend(step)
        return self._bucket_rows(task, int(self._plan[step]), int(self._rank[step]))

    def _rows(self, task: str) -> slice:
        per = self.cfg.batch_size[task] // self.process_count
        return slice(self.process_index * per, (self.process_index + 1) * per)

    def indices(self, task: str, step: int) -> np.ndarray:
        """This host's example indices for ``task`` at ``step``."""
        return self.global_indices(task, step)[self._rows(task)]

    def caption_dropped(self, step: int) -> np.ndarray:
        """Which of this host's text-to-image rows of ``step`` have their caption dropped."""
        step = self._check_step(step)
        u = np.random.default_rng([self.cfg.seed, 13, step]).random(self.cfg.batch_size.get("t2i", 0))
        return (u < self.cfg.caption_dropout)[self._rows("t2i")]

    # -- the truncation count -------------------------------------------------------------

    def _record_truncated(self, step: int, n: int):
        with self._lock:
            if step >= len(self._trunc):
                self._trunc = np.concatenate([self._trunc, np.zeros(max(step + 1, 2 * len(self._trunc), 1024)
                                                                   - len(self._trunc), np.int32)])
            self._trunc[step] = n

    def truncated_before(self, step: int | None = None) -> int:
        """Texts shortened in this host's batches of the steps before ``step`` (all steps when
        ``None``) that this process has made; a step made twice counts once."""
        with self._lock:
            return int(self._trunc[: None if step is None else max(int(step), 0)].sum())

    @property
    def truncated(self) -> int:
        """Texts shortened in every host batch this process has made (see :meth:`truncated_before`)."""
        return self.truncated_before(None)

    # -- loading -------------------------------------------------------------------------

    def _encode(self, build, text: str, max_len: int, image_slots: int = 0, answer: str | None = None):
        """Token ids, mask and labels of ``build(text)`` (+ answer), shortening ``text`` by
        words until it fits ``max_len``, and whether it was shortened."""
        words = text.split()
        n_words = len(words)
        while True:
            ids = self.tok(build(" ".join(words)), add_special_tokens=False).input_ids
            if image_slots:
                ids = tok_lib.expand_image_tokens(ids, self.image_id, image_slots)
            ans = self.tok(answer + tok_lib.ANSWER_SUFFIX, add_special_tokens=False).input_ids if answer else []
            if len(ids) + len(ans) <= max_len:
                break
            if not words:
                raise ValueError(f"The template alone needs {len(ids) + len(ans)} tokens > max_text_len {max_len}")
            words = words[:-1]
        out = np.full(max_len, self.tok.pad_token_id, np.int32)
        mask = np.zeros(max_len, bool)
        labels = np.full(max_len, -100, np.int32)
        seq = ids + ans
        out[: len(seq)], mask[: len(seq)] = seq, True
        labels[len(ids): len(seq)] = ans
        return out, mask, labels, len(words) < n_words

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        out, shortened = self._make(step)
        self._record_truncated(int(step), shortened)
        return out

    def _make(self, step: int) -> tuple[dict[str, np.ndarray], int]:
        """The host batch of ``step`` and how many of its texts were shortened."""
        cfg = self.cfg
        step = self._check_step(step)
        b = self.bucket(step)
        H, W = cfg.buckets[b]
        out: dict[str, np.ndarray] = {"step": np.asarray(step, np.int64), "bucket": np.asarray(b, np.int32)}
        shortened = 0
        for task in self.tasks:
            rows = [self.sources[task][int(i)] for i in self.indices(task, step)]
            L = cfg.max_text_len[task]
            if task == "t2i":
                drop = self.caption_dropped(step)
                enc = [self._encode(lambda t: tok_lib.generation_prompt(t or None), "" if d else r["text"], L)
                       for r, d in zip(rows, drop, strict=True)]
                out["t2i/pixels"] = image_lib.vae_pixels([r["image"] for r in rows], H, W, "crop")
            elif task == "edit":
                enc = [self._encode(tok_lib.edit_prompt, r["text"], L, cfg.slots(H, W)) for r in rows]
                out["edit/source"] = image_lib.vae_pixels([r["source"] for r in rows], H, W, "crop")
                out["edit/pixels"] = image_lib.vae_pixels([r["image"] for r in rows], H, W, "crop")
            else:
                Hu, Wu = cfg.understanding_size
                enc = [self._encode(tok_lib.understanding_prompt, r["text"], L, cfg.slots(Hu, Wu), r["answer"])
                       for r in rows]
                out["understanding/pixels"] = image_lib.vae_pixels([r["image"] for r in rows], Hu, Wu, "pad")
                out["understanding/labels"] = np.stack([e[2] for e in enc])
            out[f"{task}/input_ids"] = np.stack([e[0] for e in enc])
            out[f"{task}/attention_mask"] = np.stack([e[1] for e in enc])
            shortened += sum(e[3] for e in enc)
        return out, shortened

    # -- Grain ---------------------------------------------------------------------------

    def dataset(self):
        """A ``grain.MapDataset`` of host batches, indexed by step."""
        import grain

        return grain.MapDataset.range(self.cfg.num_steps).map(_Load(self))

    def iterator(self, num_workers: int = 0, prefetch: int = 2, read_threads: int | None = None):
        """A checkpointable Grain iterator over host batches from step 0 (``num_workers > 0``:
        worker processes, ``mp_prefetch``). Save ``it.get_state()`` (or Orbax
        ``grain.checkpoint.CheckpointSave(it)``) and ``set_state`` it to resume exactly.

        Batches are made ahead by ``read_threads`` threads (default: one per CPU core, at most
        16), at most ``4 · read_threads`` batches ahead. Grain's own default, 16 threads and
        500 batches, contends with the train step for the cores of a small machine: the demo's
        32² stage ran 5-15 % slower with it on two cores. A worker process's truncation counts
        travel with its batches and are recorded here as they arrive."""
        import grain

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n = read_threads or min(16, cores)
        if num_workers <= 0:
            return iter(self.dataset().to_iter_dataset(grain.ReadOptions(num_threads=n, prefetch_buffer_size=4 * n)))
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (outside absl.app)
            flags.FLAGS.mark_as_parsed()
        ds = grain.MapDataset.range(self.cfg.num_steps).map(_Load(self, carry_count=True))
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=n, prefetch_buffer_size=4 * n))
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch))
        return iter(ds.map(_Record(self)))


_COUNT_KEY = "_truncated"  # a worker's truncation count of a batch, removed by _Record


class _Load:
    """Module-level callable (picklable for worker processes): step → host batch."""

    def __init__(self, pipeline: Pipeline, carry_count: bool = False):
        self.pipeline, self.carry_count = pipeline, carry_count

    def __call__(self, step):
        if not self.carry_count:
            return self.pipeline[int(step)]
        out, shortened = self.pipeline._make(int(step))
        out[_COUNT_KEY] = np.asarray(shortened, np.int32)
        return out


class _Record:
    """In the main process, after the workers: records a batch's truncation count."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def __call__(self, batch):
        batch = dict(batch)
        self.pipeline._record_truncated(int(batch["step"]), int(batch.pop(_COUNT_KEY)))
        return batch


def global_truncated(pipe: Pipeline, step: int | None = None) -> int:
    """Texts shortened in the global batches of the steps before ``step`` (all made steps when
    ``None``): :meth:`Pipeline.truncated_before` summed over every process with
    ``process_allgather``. A collective: every process must call it, with the same ``step``."""
    from jax.experimental import multihost_utils

    local = np.asarray(pipe.truncated_before(step), np.int32)
    return int(np.asarray(multihost_utils.process_allgather(local)).sum())


def global_batch(host_batch: Mapping[str, np.ndarray], mesh) -> dict[str, Any]:
    """Assembles every host's rows into global ``jax.Array`` s sharded over the mesh's batch
    axes (``data``, ``fsdp``); scalars are replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from unipic_jax import sharding

    out = {}
    for k, v in host_batch.items():
        v = np.asarray(v)
        if v.ndim:
            shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
            spec = sharding.logical_to_spec(("batch",) + (None,) * (v.ndim - 1), shape, mesh)
        else:
            shape, spec = (), PartitionSpec()
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), v, shape)
    return out
