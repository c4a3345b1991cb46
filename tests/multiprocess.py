"""Runs a command on N local processes that form one JAX runtime: the tests' pod.

Each process gets ``JAX_COORDINATOR_ADDRESS`` (a free port on 127.0.0.1), ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``, ``JAX_NUM_CPU_DEVICES`` and ``JAX_PLATFORMS=cpu``, so two processes × 4
devices make one 8-device mesh over gloo (:mod:`unipic_jax.distributed`). Output goes to files
(no pipe can fill up); every process is killed when the timeout passes.

    results = multiprocess.run([sys.executable, "train.py", ...], n=2, devices=4, timeout=600)
    assert all(r.returncode == 0 for r in results), multiprocess.report(results)
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Result:
    process: int
    returncode: int | None
    stdout: str
    stderr: str


def base_env(devices: int, extra: dict | None = None) -> dict:
    """The environment of a test process: CPU with ``devices`` devices, the suite's XLA cache."""
    import jax

    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
    env.update({"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), "PYTHONPATH": str(ROOT),
                "UNIPIC_JAX_XLA_CACHE": jax.config.jax_compilation_cache_dir or "", "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    env.update(extra or {})
    return env


class Group:
    """``n`` processes running ``argv`` as one JAX runtime (``n = 1``: a plain process).
    ``argv``, ``devices`` and ``env`` may be functions of the process index (processes that
    disagree, for the tests of that)."""

    def __init__(self, argv, n: int = 2, devices=4, env=None, cwd=ROOT):
        self.n = n
        self.dir = Path(tempfile.mkdtemp(prefix="mp-"))
        port = free_port()
        self.procs, self._files = [], []
        for i in range(n):
            e = base_env(devices(i) if callable(devices) else devices, env(i) if callable(env) else env)
            if n > 1:
                e.update({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n),
                          "JAX_PROCESS_ID": str(i)})
            out, err = open(self.dir / f"{i}.out", "w"), open(self.dir / f"{i}.err", "w")  # noqa: SIM115
            self._files += [out, err]
            args = argv(i) if callable(argv) else argv
            self.procs.append(subprocess.Popen([str(a) for a in args], env=e, cwd=cwd, stdout=out, stderr=err,
                                               stdin=subprocess.DEVNULL))

    def kill(self, i: int | None = None, sig=signal.SIGKILL):
        """Sends ``sig`` to process ``i`` (all when None)."""
        for j, p in enumerate(self.procs):
            if (i is None or i == j) and p.poll() is None:
                p.send_signal(sig)

    def wait(self, timeout: float = 600) -> list[Result]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                for q in self.procs:
                    q.wait()
                raise TimeoutError(f"processes still running after {timeout} s\n" + report(self.results())) from None
        return self.results()

    def results(self) -> list[Result]:
        for f in self._files:
            f.flush()
        return [Result(i, p.poll(), (self.dir / f"{i}.out").read_text(), (self.dir / f"{i}.err").read_text())
                for i, p in enumerate(self.procs)]


def run(argv, n: int = 2, devices=4, timeout: float = 600, env=None) -> list[Result]:
    """Runs ``argv`` on ``n`` processes × ``devices`` CPU devices; returns each one's result."""
    return Group(argv, n, devices, env).wait(timeout)


def _first_error(text: str, size: int = 3000) -> str:
    """The first Python traceback or fatal log line in ``text`` (what went wrong first; the tail
    of a process that aborted in a barrier shows only the barrier)."""
    starts = [i for i in (text.find("Traceback (most recent call last)"), text.find("\nF1"),
                          text.find("\nE1")) if i >= 0]
    return text[min(starts):min(starts) + size] if starts else ""


def report(results: list[Result], tail: int = 3000) -> str:
    """The return codes, first errors and output tails of ``results``, for assertion messages."""
    return "\n".join(f"--- process {r.process}: returncode {r.returncode}\nstdout: {r.stdout[-tail:]}\n"
                      f"first error: {_first_error(r.stderr)}\nstderr: {r.stderr[-tail:]}" for r in results)


def ok(results: list[Result]) -> bool:
    return all(r.returncode == 0 for r in results)
