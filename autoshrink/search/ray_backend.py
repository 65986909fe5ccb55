"""The Ray backend: starting Ray (a local one listens on loopback only), the latency meter on a
cluster's latency-target node, shipping the user's code to workers, and naming worker deaths.

Everything here imports Ray inside the function that needs it: ``import autoshrink`` stays light.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from autoshrink.record import TEACHER_LATENCY_MS_DRIVER, StudyAttr
from autoshrink.search.config import DEFAULT_LATENCY_TARGET, SearchError

__all__ = [
    "CLUSTER_MODE_VAR",
    "check_ray_address",
    "latency_meter",
    "loopback_only",
    "ray_reason",
    "ship_user_code_by_value",
    "start_ray",
]

CLUSTER_MODE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RAY_CONNECT_TIMEOUT_S = 3.0


def check_ray_address(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Try ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``, as ``ray start --head`` prints it)
    with a TCP connect of at most ``timeout_s`` seconds, before anything is built or trained:
    ``ray.init`` on a wrong address retries for minutes and floods the terminal. ``auto``
    (a cluster started on this machine) is left to Ray.

    Raises:
        SearchError: an address that does not parse, or nothing answering there in time.

    Example:
        >>> check_ray_address("127.0.0.1:1")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        autoshrink.search.config.SearchError: --ray-address 127.0.0.1:1: nothing answers there within 3 s ...
    """
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port_text = hostport.rstrip("/").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SearchError(f"--ray-address {address!r}: expected HOST:PORT (as `ray start --head` prints it, "
                          "e.g. 10.0.0.5:6379), or drop it to run on this machine")
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise SearchError(f"--ray-address {address}: nothing answers there within {timeout_s:g} s ({reason}): "
                          "is the cluster running (`ray start --head` on that machine) and the address "
                          "right? Or drop --ray-address to run on this machine") from None


def start_ray(address: str | None, num_cpus: int, runtime_env: dict | None = None) -> bool:
    """Join the Ray cluster at ``address``, or start a new local instance with ``num_cpus``.

    Returns:
        True if this call started a local Ray (then the caller shuts it down), False if Ray was
        already up or a cluster was joined.

    ``runtime_env`` (see :func:`autoshrink._usercode.runtime_env`) ships the user's own model code
    to every worker, so that multi-file code imports there as it does here.
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR", runtime_env=runtime_env)
        return False
    with loopback_only():
        ray.init(
            # always a new local instance: with no address, Ray would join a cluster
            # someone started on this machine with `ray start` (its latest one)
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            logging_level="ERROR",
            configure_logging=False,
            runtime_env=runtime_env,
        )
    return True


@contextlib.contextmanager
def loopback_only():
    """Keep a local Ray on 127.0.0.1. On Linux, Ray turns ``_node_ip_address="127.0.0.1"``
    into the machine's outward address, and its GCS, raylet and workers then listen on every
    interface (with no authentication: ``RAY_AUTH_MODE=disabled``). In Ray's single-machine
    mode (the Windows/macOS default, which this variable selects) they bind the loopback
    address only. The setting is inherited by the processes ``ray.init`` starts."""
    import ray._private.ray_constants as ray_constants

    saved_env, saved = os.environ.get(CLUSTER_MODE_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTER_MODE_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(CLUSTER_MODE_VAR, None)
        else:
            os.environ[CLUSTER_MODE_VAR] = saved_env


def latency_meter(study, task, latency_target: str | None, latency_runs: int, latency_threads: int,
                  runtime: str = "inductor"):
    """A ``LatencyMeter`` actor on the node offering the latency-target resource, or None
    (each trial then times in its own process, under its machine's lock). Records where latency
    is measured in the study, and the teacher's latency timed there too.

    Raises:
        SearchError: ``latency_target`` is named but the cluster does not offer it.
    """
    import ray

    from autoshrink.measure.latency import LatencyMeter

    name = latency_target or DEFAULT_LATENCY_TARGET
    offered = ray.cluster_resources().get(name, 0.0)
    if not offered:
        if latency_target:
            raise SearchError(
                f"latency target: the Ray cluster offers no resource {name!r}; start the "
                f"target node with `ray start --address ... --resources '{{\"{name}\": 1}}'`"
            )
        return None
    # a sliver of the resource, so that several searches can share one target; their
    # timings still take turns under the target's machine lock
    meter = ray.remote(num_cpus=0, resources={name: 0.01})(LatencyMeter).remote()
    where = ray.get(meter.where.remote())
    study.set_user_attr(StudyAttr.LATENCY_MEASURED_ON, {"resource": name, **where})
    teacher = dict(study.user_attrs.get(StudyAttr.TEACHER) or {})
    if teacher and TEACHER_LATENCY_MS_DRIVER not in teacher:  # the teacher, timed on the target too
        from autoshrink.measure.latency import program_bytes

        x = task.example_input[:1].contiguous()
        program = program_bytes(task.model.eval(), x, dynamic_batch=runtime != "inductor")
        lat = ray.get(meter.measure.remote(program, x, latency_runs, latency_threads, runtime))
        teacher[TEACHER_LATENCY_MS_DRIVER], teacher["latency_ms"] = teacher.get("latency_ms"), lat.median_ms
        study.set_user_attr(StudyAttr.TEACHER, teacher)
    return meter


def ship_user_code_by_value(task: Any) -> None:
    """Let Ray workers rebuild the user's model and data classes even when their module cannot
    be imported there (a script, a notebook, a test file): such modules are pickled by value.

    Modules of installed packages (torch, autoshrink, site-packages) stay pickled by reference.
    """
    from ray import cloudpickle

    objects = [task.model, *task.model.modules(), task.train_data, task.val_data]
    for obj in objects:
        name = type(obj).__module__
        module = sys.modules.get(name)
        top = name.split(".")[0]
        if module is None or top in ("torch", "autoshrink", "builtins", "__main__"):
            continue
        path = getattr(module, "__file__", None) or ""
        if "site-packages" in path or "dist-packages" in path or path.startswith(sys.prefix):
            continue
        try:
            cloudpickle.register_pickle_by_value(module)
        except ValueError:  # already registered, or not a module cloudpickle accepts
            pass


def ray_reason(exc: BaseException) -> str:
    """A trial's failure reason when its worker process died (OOM killer, kill -9, node lost)."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    if "OutOfMemory" in name or "memory" in first.lower():
        return f"out of memory: the worker was killed ({name})"
    if "WorkerCrashed" in name or "died" in first.lower() or "ActorDied" in name:
        return f"worker process died (killed by the OS or crashed), retried once: {name}"
    return f"{name}: {first[:300]}"
