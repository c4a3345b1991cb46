"""Real multi-process runs: two processes × 4 CPU devices (one 8-device mesh over gloo)
against one process × 8 devices, with the same global batch (tests/train/tiny_config.py: a
VAE stage with its latent-scale calibration, then a generation stage with gradient
accumulation and EMA). These are the suite's slowest tests (marked ``multiprocess``; every
run compiles its steps)."""

import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import multiprocess as mp
from unipic_jax.train.metrics import read_metrics

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).parents[2]
CONFIG = Path(__file__).parent / "tiny_config.py"
FIGURES = ("loss", "grad_norm", "rec", "kl", "t2i")


def train(workdir, *extra):
    return [sys.executable, ROOT / "train.py", "--config", CONFIG, "--workdir", workdir, *extra]


def params(workdir):
    from flax import nnx

    from unipic_jax import checkpoint

    model = checkpoint.load_model(Path(workdir) / "model")
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_close_params(a, b, rel=1e-3, noise=1e-2):
    """Each tensor within ``rel`` of its largest magnitude (reductions in another order, and
    Adam turning ~1e-7 gradient noise on near-zero gradients into steps of up to lr). Attention
    key biases have no gradient at all (softmax is invariant to a shift of every logit of a
    query), so they hold nothing but that noise: they must only stay below ``noise``."""
    assert a.keys() == b.keys()
    for k in a:
        if k[-2:] == ("k", "bias"):
            assert np.abs(a[k]).max() < noise and np.abs(b[k]).max() < noise, k
            continue
        scale = max(float(np.abs(a[k]).max()), 1e-12)
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=rel * scale, err_msg=str(k))


def assert_close_metrics(a, b, rel=1e-5):
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]
    for x, y in zip(a, b, strict=True):
        for m in FIGURES:
            if m in x:
                assert y[m] == pytest.approx(x[m], rel=rel), (x["step"], m)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    w = tmp_path_factory.mktemp("one")
    res = mp.run(train(w), n=1, devices=8, timeout=900)
    assert mp.ok(res), mp.report(res)
    return w


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    w = tmp_path_factory.mktemp("two")
    res = mp.run(train(w), n=2, devices=4, timeout=900)
    assert mp.ok(res), mp.report(res)
    assert "trained 5 steps" in res[0].stdout and "trained" not in res[1].stdout  # process 0 reports
    return w


def test_two_processes_train_as_one(one, two):
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5]
    assert_close_metrics(a, b)
    assert_close_params(params(one), params(two))
    for w in (one, two):  # the calibrated latent scale, one global statistic
        assert json.loads((w / "model" / "step.json").read_text()) == {"step": 5}
    scale = [json.loads((w / "model" / "config.json").read_text())["config"]["vae"]["scale"] for w in (one, two)]
    assert scale[0] == pytest.approx(scale[1], rel=1e-5) and scale[0] != 0.2325
    assert not list(two.glob("*.tmp")) and not list(two.glob(".*.tmp"))


def test_stopped_and_killed_runs_resume_to_the_same_model(two, tmp_path):
    """``--max_steps 2`` stops both processes with a checkpoint; the restart is SIGKILLed on
    one process once a later checkpoint exists (the other is then killed too, as a scheduler
    would); the second restart finishes. The result equals the uninterrupted 2-process run."""
    w = tmp_path / "run"
    res = mp.run(train(w, "--max_steps", "2"), n=2, timeout=900)
    assert mp.ok(res), mp.report(res)
    assert "stopped at step 2" in res[0].stdout
    group = mp.Group(train(w), n=2)
    deadline = time.monotonic() + 900
    while not (w / "checkpoints" / "4").exists() and all(p.poll() is None for p in group.procs):
        assert time.monotonic() < deadline, mp.report(group.results())
        time.sleep(0.2)
    group.kill(1, signal.SIGKILL)
    group.kill()
    group.wait(120)
    assert not (w / "model").exists(), "killed before the end, yet a model was written"
    res = mp.run(train(w), n=2, timeout=900)
    assert mp.ok(res), mp.report(res)
    m = read_metrics(w)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5]  # nothing lost, nothing twice
    assert_close_metrics(read_metrics(two), m, rel=0)  # bit for bit: gloo's reductions are deterministic
    a, b = params(two), params(w)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_eval_on_two_processes_writes_what_one_writes(two, tmp_path):
    out = {}
    for n, devices in ((1, 8), (2, 4)):
        res = mp.run([sys.executable, ROOT / "eval.py", "--checkpoint", two / "model", "--out", tmp_path / str(n),
                      "--per_category", "1", "--edit_per_kind", "1", "--qa", "2", "--num_iter", "2"],
                     n=n, devices=devices, timeout=600)
        assert mp.ok(res), mp.report(res)
        out[n] = json.loads((tmp_path / str(n) / "results.json").read_text())
    assert out[1] == out[2]
    assert out[2]["settings"]["cfg"] == 3.0  # from the model's eval.json (the demo's), not a flag


def test_processes_that_disagree_are_named(tmp_path):
    w = tmp_path / "w"
    res = mp.run(lambda i: train(w, *(["--config.seed=1"] if i == 1 else [])), n=2, timeout=300)
    assert all(r.returncode != 0 for r in res)
    err = res[0].stderr + res[1].stderr
    assert "disagree on the config" in err and "seed: 0 on process 0, 1 on process 1" in err, mp.report(res)
    res = mp.run(train(w), n=2, devices=lambda i: 4 + i, timeout=300)
    assert all(r.returncode != 0 for r in res)
    assert "local device count" in res[0].stderr + res[1].stderr, mp.report(res)


def test_a_mesh_that_does_not_fit_the_processes_is_named(tmp_path):
    res = mp.run(train(tmp_path, "--config.mesh.data=3"), n=2, timeout=300)
    assert all(r.returncode != 0 for r in res)
    assert "2 processes x 4 devices" in res[0].stderr, mp.report(res)


def test_a_coordinator_that_never_answers_is_named(tmp_path):
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{mp.free_port()}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
           "UNIPIC_JAX_INIT_TIMEOUT": "2"}
    res = mp.run(train(tmp_path), n=1, devices=4, env=env, timeout=120)
    assert res[0].returncode != 0
    assert "did not answer within 2 s" in res[0].stderr and "Start process 0" in res[0].stderr, mp.report(res)
