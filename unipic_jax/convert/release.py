"""The official UniPic-1 release ↔ the :class:`~unipic_jax.models.unipic.UniPic` composite.

Release layout (a folder)::

    pytorch_model.bin | model.safetensors   the state dict: llm.*, mar.* (with mar.diffloss.*),
                                            proj_in.*, proj_out.*, siglip2_proj.*, siglip2.*
    kl16.ckpt                               the VAE, {"model": LDM state dict}
    Qwen2.5-1.5B-Instruct/config.json       the LLM's dimensions

Every dimension the tensors can tell (MAR width, depths, MLP ratio, buffer size and position grid,
diffusion-head width and depth, VAE channels, multipliers and blocks) is read from them;
head counts and group counts come from ``config``: a preset name of ``UniPicConfig``
(default ``unipic_1_5b``) or a mapping of dotted overrides on it (``{"mar.num_heads": 4}``;
the key ``"preset"`` names another base preset). Torch pickles are read with
``weights_only=True`` and memory-mapped, so the host holds the file's pages plus one
converted tensor at a time. With a ``vision`` config (preset ``unipic_1_5b_siglip2``) the
``siglip2.vision_model.*`` tower and ``siglip2_proj`` are loaded too; otherwise they are
reported as unused, with MAR's ``class_emb``, which nothing uses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from unipic_jax.convert.hf import AtomicFolder, ConversionError, DictSource, load_state, torch_tensors
from unipic_jax.convert import tables
from unipic_jax.convert.mapping import KeyMap, Rule
from unipic_jax.models import qwen2, unipic

log = logging.getLogger(__name__)

CLASS_EMB = r"mar\.class_emb\.weight"
VISION = (r"siglip2\..*", r"siglip2_proj\..*")


def prefixed(rules, torch_prefix: str, ours_prefix: str) -> tuple[Rule, ...]:
    return tuple(r._replace(torch=torch_prefix + r.torch, ours=ours_prefix + r.ours) for r in rules)


def release_keymap(cfg: unipic.UniPicConfig) -> KeyMap:
    """One table for the whole release: ``pytorch_model.bin`` keys as they are, and the VAE's
    ``kl16.ckpt`` keys under a ``vae.`` prefix."""
    rules = (
        prefixed(tables.qwen2_hf_rules(cfg.llm), "llm.", "llm.")
        + prefixed(tables.mar_torch_rules(cfg.mar), "mar.", "mar.")
        + prefixed(tables.diffloss_torch_rules(cfg.diffloss), "mar.diffloss.", "diffloss.")
        + prefixed(tables.PROJECTOR_RULES, "proj_in.", "proj_in.")
        + prefixed(tables.PROJECTOR_RULES, "proj_out.", "proj_out.")
        + prefixed(tables.vae_ldm_rules(cfg.vae), "vae.", "vae.")
    )
    if cfg.vision is not None:
        rules += prefixed(tables.siglip_hf_rules(cfg.vision), "siglip2.vision_model.", "siglip2.") + prefixed(
            tables.PROJECTOR_RULES, "siglip2_proj.", "siglip2_proj.")
        return KeyMap(rules, ignore_torch=(CLASS_EMB,))
    return KeyMap(rules, ignore_torch=(CLASS_EMB, *VISION))


def _to_numpy(v) -> np.ndarray:
    import ml_dtypes
    import torch

    if v.dtype == torch.bfloat16:  # exact: reinterpret the bits
        return v.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return v.numpy()


def _to_torch(x: np.ndarray):
    import torch

    x = np.array(x, order="C")  # a writable copy: torch refuses read-only buffers
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ConversionError(f"Cannot read {path} as a PyTorch state dict ({type(e).__name__}: {e}).") from e
    if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    return {k: _to_numpy(v) for k, v in sd.items()}


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def config_from_tensors(state: Mapping[str, Any], vae_state: Mapping[str, Any], llm_config: dict,
                        config: str | Mapping[str, Any] | None = None) -> unipic.UniPicConfig:
    """A :class:`UniPicConfig` whose dimensions are read from the tensors."""
    overrides = dict(config) if isinstance(config, Mapping) else {}
    base = unipic.UniPicConfig.preset(config if isinstance(config, str) else overrides.pop("preset", "unipic_1_5b"))
    part_kw: dict[str, dict[str, Any]] = {p: {} for p in ("llm", "mar", "diffloss", "vae", "vision")}
    top: dict[str, Any] = {}
    for dotted, value in overrides.items():
        part, _, field = dotted.partition(".")
        sub = getattr(base, part, None) if field and part in part_kw else None
        if sub is not None and field in {f.name for f in dataclasses.fields(sub)}:
            part_kw[part][field] = value
        elif not field and part in {f.name for f in dataclasses.fields(base)}:
            top[part] = value
        else:
            raise ConversionError(f"Unknown config override {dotted!r}; use 'part.field' with part in "
                                  "llm, mar, diffloss, vae, vision (e.g. 'mar.num_heads'), a top-level field "
                                  "such as 'image_token_id', or 'preset'")
    shape = {k: tuple(np.shape(v)) for k, v in state.items()}
    need = ["mar.z_proj.weight", "mar.encoder_pos_embed_learned", "mar.diffusion_pos_embed_learned",
            "mar.diffloss.net.input_proj.weight", "mar.diffloss.net.cond_embed.weight"]
    missing = [k for k in need if k not in shape]
    if missing:
        raise ConversionError(f"The release state dict lacks {missing}; is this a UniPic-1 checkpoint?")
    W, C = shape["mar.z_proj.weight"]
    total, L = shape["mar.encoder_pos_embed_learned"][1], shape["mar.diffusion_pos_embed_learned"][1]
    vshape = {k: tuple(np.shape(v)) for k, v in vae_state.items()}
    if "encoder.conv_in.weight" not in vshape:
        raise ConversionError("kl16.ckpt lacks encoder.conv_in.weight; is it the LDM KL VAE?")
    ch = vshape["encoder.conv_in.weight"][0]
    levels = _count(vshape, r"encoder\.down\.(\d+)\..*")
    # overrides first, then what the tensors say (they cannot be overridden); validated once
    read = {
        "mar": dict(token_dim=C, width=W, buffer_size=total - L, grid=int(round(L**0.5)),
                    mlp_ratio=shape.get("mar.encoder_blocks.0.mlp.fc1.weight", (4 * W,))[0] // W,
                    encoder_depth=_count(shape, r"mar\.encoder_blocks\.(\d+)\..*"),
                    decoder_depth=_count(shape, r"mar\.decoder_blocks\.(\d+)\..*")),
        "diffloss": dict(in_channels=C, z_channels=shape["mar.diffloss.net.cond_embed.weight"][1],
                         width=shape["mar.diffloss.net.input_proj.weight"][0],
                         depth=_count(shape, r"mar\.diffloss\.net\.res_blocks\.(\d+)\..*")),
        "vae": dict(ch=ch, ch_mult=tuple(vshape[f"encoder.down.{i}.block.0.conv2.weight"][0] // ch
                                         for i in range(levels)),
                    num_res_blocks=_count(vshape, r"encoder\.down\.0\.block\.(\d+)\..*"),
                    embed_dim=vshape["quant_conv.weight"][0] // 2),
    }
    try:
        parts = {p: getattr(base, p).replace(**{**part_kw[p], **read[p]}) for p in read}
        parts["llm"] = qwen2.config_from_hf(llm_config, dtype=base.llm.dtype, param_dtype=base.llm.param_dtype)
        parts["llm"] = parts["llm"].replace(**part_kw["llm"])
        if part_kw["vision"]:
            parts["vision"] = base.vision.replace(**part_kw["vision"])
        return dataclasses.replace(base, **top, **parts)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"The release's dimensions with config {config!r} give no valid UniPicConfig: {e}") from e


def _find(path: Path, names) -> Path:
    for n in names:
        if (path / n).exists():
            return path / n
    raise ConversionError(f"{path} has none of {list(names)} (found {sorted(p.name for p in path.iterdir())})")


def find_llm_dir(path: Path) -> Path:
    """The release's LLM subfolder (the one holding a ``config.json``)."""
    found = sorted(p for p in Path(path).iterdir() if p.is_dir() and (p / "config.json").exists())
    if not found:
        raise ConversionError(f"{path} has no LLM folder with a config.json (e.g. Qwen2.5-1.5B-Instruct/); "
                              "pass llm_dir=.")
    return found[0]


def from_unipic(path: str | os.PathLike, config: str | Mapping[str, Any] | None = None, mesh=None, dtype=None,
                llm_dir: str | os.PathLike | None = None) -> unipic.UniPic:
    """Loads the release folder (see the module docstring) into the composite."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path} is not a folder holding the UniPic-1 release.")
    state = _read_torch(_find(path, ("pytorch_model.bin", "model.safetensors")))
    vae_state = _read_torch(_find(path, ("kl16.ckpt",)))
    llm_path = Path(llm_dir) if llm_dir else find_llm_dir(path)
    cfg = config_from_tensors(state, vae_state, json.loads((llm_path / "config.json").read_text()), config)
    if dtype is not None:
        cfg = cfg.with_dtype(dtype)
    abstract = nnx.eval_shape(lambda: unipic.UniPic(cfg, rngs=nnx.Rngs(0)))
    keymap = release_keymap(cfg)
    source = DictSource({**state, **{f"vae.{k}": v for k, v in vae_state.items()}}, str(path))
    tied = ("llm.lm_head.weight",) if cfg.llm.tie_word_embeddings else ()  # torch's state_dict lists both
    model = load_state(abstract, source, keymap, optional=tied, mesh=mesh, progress=False)
    unused = sorted(k for k in state if keymap.ignored(k))
    if unused:
        log.info("from_unipic: %d release keys unused by this model (%s ...)", len(unused), unused[:3])
    return model


def to_unipic(model: unipic.UniPic, path: str | os.PathLike, *, llm_dir_name: str = "Qwen2.5-1.5B-Instruct",
              overwrite: bool = False) -> Path:
    """Writes the release layout: ``pytorch_model.bin`` (official key names), ``kl16.ckpt``
    (``{"model": ...}``) and the LLM's ``config.json``."""
    import torch
    import transformers

    main, vae = {}, {}
    for key, x in torch_tensors(model, release_keymap(model.config)):
        if key.startswith("vae."):
            vae[key[len("vae."):]] = _to_torch(x)
        else:
            main[key] = _to_torch(x)
    if model.config.llm.tie_word_embeddings:  # as torch's state_dict of a tied model has it
        main["llm.lm_head.weight"] = main["llm.model.embed_tokens.weight"]
    with AtomicFolder(path, overwrite) as tmp:
        torch.save(main, tmp / "pytorch_model.bin")
        torch.save({"model": vae}, tmp / "kl16.ckpt")
        transformers.Qwen2Config(**qwen2.config_to_hf(model.config.llm)).save_pretrained(tmp / llm_dir_name)
    return Path(path)
