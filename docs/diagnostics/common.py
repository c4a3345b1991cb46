"""What the diagnostics that read a trained model share: the ``--checkpoint`` / ``--tokenizer``
flags and loading both (the tokenizer defaults to the folder next to the checkpoint, where
``train.py`` puts it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from unipic_jax import checkpoint
from unipic_jax import tokenizer as tok_lib


def add_checkpoint_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--checkpoint", required=True, help="a model checkpoint (e.g. runs/demo/model)")
    ap.add_argument("--tokenizer", help="default: the tokenizer folder next to the checkpoint")


def load_checkpoint(args: argparse.Namespace):
    """``(model, tokenizer)`` from ``args.checkpoint`` and ``args.tokenizer``."""
    tok_dir = args.tokenizer or Path(args.checkpoint).resolve().parent / "tokenizer"
    return checkpoint.load_model(args.checkpoint), tok_lib.load_tokenizer(tok_dir)
