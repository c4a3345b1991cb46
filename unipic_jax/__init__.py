"""unipic-jax: a JAX/Flax NNX reimplementation of Skywork UniPic-1."""

__version__ = "0.1.0"


def enable_compilation_cache(path: str | None = None, min_compile_secs: float = 1.0) -> str:
    """Keeps XLA compilations on disk, so a resumed run or a second evaluation skips them
    (``train.py`` and ``eval.py`` call this; a cache, safe to delete). ``path`` defaults to
    ``$UNIPIC_JAX_XLA_CACHE`` or ``~/.cache/unipic-jax/xla``. Returns the folder."""
    import os

    import jax

    path = path or os.environ.get("UNIPIC_JAX_XLA_CACHE", os.path.expanduser("~/.cache/unipic-jax/xla"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    return path
