"""Initial weights for a run (``--config.init=PATH``, ``--config.init_parts=...``).

``PATH`` is one of

* a unipic-jax model checkpoint (``checkpoint.save_model``: ``config.json`` with a
  ``"family"`` and ``params/``), e.g. ``WORKDIR/model`` of an earlier run or the output of
  ``python -m unipic_jax.convert unipic-to-orbax``; a ``unipic`` checkpoint fills the whole
  composite, a ``qwen2`` one ``llm.*``, a ``siglip`` one ``siglip2.*``;
* a Hugging Face folder (``config.json`` with a ``model_type``, safetensors): Qwen2 into
  ``llm.*``, SigLIP/SigLIP2 vision into ``siglip2.*``;
* the official UniPic-1 release folder (``pytorch_model.bin`` / ``model.safetensors`` and
  ``kl16.ckpt``), read by :func:`unipic_jax.convert.release.from_unipic` with the run's
  model preset and overrides as its config.

``init_parts`` (parameter-path prefixes, ``""`` = everything the source holds) selects what
is copied; the rest keeps its random initialisation. Every selected parameter must exist in
the source with the same shape: a mismatch is an error naming the parameter and both shapes
(set ``model.preset`` / ``model.overrides`` to the checkpoint's dimensions), and so are
source parameters under the selected parts that the model lacks. Arrays go onto the target's
sharding and dtype, and into the target's layer form (a checkpoint or HF folder in unrolled
form fills a ``scan_layers`` model and vice versa). A ``unipic`` source also carries its VAE latent ``scale`` when ``vae`` is
copied.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from unipic_jax.convert.mapping import path_str

log = logging.getLogger(__name__)

# Where a single-part source goes in the composite.
PART_OF_FAMILY = {"qwen2": "llm", "siglip": "siglip2"}
RELEASE_FILES = ("pytorch_model.bin", "model.safetensors", "kl16.ckpt")


class WarmStartError(ValueError):
    """The initial weights do not fit the model."""


def _selected(name: str, parts) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in parts)


def _sub_forms(forms: dict[str, bool], prefix: str) -> dict[str, bool]:
    """The layer forms under part ``prefix`` (``""``: all), keyed relative to it."""
    if not prefix:
        return dict(forms)
    return {k[len(prefix) + 1:] if k != prefix else "": v for k, v in forms.items()
            if k == prefix or k.startswith(prefix + ".")}


def load_source(path: Path, mesh=None, release_config: Any = None,
                layer_forms: dict[str, bool] | None = None) -> tuple[nnx.Module, str]:
    """``(model, prefix)``: the source model and where its parameters sit in the composite.

    ``layer_forms`` (``checkpoint.layer_forms`` of the target's config) builds the source in
    the target's layer form, so stacked and unrolled parameters line up."""
    from unipic_jax import checkpoint
    from unipic_jax.convert import hf, release

    if not path.exists():
        raise FileNotFoundError(f"config.init={path}: no such file or folder")
    cfg_file = path / "config.json"
    if cfg_file.exists():
        try:
            meta = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise WarmStartError(f"config.init={path}: {cfg_file} is not valid JSON ({e})") from e
        if "family" in meta:
            prefix = "" if meta["family"] == "unipic" else PART_OF_FAMILY.get(meta["family"], meta["family"])
            forms = _sub_forms(layer_forms, prefix) if layer_forms else None
            return checkpoint.load_model(path, mesh, scan_layers=forms or None), prefix
        if "model_type" in meta:
            prefix = PART_OF_FAMILY[hf.family_of_hf(meta, path).name]
            form = layer_forms.get(prefix) if layer_forms else None
            model = hf.from_hf(path, mesh, progress=False, **({} if form is None else {"scan_layers": form}))
            return model, prefix
    if path.is_dir() and any((path / f).exists() for f in RELEASE_FILES):
        return release.from_unipic(path, config=release_config, mesh=mesh), ""
    raise WarmStartError(
        f"config.init={path} is neither a unipic-jax checkpoint (config.json with 'family'), a Hugging Face folder "
        f"(config.json with 'model_type') nor a UniPic-1 release folder (one of {RELEASE_FILES}).")


def copy_params(model: nnx.Module, source: nnx.Module, prefix: str = "", parts=("",)) -> list[str]:
    """Copies ``source``'s parameters (placed under ``prefix``) into ``model`` where their path
    is under one of ``parts``; returns the copied paths. Shapes must match exactly."""
    src = {(f"{prefix}.{path_str(p)}" if prefix else path_str(p)): v.get_value()
           for p, v in nnx.to_flat_state(nnx.state(source, nnx.Param))}
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    ours = {path_str(p) for p, _ in flat}
    wanted = [path_str(p) for p, _ in flat if _selected(path_str(p), parts) and _selected(path_str(p), (prefix,))]
    if not wanted:
        raise WarmStartError(f"init_parts={tuple(parts)} selects no parameter the source (under "
                             f"{prefix or 'the root'!r}) could fill")
    missing = [k for k in wanted if k not in src]
    unknown = sorted(k for k in src if _selected(k, parts) and k not in ours)
    mismatched = [(k, tuple(v.get_value().shape), tuple(src[k].shape)) for p, v in flat
                  if (k := path_str(p)) in src and k in wanted and tuple(v.get_value().shape) != tuple(src[k].shape)]
    problems = []
    if mismatched:
        problems.append("shapes differ (parameter: model vs checkpoint): " + "; ".join(
            f"{k}: {a} vs {b}" for k, a, b in mismatched[:8]) + (" ..." if len(mismatched) > 8 else ""))
    if missing:
        problems.append(f"{len(missing)} parameters missing from the checkpoint: {missing[:8]}")
    if unknown:
        problems.append(f"{len(unknown)} checkpoint parameters the model lacks: {unknown[:8]}")
    if problems:
        raise WarmStartError("the initial weights do not fit this model: " + " | ".join(problems) +
                             ". Set model.preset / model.overrides to the checkpoint's dimensions, or narrow "
                             "init_parts.")
    new = []
    for p, v in flat:
        k = path_str(p)
        if k in wanted:
            x = v.get_value()
            v = v.replace(jax.device_put(src[k].astype(x.dtype), x.sharding))
        new.append((p, v))
    nnx.update(model, nnx.from_flat_state(new))
    return wanted


def warm_start(model: nnx.Module, path: str, parts=("",), mesh=None, release_config: Any = None) -> dict:
    """Loads ``path`` (see the module docstring) into ``model``; returns ``{"copied": n,
    "source": path, "vae_scale": s | None}``."""
    from unipic_jax import checkpoint

    forms = checkpoint.layer_forms(model.config) if hasattr(model, "config") else None
    source, prefix = load_source(Path(path), mesh, release_config, forms)
    copied = copy_params(model, source, prefix, parts)
    scale = None
    if prefix == "" and hasattr(source.config, "vae") and any(k.startswith("vae.") for k in copied):
        scale = float(source.config.vae.scale)
    del source
    log.info("initial weights: %d parameters from %s", len(copied), path)
    return {"copied": len(copied), "source": str(path), "vae_scale": scale}
