"""Command line: convert Hugging Face folders and the UniPic-1 release to and from
unipic-jax Orbax checkpoints.

    python -m unipic_jax.convert hf-to-orbax      HF_DIR      CKPT_DIR [--dtype bfloat16] [--mesh fsdp=-1]
    python -m unipic_jax.convert orbax-to-hf      CKPT_DIR    HF_DIR   [--max_shard_size 5GB] [--overwrite]
    python -m unipic_jax.convert unipic-to-orbax  RELEASE_DIR CKPT_DIR [--config unipic_1_5b]
                                                  [--set mar.num_heads=16 ...] [--llm_dir DIR]
    python -m unipic_jax.convert orbax-to-unipic  CKPT_DIR    RELEASE_DIR

A release folder holds ``pytorch_model.bin`` (or ``model.safetensors``), ``kl16.ckpt`` and the
Qwen2.5 folder (``config.json``, and the tokenizer files, which ``unipic-to-orbax`` copies to
``CKPT_DIR/tokenizer/`` so that ``python -m unipic_jax.generate`` finds them).

Loading places every tensor straight onto its sharding over ``--mesh`` (default: all
local devices on the ``fsdp`` axis), so a model larger than one device's memory converts.
"""

from __future__ import annotations

import argparse
import ast
import logging
import shutil
import sys
import time
from pathlib import Path

from unipic_jax import checkpoint, distributed, sharding
from unipic_jax.convert.hf import ConversionError, from_hf, to_hf
from unipic_jax.convert.release import find_llm_dir, from_unipic, to_unipic

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set takes part.field=value, e.g. mar.num_heads=16; got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key.strip(), value.strip()


def copy_tokenizer(llm_dir: Path, dst: Path) -> Path | None:
    """Copies the tokenizer files found in ``llm_dir`` to ``dst/tokenizer/`` (if any)."""
    files = [llm_dir / f for f in TOKENIZER_FILES if (llm_dir / f).exists()]
    if not files:
        return None
    tmp = dst / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from an interrupted copy
    tmp.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, tmp / f.name)
    final = dst / "tokenizer"
    if final.exists():
        shutil.rmtree(final)  # only reached with --overwrite (main refuses an existing one otherwise)
    tmp.rename(final)
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unipic_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-orbax", help="Hugging Face folder -> Orbax model checkpoint")
    a.add_argument("src", help="folder with config.json and model.safetensors[.index.json]")
    a.add_argument("dst", help="new checkpoint folder")
    a.add_argument("--dtype", default=None, help="parameter dtype to store (default: the checkpoint's)")
    b = sub.add_parser("orbax-to-hf", help="Orbax model checkpoint -> Hugging Face folder")
    b.add_argument("src", help="checkpoint folder written by hf-to-orbax or training")
    b.add_argument("dst", help="new Hugging Face folder")
    b.add_argument("--dtype", default=None, help="dtype of the written tensors (default: as stored)")
    b.add_argument("--max_shard_size", default="5GB", help="split safetensors above this size (default 5GB)")
    c = sub.add_parser("unipic-to-orbax", help="the UniPic-1 release folder -> Orbax model checkpoint")
    c.add_argument("src", help="folder with pytorch_model.bin (or model.safetensors), kl16.ckpt and the Qwen folder")
    c.add_argument("dst", help="new checkpoint folder")
    c.add_argument("--dtype", default=None, help="parameter dtype to store (default: float32)")
    c.add_argument("--config", default="unipic_1_5b",
                   help="UniPicConfig preset giving what the tensors cannot tell (head counts; default unipic_1_5b)")
    c.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="PART.FIELD=V",
                   help="override a config field on the preset, e.g. --set mar.num_heads=16 (repeatable)")
    c.add_argument("--llm_dir", default=None, help="the Qwen2.5 folder (default: the release's subfolder)")
    d = sub.add_parser("orbax-to-unipic", help="Orbax model checkpoint -> the UniPic-1 release layout")
    d.add_argument("src", help="checkpoint folder holding a UniPic model")
    d.add_argument("dst", help="new release folder")
    d.add_argument("--dtype", default=None, help="dtype of the written tensors (default: as stored)")
    for s in (a, b, c, d):
        s.add_argument("--mesh", type=sharding.mesh_arg, default={"fsdp": -1},
                       help="mesh axis sizes, e.g. 'fsdp=-1' or 'data=2,fsdp=2,tensor=2' (default fsdp=-1)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    distributed.initialize()
    mesh = sharding.make_mesh(args.mesh)
    t0 = time.time()
    try:
        if args.command == "hf-to-orbax":
            model = from_hf(args.src, mesh=mesh, dtype=args.dtype)
            out = checkpoint.save_model(args.dst, model, overwrite=args.overwrite)
        elif args.command == "orbax-to-hf":
            model = checkpoint.load_model(args.src, mesh=mesh, dtype=args.dtype)
            out = to_hf(model, args.dst, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        elif args.command == "unipic-to-orbax":
            if (Path(args.dst) / "tokenizer").exists() and not args.overwrite:
                raise FileExistsError(f"{args.dst}/tokenizer already exists; pass --overwrite to replace it.")
            config = {"preset": args.config, **dict(args.overrides)} if args.overrides else args.config
            model = from_unipic(args.src, config=config, mesh=mesh, dtype=args.dtype, llm_dir=args.llm_dir)
            out = checkpoint.save_model(args.dst, model, overwrite=args.overwrite)
            tok = copy_tokenizer(Path(args.llm_dir) if args.llm_dir else find_llm_dir(Path(args.src)), out)
            print(f"tokenizer: {tok or 'none found in the LLM folder; pass --tokenizer to generate'}")
        else:
            model = checkpoint.load_model(args.src, mesh=mesh, dtype=args.dtype)
            if checkpoint.kind_of_config(model.config) != "unipic":
                raise checkpoint.CheckpointError(f"{args.src} holds a {type(model.config).__name__}, not a UniPic")
            out = to_unipic(model, args.dst, overwrite=args.overwrite)
    except (ConversionError, checkpoint.CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
