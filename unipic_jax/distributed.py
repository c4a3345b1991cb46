"""Starting on several processes, and keeping them in agreement.

Every host of a pod runs the same command; :func:`initialize` joins them into one JAX
runtime before any other JAX call, so ``jax.devices()`` lists every chip of every host and
one global mesh spans them. How the processes find each other:

* ``JAX_COORDINATOR_ADDRESS`` (``host:port``, served by process 0), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` (``0 … N-1``): all three are read here and passed to
  ``jax.distributed.initialize`` (JAX itself reads only the address);
* none of them set: a Cloud TPU pod slice, SLURM or Open MPI is detected by JAX itself;
* nothing at all: a single process, and nothing is initialised.

On CPU (``JAX_PLATFORMS=cpu``) ``JAX_NUM_CPU_DEVICES=K`` gives each process K devices (JAX
reads it) and cross-process collectives run over gloo, so two processes × 4 devices on one
machine form one 8-device mesh: the way the tests prove multi-host behaviour.

A process whose coordinator never answers fails within ``UNIPIC_JAX_INIT_TIMEOUT`` seconds
(default 300) naming the address; processes that disagree (configs, device counts) fail
with :class:`DistributedError` naming the process and what differed (:func:`check_same`).
:func:`barrier` and :func:`gather_strings` use the coordinator's key-value store, so they
work whatever the devices are doing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger(__name__)

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
ENV_NUM_HINT = f"{ENV_ADDRESS}=host:port, {ENV_COUNT}=N, {ENV_ID}=0..N-1"
AUTO_DETECTED = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")
_counter = {"n": 0}


class DistributedError(RuntimeError):
    """The processes of a run could not start together or do not agree."""


def _timeout_s() -> int:
    return int(os.environ.get("UNIPIC_JAX_INIT_TIMEOUT", "300"))


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text in (None, ""):
        return None
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{name}={text!r} is not an integer") from None


def _wait_for_coordinator(address: str, process_id: int, timeout_s: float):
    """Polls ``address`` over TCP until it accepts a connection (process 0 serves it), so a
    coordinator that never comes up is a Python error instead of the runtime's abort."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"{ENV_ADDRESS}={address!r} must be host:port")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"process {process_id}: the coordinator at {address} did not answer within {timeout_s:.0f} s "
                    f"({e}). Start process 0 (it serves the coordinator) with the same {ENV_ADDRESS}, check that "
                    f"host:port is reachable from this host, or raise UNIPIC_JAX_INIT_TIMEOUT.") from None
            time.sleep(0.2)


def initialize() -> None:
    """Joins this process to the run's others (see the module docstring); idempotent, and a
    no-op for a single process. Call it before anything touches a JAX backend."""
    import jax

    if jax.distributed.is_initialized():
        return
    address, count, pid = os.environ.get(ENV_ADDRESS) or None, _env_int(ENV_COUNT), _env_int(ENV_ID)
    auto = [k for k in AUTO_DETECTED if k in os.environ]
    if address is None and count is None and pid is None and not auto:
        return
    if address is not None and not auto and (count is None or pid is None):
        missing = [n for n, v in ((ENV_COUNT, count), (ENV_ID, pid)) if v is None]
        raise DistributedError(f"{ENV_ADDRESS}={address} is set but {' and '.join(missing)} not: set all three "
                               f"({ENV_NUM_HINT}) on every process")
    if count is not None and pid is not None and not 0 <= pid < count:
        raise DistributedError(f"{ENV_ID}={pid} is outside 0..{count - 1} ({ENV_COUNT}={count})")
    if count == 1 and address is None:
        return
    timeout = _timeout_s()
    # cross-process collectives of the CPU backend (TPU and GPU backends have their own)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address is not None and pid not in (None, 0):
        _wait_for_coordinator(address, pid, timeout)
    if pid == 0:
        log.info("process 0: serving the coordinator at %s and waiting up to %d s for %d processes "
                 "(if this aborts with DEADLINE_EXCEEDED, some process never started)", address, timeout, count)
    jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=pid,
                               initialization_timeout=timeout)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    check_same("local device count", {"platform": jax.devices()[0].platform, "devices": jax.local_device_count()},
               hint="give every process the same number of accelerators (on CPU: the same JAX_NUM_CPU_DEVICES)")


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def _key(name: str) -> str:
    _counter["n"] += 1  # every process makes the same calls in the same order
    return f"unipic_jax/{_counter['n']}/{name.replace(' ', '_')}"


def gather_strings(name: str, text: str, timeout_s: float | None = None) -> list[str]:
    """Every process's ``text`` (index = process id). One process: ``[text]``."""
    import jax

    if jax.process_count() == 1:
        return [text]
    client, key = _client(), _key(name)
    client.key_value_set(f"{key}/{jax.process_index()}", text)
    ms = int(1000 * (timeout_s or _timeout_s()))
    try:
        return [client.blocking_key_value_get(f"{key}/{i}", ms) for i in range(jax.process_count())]
    except Exception as e:  # noqa: BLE001  (the runtime's error types are not public)
        raise DistributedError(f"process {jax.process_index()}: not every process reached {name!r} within "
                               f"{ms / 1000:.0f} s ({e}); another process has stopped or runs other code") from e


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Waits until every process has reached the barrier ``name``."""
    import jax

    if jax.process_count() == 1:
        return
    ms = int(1000 * (timeout_s or _timeout_s()))
    try:
        _client().wait_at_barrier(_key(name), ms)
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"process {jax.process_index()}: barrier {name!r} timed out after {ms / 1000:.0f} s "
                               f"({e}); another process has stopped or runs other code") from e


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def check_same(name: str, value: Any, hint: str = "") -> None:
    """Raises :class:`DistributedError` on every process unless all processes passed an
    equal ``value`` (anything JSON can write; a ``ConfigDict`` is taken as its dict). The
    message names the first process that differs from process 0 and the differing fields."""
    import jax

    if jax.process_count() == 1:
        return
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    texts = gather_strings(name, json.dumps(value, sort_keys=True, default=str))
    if all(t == texts[0] for t in texts):
        return
    j = next(i for i, t in enumerate(texts) if t != texts[0])
    a, b = _flatten(json.loads(texts[0])), _flatten(json.loads(texts[j]))
    diff = [f"{k}: {a.get(k, '<missing>')!r} on process 0, {b.get(k, '<missing>')!r} on process {j}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]
    raise DistributedError(f"the processes disagree on the {name}: " + "; ".join(diff[:8]) +
                           (f" (and {len(diff) - 8} more)" if len(diff) > 8 else "") +
                           f". Every process must run the same command{': ' + hint if hint else ''}.")


def is_main() -> bool:
    """Whether this is process 0 (which writes the run's shared files)."""
    import jax

    return jax.process_index() == 0
