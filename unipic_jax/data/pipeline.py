"""The training input pipeline (Grain): task mixing, resolution buckets, host sharding,
exact resume.

One training step consumes a **global batch** per task (``batch_size = {"t2i": 8, "edit": 4,
"understanding": 4}``; the per-task sizes set the mixing weights, 0 leaves a task out). All
generation images of a step (text-to-image targets, editing sources and targets) share one
**resolution bucket** ``(height, width)`` from the stage's list, so every step has static
shapes for ``jit``:

* each example goes to the bucket nearest to its aspect ratio (in log space; ties to the
  larger area) and is centre-cropped to that aspect and resized (bicubic) to the bucket;
  understanding images are padded (gray 127) to ``understanding_size`` instead;
* step ``s``'s bucket is drawn from ``numpy.random.default_rng([seed, s])`` with
  probabilities proportional to the generation examples in each bucket, so every host
  computes the same bucket without talking to the others;
* within a (task, bucket) the examples are visited in a fresh permutation per epoch; the
  ``k``-th step that uses a bucket takes the next ``batch`` examples of that stream (whole
  batches only: the remainder of an epoch is skipped, so a batch never holds an example twice;
  buckets with less than one global batch are never drawn);
* host ``p`` of ``P`` keeps rows ``[p·B/P, (p+1)·B/P)`` of every global batch
  (:func:`global_batch` assembles the hosts' rows into one sharded ``jax.Array``).

So the host batch of step ``s`` is a pure function of ``s``: a Grain ``MapDataset`` over
step indices, and a Grain iterator whose checkpointed state (one integer) resumes exactly.
Progressive resolution = a later stage builds its pipeline with another bucket list.

A host batch is a dict of NumPy arrays (``B`` = host rows of that task)::

    t2i/pixels (B, H, W, 3) f32 in [-1, 1]    t2i/input_ids, t2i/attention_mask (B, T)
    edit/source, edit/pixels (B, H, W, 3)     edit/input_ids, edit/attention_mask (B, T_edit)
    understanding/pixels (B, Hu, Wu, 3)       understanding/input_ids, /attention_mask, /labels (B, T_und)
    bucket ()                                  step ()

Text uses the release's chat templates (:mod:`unipic_jax.tokenizer`); captions are replaced by
the unconditional prompt with probability ``caption_dropout`` (for CFG); ``<image>`` is
expanded to the image's ``L + S`` slots; understanding labels are the answer tokens only
(-100 elsewhere). Texts are right-padded to the per-task lengths in ``max_text_len``; a longer
caption, instruction or question is shortened word by word (and counted).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
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

    def __post_init__(self):
        unknown = set(self.batch_size) - set(TASKS)
        if unknown:
            raise ValueError(f"batch_size has unknown tasks {sorted(unknown)}; tasks are {TASKS}")
        if not any(self.batch_size.get(t, 0) for t in TASKS):
            raise ValueError("batch_size gives no task a positive batch")
        for h, w in list(self.buckets) + [tuple(self.understanding_size)]:
            if h % self.latent_stride or w % self.latent_stride:
                raise ValueError(f"Bucket {h}x{w} is not a multiple of the latent stride {self.latent_stride}")

    def slots(self, height: int, width: int) -> int:
        """``<image>`` slots of an image: its tokens plus the buffer."""
        return (height // self.latent_stride) * (width // self.latent_stride) + self.buffer_size


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket closest in aspect ratio (log space); ties go to the larger area."""
    a = math.log(width / height)
    return min(range(len(buckets)), key=lambda b: (abs(math.log(buckets[b][1] / buckets[b][0]) - a),
                                                   -buckets[b][0] * buckets[b][1]))


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
        self.sources = {t: sources[t] if isinstance(sources[t], Guarded) else Guarded(sources[t]) for t in self.tasks}
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        for t in self.tasks:
            if cfg.batch_size[t] % self.process_count:
                raise ValueError(f"batch_size[{t!r}] = {cfg.batch_size[t]} is not divisible by {self.process_count} "
                                 "hosts")
        self.image_id = tok_lib.image_token_id(tokenizer)
        # bucket pools: pool[task][b] = example indices (understanding: one pool, index 0)
        self.pool: dict[str, list[np.ndarray]] = {}
        for t in self.tasks:
            src = self.sources[t]
            if t == "understanding":
                self.pool[t] = [np.arange(len(src))]
                continue
            assign = np.asarray([nearest_bucket(*src.size(i), cfg.buckets) for i in range(len(src))])
            self.pool[t] = [np.flatnonzero(assign == b) for b in range(len(cfg.buckets))]
        gen = [t for t in self.tasks if t in GENERATION]
        counts = np.asarray([sum(len(self.pool[t][b]) for t in gen) for b in range(len(cfg.buckets))], float)
        # a bucket is drawn only if it holds a whole global batch of every generation task
        usable = np.asarray([all(len(self.pool[t][b]) >= cfg.batch_size[t] for t in gen)
                             for b in range(len(cfg.buckets))])
        if gen and not usable.any():
            raise ValueError(f"No bucket of {cfg.buckets} holds a global batch of every generation task {gen} "
                             f"(examples per bucket: { {t: [len(p) for p in self.pool[t]] for t in gen} })")
        if "understanding" in self.tasks and len(self.pool["understanding"][0]) < cfg.batch_size["understanding"]:
            raise ValueError(f"The understanding source has {len(self.pool['understanding'][0])} examples, fewer than "
                             f"one global batch ({cfg.batch_size['understanding']})")
        probs = np.where(usable, counts, 0.0) if gen else np.ones(len(cfg.buckets))
        self.bucket_probs = probs / probs.sum()
        self._lock = threading.Lock()
        self._plan = np.zeros(0, np.int32)  # bucket of each step
        self._rank = np.zeros(0, np.int64)  # how many earlier steps used the same bucket
        self.truncated = 0

    # -- the plan ------------------------------------------------------------------------

    def __getstate__(self):  # picklable for worker processes (locks are not)
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _extend(self, upto: int):
        if upto < len(self._rank):
            return
        with self._lock:  # Grain's prefetch threads call in concurrently
            if upto >= len(self._rank):
                self._extend_locked(upto)

    def _extend_locked(self, upto: int):
        n = len(self._plan)
        new_n = max(upto + 1, 2 * n, 1024)
        steps = np.arange(n, new_n)
        plan = np.asarray([np.random.default_rng([self.cfg.seed, int(s)]).choice(len(self.bucket_probs),
                                                                                 p=self.bucket_probs)
                           for s in steps], np.int32)
        counts = np.bincount(self._plan, minlength=len(self.bucket_probs)).astype(np.int64)
        rank = np.empty(len(steps), np.int64)
        for k, b in enumerate(plan):
            rank[k] = counts[b]
            counts[b] += 1
        self._plan = np.concatenate([self._plan, plan])
        self._rank = np.concatenate([self._rank, rank])  # last: readers check len(self._rank)

    def bucket(self, step: int) -> int:
        self._extend(step)
        return int(self._plan[step])

    @functools.lru_cache(maxsize=64)  # noqa: B019  (a few (task, bucket, epoch) permutations)
    def _perm(self, task: str, b: int, epoch: int) -> np.ndarray:
        pool = self.pool[task][b]
        return pool[np.random.default_rng([self.cfg.seed, TASKS.index(task), b, epoch]).permutation(len(pool))]

    def indices(self, task: str, step: int) -> np.ndarray:
        """This host's example indices for ``task`` at ``step``."""
        self._extend(step)
        b = 0 if task == "understanding" else int(self._plan[step])
        G = self.cfg.batch_size[task]
        per = G // self.process_count
        rank = step if task == "understanding" else int(self._rank[step])
        per_epoch = len(self.pool[task][b]) // G  # whole batches only: a batch never spans two epochs
        epoch, k = divmod(rank, per_epoch)
        start = k * G + self.process_index * per
        return self._perm(task, b, epoch)[start: start + per]

    # -- loading -------------------------------------------------------------------------

    def _encode(self, build, text: str, max_len: int, image_slots: int = 0, answer: str | None = None):
        """Token ids (and labels) of ``build(text)`` (+ answer), shortening ``text`` by words
        until it fits ``max_len``."""
        words = text.split()
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
            if len(words) == len(text.split()) - 1:
                self.truncated += 1
        out = np.full(max_len, self.tok.pad_token_id, np.int32)
        mask = np.zeros(max_len, bool)
        labels = np.full(max_len, -100, np.int32)
        seq = ids + ans
        out[: len(seq)], mask[: len(seq)] = seq, True
        labels[len(ids): len(seq)] = ans
        return out, mask, labels

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        cfg = self.cfg
        b = self.bucket(step)
        H, W = cfg.buckets[b]
        out: dict[str, np.ndarray] = {"step": np.asarray(step, np.int64), "bucket": np.asarray(b, np.int32)}
        for task in self.tasks:
            rows = [self.sources[task][int(i)] for i in self.indices(task, step)]
            L = cfg.max_text_len[task]
            if task == "t2i":
                drop = np.random.default_rng([cfg.seed, step, 7]).random(len(rows)) < cfg.caption_dropout
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
        return out

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
        32² stage ran 5-15 % slower with it on two cores."""
        import grain

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n = read_threads or min(16, cores)
        ds = self.dataset().to_iter_dataset(grain.ReadOptions(num_threads=n, prefetch_buffer_size=4 * n))
        if num_workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (outside absl.app)
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                             per_worker_buffer_size=prefetch))
        return iter(ds)


class _Load:
    """Module-level callable (picklable for worker processes): step → host batch."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def __call__(self, step):
        return self.pipeline[int(step)]


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
