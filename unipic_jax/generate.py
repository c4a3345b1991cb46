"""Command line: generate, edit and describe images with a UniPic checkpoint.

    python -m unipic_jax.generate --checkpoint CKPT --prompt "a red circle" --out a.png
    python -m unipic_jax.generate --checkpoint CKPT --edit src.png --instruction "make it blue" --out b.png
    python -m unipic_jax.generate --checkpoint CKPT --describe img.png --question "What is shown?"

``CKPT`` is an Orbax checkpoint written by ``python -m unipic_jax.convert unipic-to-orbax``
or by training, or the release folder itself (``pytorch_model.bin``, ``kl16.ckpt`` and the
Qwen2.5 folder, converted on the fly). The tokenizer is read from ``--tokenizer``, else
``CKPT/tokenizer/``, else the release's Qwen2.5 folder. Several ``--prompt`` (or ``--seed``
with ``--num_images``) give several images: ``a.png`` becomes ``a_0.png``, ``a_1.png``, ...
Defaults follow the release scripts: 1024×1024 pixels for generation and editing, 512 for
understanding, 32 iterations, CFG 3.0 (constant), temperature 1.0 (0.85 for editing).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from unipic_jax import checkpoint, distributed, sharding


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size takes N or HxW (pixels), got {text!r}") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"--size takes N or HxW (pixels), got {text!r}")
    return (parts[0], parts[-1])


def find_tokenizer(ckpt: Path, given: str | None) -> Path:
    """``--tokenizer``, else ``CKPT/tokenizer``, else a subfolder of ``CKPT`` with tokenizer files."""
    if given:
        return Path(given)
    candidates = [ckpt / "tokenizer"] + sorted(p for p in ckpt.iterdir() if p.is_dir())
    for c in candidates:
        if (c / "tokenizer_config.json").exists() or (c / "tokenizer.json").exists():
            return c
    raise FileNotFoundError(f"No tokenizer found in {ckpt}/tokenizer or its subfolders; pass --tokenizer DIR "
                            "(the Qwen2.5-1.5B-Instruct folder).")


def load(ckpt: Path, mesh=None, dtype=None, config: str | None = None):
    """A UniPic model from an Orbax checkpoint or a release folder."""
    from unipic_jax.convert.release import from_unipic

    if (ckpt / checkpoint.CONFIG).exists() or (ckpt / checkpoint.PARAMS).exists():
        model = checkpoint.load_model(ckpt, mesh=mesh, dtype=dtype)
        if checkpoint.kind_of_config(model.config) != "unipic":
            raise checkpoint.CheckpointError(f"{ckpt} holds a {type(model.config).__name__}, not a UniPic model")
        return model
    if (ckpt / "kl16.ckpt").exists():
        return from_unipic(ckpt, config=config, mesh=mesh, dtype=dtype)
    raise FileNotFoundError(f"{ckpt} is neither a unipic-jax checkpoint (config.json + params/) nor a UniPic-1 "
                            "release folder (pytorch_model.bin + kl16.ckpt).")


def _outputs(out: str, n: int) -> list[Path]:
    p = Path(out)
    if p.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out!r}")
    return [p] if n == 1 else [p.with_name(f"{p.stem}_{i}{p.suffix}") for i in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unipic_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Orbax UniPic checkpoint or UniPic-1 release folder")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--prompt", action="append", help="text-to-image prompt (repeatable)")
    task.add_argument("--edit", metavar="SRC", help="source image to edit (with --instruction)")
    task.add_argument("--describe", metavar="IMG", help="image to answer --question about")
    p.add_argument("--instruction", help="editing instruction")
    p.add_argument("--question", default="Describe this image.", help="question for --describe")
    p.add_argument("--out", default="out.png", help="output PNG (several images: out_0.png, out_1.png, ...)")
    p.add_argument("--num_images", type=int, default=1, help="images per prompt, each with its own seed")
    p.add_argument("--size", type=_size, default=None,
                   help="image size in pixels: N or HxW (default 1024; 512 for --describe)")
    p.add_argument("--num_iter", type=int, default=32, help="MAR sampling iterations (default 32)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale; 1 disables (default 3)")
    p.add_argument("--cfg_schedule", choices=("constant", "linear"), default="constant")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default 1.0; 0.85 for editing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=128, help="answer length limit for --describe")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: CKPT/tokenizer or the Qwen folder)")
    p.add_argument("--dtype", default=None, help="compute/parameter dtype, e.g. bfloat16 (default: as stored)")
    p.add_argument("--config", default=None, help="UniPicConfig preset for a release folder (default unipic_1_5b)")
    p.add_argument("--mesh", type=sharding.mesh_arg, default={"data": 1, "fsdp": -1},
                   help="mesh axis sizes (default data=1,fsdp=-1)")
    args = p.parse_args(argv)
    if args.edit and not args.instruction:
        p.error("--edit needs --instruction")
    if args.num_images < 1:
        p.error("--num_images must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from unipic_jax import sample
    from unipic_jax import tokenizer as tok_lib

    try:
        ckpt = Path(args.checkpoint)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"--checkpoint {ckpt} is not a folder")
        tok = tok_lib.load_tokenizer(find_tokenizer(ckpt, args.tokenizer))
        distributed.initialize()  # several processes: JAX_COORDINATOR_ADDRESS etc. (docs/multihost.md)
        mesh = sharding.make_mesh(args.mesh)
        t0 = time.time()
        model = load(ckpt, mesh=mesh, dtype=args.dtype, config=args.config)
        print(f"loaded {ckpt} in {time.time() - t0:.1f}s", file=sys.stderr)
        size = args.size or ((512, 512) if args.describe else (1024, 1024))
        opts = dict(size=size, num_iter=args.num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                    progress=True)
        if args.describe:
            answer = sample.describe(model, tok, [args.describe], [args.question], size=size,
                                     max_new_tokens=args.max_new_tokens)[0]
            if distributed.is_main():
                print(answer)
            return 0
        images = []
        for i in range(args.num_images):
            if args.edit:
                images.extend(sample.edit(model, tok, [args.edit], [args.instruction], seed=args.seed + i,
                                          temperature=0.85 if args.temperature is None else args.temperature,
                                          **opts))
            else:
                images.extend(sample.text_to_image(model, tok, args.prompt, seed=args.seed + i,
                                                   temperature=1.0 if args.temperature is None else args.temperature,
                                                   **opts))
        if distributed.is_main():  # every process computed the same images
            for path in sample.save_png(images, _outputs(args.out, len(images))):
                print(path)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
