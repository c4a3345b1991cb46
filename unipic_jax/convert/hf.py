"""Hugging Face folders (``config.json`` + safetensors) ↔ NNX models.

Reading never materialises more than one parameter on the host at a time (a stacked
parameter of a ``scan_layers`` model is assembled from its blocks' tensors): names and shapes
are validated from the safetensors headers first (unknown keys, missing keys and shape
mismatches are reported together, by name, before anything is loaded), then each tensor
is read, re-laid-out, cast and placed straight onto its sharding.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from unipic_jax import sharding
from unipic_jax.convert import tables
from unipic_jax.convert.mapping import KeyMap, ours_to_torch, path_str, torch_shape, torch_to_ours

log = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


class ConversionError(ValueError):
    """A checkpoint does not fit the model: the message names every offending key."""


@dataclasses.dataclass(frozen=True)
class Family:
    """What conversion needs to know about one model family."""

    name: str
    config_type: type
    model_types: tuple[str, ...]  # config.json model_type values this family reads
    config_from_hf: Callable[..., Any]  # config.json dict (+ overrides) -> our config
    hf_config: Callable[[Any], Any]  # our config -> the transformers config object to write
    build: Callable[[Any, nnx.Rngs], nnx.Module]
    keymap: Callable[[Any], KeyMap]  # our config -> its key table
    # torch keys that may be present without a parameter to receive them, given the config
    optional: Callable[[Any], tuple[str, ...]] = lambda cfg: ()
    generation: bool = False  # write a generation_config.json too


def families() -> dict[str, Family]:
    import transformers

    from unipic_jax.models import qwen2, siglip2

    return {
        "qwen2": Family(
            name="qwen2",
            config_type=qwen2.Qwen2Config,
            model_types=("qwen2",),
            config_from_hf=qwen2.config_from_hf,
            hf_config=lambda cfg: transformers.Qwen2Config(**qwen2.config_to_hf(cfg)),
            build=lambda cfg, rngs: qwen2.Qwen2(cfg, rngs=rngs),
            keymap=lambda cfg: KeyMap(tables.qwen2_hf_rules(cfg), tables.QWEN2_HF_IGNORED),
            optional=lambda cfg: ("lm_head.weight",) if cfg.tie_word_embeddings else (),
            generation=True,
        ),
        "siglip": Family(
            name="siglip",
            config_type=siglip2.SiglipConfig,
            model_types=tuple(siglip2.VISION_TYPES) + tuple(siglip2.FULL_TYPES),
            config_from_hf=siglip2.config_from_hf,
            hf_config=lambda cfg: (transformers.Siglip2VisionConfig if cfg.naflex else transformers.SiglipVisionConfig)(
                **siglip2.config_to_hf(cfg)),
            build=lambda cfg, rngs: siglip2.SiglipVision(cfg, rngs=rngs),
            keymap=lambda cfg: KeyMap(tables.siglip_hf_rules(cfg), tables.SIGLIP_HF_IGNORED,
                                      tables.SIGLIP_HF_PREFIXES),
        ),
    }


def family_of_config(cfg: Any) -> Family:
    for fam in families().values():
        if isinstance(cfg, fam.config_type):
            return fam
    raise ConversionError(f"No Hugging Face conversion is registered for config type {type(cfg).__name__}")


def family_of_hf(hf_config: dict, path: Path) -> Family:
    mt = hf_config.get("model_type")
    for fam in families().values():
        if mt in fam.model_types:
            return fam
    known = sorted(t for f in families().values() for t in f.model_types)
    raise ConversionError(f"{path}/config.json has model_type={mt!r}; supported model types: {known}")


# -- reading ------------------------------------------------------------------------------


class SafetensorsFolder:
    """The tensors of a folder: one ``model.safetensors`` or a sharded index."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if (self.path / SAFE_INDEX).exists():
            index = json.loads((self.path / SAFE_INDEX).read_text())
            self.files = dict(index["weight_map"])
        elif (self.path / SAFE_SINGLE).exists():
            self.files = {k: SAFE_SINGLE for k in self._header(SAFE_SINGLE)}
        else:
            found = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else "not a folder"
            raise ConversionError(
                f"No {SAFE_SINGLE} or {SAFE_INDEX} in {self.path} (found: {found}). PyTorch .bin folders "
                "can be re-saved with transformers' save_pretrained(..., safe_serialization=True)."
            )
        for name in sorted(set(self.files.values())):
            if not (self.path / name).exists():
                raise ConversionError(f"{SAFE_INDEX} in {self.path} lists {name}, which does not exist.")

    def keys(self) -> list[str]:
        return list(self.files)

    def _header(self, name: str) -> dict[str, tuple[int, ...]]:
        """Key → shape from one file's header (no tensor data is read)."""
        try:
            with safe_open(self.path / name, "numpy") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ConversionError(f"Cannot read {self.path / name}: {e}. Is the file complete?") from e

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for name in sorted(set(self.files.values())):
            out.update(self._header(name))
        return out

    def tensors(self, keys: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        """Yields ``(key, array)`` one at a time in the order of ``keys``, opening each file once."""
        import contextlib

        with contextlib.ExitStack() as stack:
            opened = {}
            for k in keys:
                name = self.files[k]
                if name not in opened:
                    opened[name] = stack.enter_context(safe_open(self.path / name, "numpy"))
                yield k, opened[name].get_tensor(k)


class DictSource:
    """In-memory tensors (a PyTorch state dict as NumPy arrays) with the interface of
    :class:`SafetensorsFolder`, for :func:`load_state`."""

    def __init__(self, tensors: dict[str, Any], name: str = "state dict"):
        self.path = name
        self._tensors = {k: np.asarray(v) for k, v in tensors.items()}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._tensors.items()}

    def tensors(self, keys: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        for k in keys:
            yield k, self._tensors[k]


def read_hf_config(path: str | os.PathLike) -> dict:
    p = Path(path) / "config.json"
    if not p.exists():
        raise ConversionError(f"{path} has no config.json; pass the folder that save_pretrained wrote.")
    return json.loads(p.read_text())


def _dtype_from_hf(hf: dict):
    name = hf.get("dtype") or hf.get("torch_dtype")
    return {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(name, "float32")


def load_state(
    model: nnx.Module,
    folder: SafetensorsFolder | DictSource,
    keymap: KeyMap,
    optional: tuple[str, ...] = (),
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> nnx.Module:
    """Fills an (abstract or concrete) NNX ``model`` from ``folder``; returns the loaded model.

    Every parameter of the model must come from its key(s); every key must map to a
    parameter (or be in ``optional`` / the table's ignore list). Raises
    :class:`ConversionError` naming all unknown keys, missing parameters and shape
    mismatches at once.
    """
    graphdef, state = nnx.split(model)
    flat = {path_str(p): v for p, v in nnx.to_flat_state(state)}
    shapes = folder.shapes()
    unknown, mismatched, ignored = [], [], []
    # every parameter needs every torch tensor that its rules name (several for a stacked one)
    needed = {ours: {s.index: s.key for s in keymap.to_torch(ours, v.get_value().shape)} for ours, v in flat.items()}
    plan: dict[str, tuple[str, Any, tuple[int, ...]]] = {}  # torch key -> (our path, rule, index)
    for key, shape in shapes.items():
        m = keymap.to_ours(key)
        if m is None or m[0] not in flat or m[2] not in needed[m[0]]:
            if keymap.ignored(key) or key in optional:
                ignored.append(key)
            elif m is None:
                unknown.append(key)
            elif m[0] not in flat:
                unknown.append(f"{key} (would be {m[0]}, which this model does not have)")
            else:
                unknown.append(f"{key} (would be {m[0]}[{m[2][0]}], but that stack has "
                               f"{flat[m[0]].get_value().shape[0]} blocks)")
            continue
        ours, rule, index = m
        want = torch_shape(rule, flat[ours].get_value().shape)
        if tuple(shape) != want:
            mismatched.append(f"{key}: checkpoint {tuple(shape)}, model expects {want} (for {ours})")
        plan[key] = (ours, rule, index)
    covered = {(ours, index) for ours, _, index in plan.values()}
    missing = sorted(f"{ours}{list(index) if index else ''} (torch key {k})" for ours, parts in needed.items()
                     for index, k in parts.items() if (ours, index) not in covered)
    missing += sorted(f"{ours} (no rule in the conversion table)" for ours, parts in needed.items() if not parts)
    problems = []
    if unknown:
        problems.append("unknown keys in the checkpoint:\n  " + "\n  ".join(sorted(unknown)))
    if missing:
        problems.append("parameters missing from the checkpoint:\n  " + "\n  ".join(missing))
    if mismatched:
        problems.append("shape mismatches (does the config match the checkpoint?):\n  " + "\n  ".join(mismatched))
    if problems:
        raise ConversionError(f"Cannot load {folder.path}:\n" + "\n".join(problems))
    if ignored:
        log.info("ignored keys without a parameter: %s", ignored)

    values: dict[str, jax.Array] = {}
    partial: dict[str, tuple[np.ndarray, set]] = {}  # stacked parameters being assembled
    order = {ours: i for i, ours in enumerate(flat)}  # one parameter's tensors after another
    keys = sorted(plan, key=lambda k: (order[plan[k][0]], plan[k][2]))
    for key, arr in tqdm(folder.tensors(keys), total=len(plan), desc="loading", disable=not progress,
                         unit="tensor", leave=False):
        ours, rule, index = plan[key]
        var = flat[ours]
        shape, dtype = var.get_value().shape, var.get_value().dtype
        x = torch_to_ours(rule, arr, shape).astype(dtype)
        if index:
            buf, seen = partial.setdefault(ours, (np.empty(shape, dtype), set()))
            buf[index] = x
            seen.add(index)
            if seen != set(needed[ours]):
                continue
            x = partial.pop(ours)[0]
        values[ours] = sharding.put(x, sharding.variable_sharding(var, mesh) if mesh is not None else None)
        del arr, x
    new_state = nnx.from_flat_state(
        [(p, v.replace(values[path_str(p)])) for p, v in nnx.to_flat_state(state)]
    )
    return nnx.merge(graphdef, new_state)


def from_hf(
    path: str | os.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    dtype: Any = None,
    *,
    param_dtype: Any = None,
    progress: bool = True,
    **config_overrides,
) -> nnx.Module:
    """Loads a Hugging Face folder into the matching NNX model.

    ``dtype`` sets compute and parameter dtype (default: the checkpoint's ``dtype`` /
    ``torch_dtype``, else float32); ``param_dtype`` overrides the storage dtype alone
    (e.g. ``dtype=jnp.bfloat16, param_dtype=jnp.float32`` for mixed precision). With a
    ``mesh`` each tensor goes straight onto its sharding. Extra keyword arguments
    override config fields (e.g. ``remat="full"``).
    """
    path = Path(path)
    hf = read_hf_config(path)
    fam = family_of_hf(hf, path)
    dt = jnp.dtype(dtype).name if dtype is not None else _dtype_from_hf(hf)
    pdt = jnp.dtype(param_dtype).name if param_dtype is not None else dt
    cfg = fam.config_from_hf(hf, dtype=dt, param_dtype=pdt, **config_overrides)
    folder = SafetensorsFolder(path)
    abstract = nnx.eval_shape(lambda: fam.build(cfg, nnx.Rngs(0)))
    return load_state(abstract, folder, fam.keymap(cfg), fam.optional(cfg), mesh, progress)


# -- writing ------------------------------------------------------------------------------


def _host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def torch_tensors(model: nnx.Module, keymap: KeyMap) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(torch_key, host array)`` for every parameter, one at a time (a stacked
    parameter is gathered once and yields one tensor per block)."""
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        ours = path_str(p)
        slots = keymap.to_torch(ours, var.get_value().shape)
        if not slots:
            raise ConversionError(f"Parameter {ours} has no rule in the conversion table.")
        x = _host(var.get_value())
        for key, rule, index in slots:
            yield key, ours_to_torch(rule, x, index)


def _parse_size(s: int | str) -> int:
    if isinstance(s, int):
        return s
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = s.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            return int(float(s[: -len(u)]) * units[u])
    return int(s)


class AtomicFolder:
    """Writes files into a temporary sibling folder and moves them into ``path`` at the end.

    ``path`` may not exist yet, or be empty; if it holds files, ``overwrite=True`` is
    needed and only the files this writer produces are replaced (nothing else is
    deleted). On an exception the temporary folder is removed and ``path`` is untouched.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"{self.path} exists and is not a folder.")
        if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{self.path} is not empty; choose a new folder or pass overwrite=True (--overwrite) to "
                "replace the files this conversion writes."
            )

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if not self.path.exists():
            os.replace(self.tmp, self.path)
            return False
        for f in self.tmp.iterdir():
            os.replace(f, self.path / f.name)
        self.tmp.rmdir()
        return False


def write_safetensors(
    tensors: Iterator[tuple[str, np.ndarray]], out: Path, max_shard_size: int | str = "5GB", total: int | None = None,
    progress: bool = True,
) -> None:
    """Writes ``model.safetensors``, or numbered shards plus ``model.safetensors.index.json``
    when the tensors exceed ``max_shard_size``. Holds at most one shard in host memory."""
    limit = _parse_size(max_shard_size)
    shards: list[list[str]] = []
    current: dict[str, np.ndarray] = {}
    size, total_size, weight_map, names = 0, 0, {}, []

    def flush():
        nonlocal current, size
        if current:
            name = f"shard-{len(names):05d}.safetensors"
            save_file(current, out / name, metadata={"format": "pt"})
            names.append(name)
            shards.append(list(current))
            current, size = {}, 0

    for key, arr in tqdm(tensors, total=total, desc="writing", disable=not progress, unit="tensor", leave=False):
        if key in weight_map or key in current:
            raise ConversionError(f"Two parameters map to the same torch key {key}.")
        if current and size + arr.nbytes > limit:
            flush()
        current[key] = arr
        size += arr.nbytes
        total_size += arr.nbytes
    flush()
    if len(names) <= 1:
        if names:
            os.replace(out / names[0], out / SAFE_SINGLE)
        else:
            save_file({}, out / SAFE_SINGLE, metadata={"format": "pt"})
        return
    final = [f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i in range(len(names))]
    for tmp, name, keys in zip(names, final, shards):
        os.replace(out / tmp, out / name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2))


def to_hf(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes ``model`` as a Hugging Face folder (``config.json``, ``generation_config.json``,
    safetensors) that ``transformers``' ``from_pretrained`` loads. Only process 0 writes."""
    cfg = model.config
    fam = family_of_config(cfg)
    keymap = fam.keymap(cfg)
    n = sum(len(keymap.to_torch(path_str(p), v.get_value().shape))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = torch_tensors(model, keymap)
    if jax.process_index() != 0:
        for _ in tensors:  # take part in the collective gathers, write nothing
            pass
        return Path(path)
    with AtomicFolder(path, overwrite) as tmp:
        hf_cfg = fam.hf_config(cfg)
        hf_cfg.save_pretrained(tmp)
        if fam.generation:
            import transformers

            transformers.GenerationConfig(
                bos_token_id=cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id, pad_token_id=cfg.pad_token_id
            ).save_pretrained(tmp)
        write_safetensors(tensors, tmp, max_shard_size, total=n, progress=progress)
    return Path(path)


# -- the SigLIP2 understanding model (models/understanding.py) -----------------------------


def understanding_from_hf(llm_path, vision_path, projector: dict[str, np.ndarray] | None = None, *, mesh=None,
                          dtype=None, seed: int = 0, **config_overrides) -> nnx.Module:
    """Builds :class:`~unipic_jax.models.understanding.SiglipUnderstanding` from a Qwen2 folder,
    a SigLIP/SigLIP2 folder and the projector's weights (a ``{"0.weight", "0.bias", "2.weight",
    "2.bias"}`` state dict of the PyTorch ``nn.Sequential``; random if ``None``). Extra keyword
    arguments are fields of ``UnderstandingConfig`` (e.g. ``image_token_id``)."""
    from unipic_jax.models import understanding
    from unipic_jax.models.layers import MLPProjector

    llm = from_hf(llm_path, mesh=mesh, dtype=dtype, progress=False)
    vision = from_hf(vision_path, mesh=mesh, dtype=dtype, progress=False)
    cfg = understanding.UnderstandingConfig(llm=llm.config, vision=vision.config, **config_overrides)
    if projector is not None:
        cfg = dataclasses.replace(cfg, proj_hidden=int(np.shape(projector["0.weight"])[0]))
    model = nnx.eval_shape(lambda: understanding.SiglipUnderstanding(cfg, rngs=nnx.Rngs(seed)))
    model.llm, model.vision = llm, vision
    if projector is None:
        proj = MLPProjector(vision.config.hidden_size, cfg.proj_hidden or llm.config.hidden_size,
                            llm.config.hidden_size, dtype=llm.config.dtype, param_dtype=llm.config.param_dtype,
                            rngs=nnx.Rngs(seed))
        model.siglip2_proj = sharding.shard_module(proj, mesh) if mesh is not None else proj
    else:
        model.siglip2_proj = load_state(model.siglip2_proj, DictSource(projector, "siglip2_proj"),
                                        KeyMap(tables.PROJECTOR_RULES), mesh=mesh, progress=False)
    return model
