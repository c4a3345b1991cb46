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


def tune_cpu_malloc() -> bool:
    """Keeps the memory of XLA:CPU's per-call buffers in the process instead of handing it back
    to the kernel after every call. Returns whether it did.

    XLA:CPU takes each execution's temporaries from ``malloc`` in one block (95 MB for a demo
    train step) and frees it afterwards. glibc serves a block that large with a fresh ``mmap``
    (from a thread's own arena always, whatever ``M_MMAP_MAX`` says) and unmaps it on free, so
    every step faults its 23 k pages in again: 90 ms of system time per demo step on two cores.
    One malloc arena, no ``mmap`` and no trimming below 2 GB keep freed blocks for the next call
    (the demo step here: 190 → 127 ms; 800 page faults a step instead of 23 k). The price: the
    process keeps its peak heap instead of returning it.

    Acts only with glibc, before JAX's backend starts (its threads pick their arena on first
    use; afterwards this is too late and returns False), and when the backend will be one CPU
    device: ``JAX_PLATFORMS`` / ``jax_platforms`` name ``cpu`` first or no TPU/GPU plugin is
    installed, and neither ``jax_num_cpu_devices`` nor ``--xla_force_host_platform_device_count``
    asks for more than one. With 8 simulated devices each device's block is an eighth, below
    glibc's 32 MB mmap threshold, so the default allocator already reuses it, and the one arena
    made the demo's step slower (250 → 310-460 ms). ``UNIPIC_JAX_CPU_MALLOC=default`` turns it
    off. ``train.py``, ``eval.py`` and ``benchmarks/train_step.py`` call it first thing.
    """
    import ctypes
    import importlib.metadata
    import importlib.util
    import os
    import platform
    import re

    import jax

    if os.environ.get("UNIPIC_JAX_CPU_MALLOC", "") == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        from jax._src import xla_bridge

        if getattr(xla_bridge, "_backends", None):
            return False  # backend threads exist already
    except ImportError:
        pass
    forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if jax.config.jax_num_cpu_devices > 1 or (forced and int(forced.group(1)) > 1):
        return False
    platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
    if platforms:
        if platforms.split(",")[0].strip() != "cpu":
            return False
    else:
        plugins = {ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")}
        if plugins or any(importlib.util.find_spec(m) is not None for m in ("libtpu", "jax_plugins")):
            return False
    mallopt = ctypes.CDLL(None).mallopt
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    return bool(mallopt(m_arena_max, 1) and mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2**31 - 1))
