"""Command line: convert between Hugging Face folders and unipic-jax Orbax checkpoints.

    python -m unipic_jax.convert hf-to-orbax  HF_DIR   CKPT_DIR [--dtype bfloat16] [--mesh fsdp=-1]
    python -m unipic_jax.convert orbax-to-hf  CKPT_DIR HF_DIR   [--max-shard-size 5GB] [--overwrite]

Loading places every tensor straight onto its sharding over ``--mesh`` (default: all
local devices on the ``fsdp`` axis), so a model larger than one device's memory converts.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from unipic_jax import checkpoint, sharding
from unipic_jax.convert.hf import ConversionError, from_hf, to_hf


def _mesh_arg(text: str) -> dict[str, int]:
    try:
        out = {k.strip(): int(v) for k, v in (p.split("=") for p in text.split(",") if p.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mesh takes axis=size pairs like 'data=1,fsdp=-1,tensor=2', got {text!r}")
    sharding.MeshConfig.from_any(out)  # validates axis names
    return out


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
    b.add_argument("--max-shard-size", default="5GB", help="split safetensors above this size (default 5GB)")
    for s in (a, b):
        s.add_argument("--mesh", type=_mesh_arg, default={"fsdp": -1},
                       help="mesh axis sizes, e.g. 'fsdp=-1' or 'data=2,fsdp=2,tensor=2' (default fsdp=-1)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    sharding.initialize_distributed()
    mesh = sharding.make_mesh(args.mesh)
    t0 = time.time()
    try:
        if args.command == "hf-to-orbax":
            model = from_hf(args.src, mesh=mesh, dtype=args.dtype)
            out = checkpoint.save_model(args.dst, model, overwrite=args.overwrite)
        else:
            model = checkpoint.load_model(args.src, mesh=mesh, dtype=args.dtype)
            out = to_hf(model, args.dst, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (ConversionError, checkpoint.CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
