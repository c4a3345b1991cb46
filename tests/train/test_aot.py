"""The full-size configs: every stage builds, and a 1.5B (2.56B with MAR, head and VAE) train
step lowers ahead of time on the 8 simulated devices with FSDP, without any full-size array."""

import re
from pathlib import Path

import numpy as np
import pytest

from unipic_jax import sharding
from unipic_jax.train import aot, run
from unipic_jax.train.stages import Stage


def full_config(stage):
    return run.load_config(Path(__file__).parents[2] / "configs" / "unipic_1p5b.py", stage)


@pytest.mark.parametrize("stage", ["pt", "align", "ct", "sft"])
def test_every_stage_of_table_1_builds(stage):
    c = full_config(stage)
    mc = aot.model_config(c)
    st = Stage.from_config(stage, c.stages[stage], mc, 0)
    assert st.data.buckets[0] == ((512, 512) if stage == "pt" else (1024, 1024))
    assert mc.llm.remat == "full" and mc.llm.dtype == "bfloat16" and mc.llm.param_dtype == "float32"
    assert ("edit" in st.data.batch_size) == (stage != "pt")


def test_full_size_train_step_lowers_on_8_devices():
    c = full_config("ct")
    st = c.stages.ct
    st.buckets, st.understanding_size = ((256, 256),), (256, 256)  # smaller images: the same program, faster
    st.batch_size.t2i = st.batch_size.edit = st.batch_size.understanding = 8
    st.max_text_len.edit = st.max_text_len.understanding = 16 * 16 + 64 + 32
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    lowered, info = aot.lower_train_step(c, mesh)
    assert 2.5e9 < info["params"] < 2.7e9
    text = lowered.as_text()
    args = _main_arguments(text)
    big = [(n, spec) for n, spec in args if n > 2**20]  # parameters, Adam moments and EMA over 1M elements
    assert len(big) > 100
    split = sum(n for n, spec in big if '"fsdp"' in spec) / sum(n for n, _ in big)
    assert split > 0.98, split  # all but the frozen VAE's convolution kernels are split over fsdp
    assert any('{"data", "fsdp"}' in spec for _, spec in args)  # the batch over data x fsdp


def _main_arguments(text):
    """``(elements, sharding annotation)`` of each argument of the lowered program's ``@main``."""
    main = text[text.index("func.func public @main("):]
    signature = main[:main.index(") -> (")]
    out = []
    for arg in re.split(r"%arg\d+: ", signature)[1:]:
        dims = re.match(r"tensor<([^>]*)>", arg).group(1).split("x")[:-1]
        out.append((int(np.prod([int(d) for d in dims])) if dims else 1, arg))
    return out
