"""unipic_jax.tune_cpu_malloc: XLA:CPU's large per-call buffers stop costing page faults."""

import json
import os
import subprocess
import sys

PROBE = """
import json, resource
import jax, jax.numpy as jnp
import unipic_jax
jax.config.update("jax_num_cpu_devices", DEVICES)
BEFORE
tuned = unipic_jax.tune_cpu_malloc()
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0) @ x)  # a 4096 x 4096 f32 temporary: 64 MB
x = jnp.ones((4096, 16))
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(x).block_until_ready()
print(json.dumps({"tuned": tuned, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4}))
"""


def _probe(setting: str, devices: int = 1, backend_first: bool = False) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "UNIPIC_JAX_CPU_MALLOC": setting}
    code = PROBE.replace("DEVICES", str(devices)).replace("BEFORE", "jax.devices()" if backend_first else "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_large_temporaries_stop_faulting_pages_in_every_call():
    default, tuned = _probe("default"), _probe("")
    assert not default["tuned"] and tuned["tuned"]
    # glibc's default maps the 64 MB block afresh per call: ~16 k faults of 4 kB pages
    assert default["faults"] > 8000, default
    assert tuned["faults"] < default["faults"] / 10, (default, tuned)


def test_left_alone_with_several_cpu_devices():
    # there each device's share of a block is small enough for glibc's own reuse
    assert not _probe("", devices=8)["tuned"]


def test_too_late_once_the_backend_runs():
    late = _probe("", backend_first=True)
    assert not late["tuned"] and late["faults"] > 8000, late
