"""Checkpoint conversion between PyTorch / Hugging Face and unipic-jax.

``from_hf(path, mesh=None, dtype=None)`` reads a Hugging Face folder into an NNX model;
``to_hf(model, path)`` writes one that ``transformers`` loads; ``from_unipic`` / ``to_unipic``
read and write the official UniPic-1 release layout; ``understanding_from_hf`` builds the
SigLIP2 understanding model from a Qwen2 folder, a SigLIP folder and the projector's weights.
The key tables live in :mod:`unipic_jax.convert.tables`. ``python -m unipic_jax.convert``
converts between Hugging Face folders and Orbax checkpoints from the command line.
"""


__all__ = ["ConversionError", "from_hf", "from_unipic", "to_hf", "to_unipic", "understanding_from_hf"]

_HOME = {"ConversionError": "hf", "from_hf": "hf", "to_hf": "hf", "from_unipic": "release", "to_unipic": "release",
         "understanding_from_hf": "hf"}


def __getattr__(name):  # lazy: importing the package loads neither the models nor transformers
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"unipic_jax.convert.{_HOME[name]}"), name)
    raise AttributeError(f"module 'unipic_jax.convert' has no attribute {name!r}")
