"""Where a search's trials fine-tune: ``device`` and ``gpus_per_trial`` checked against the GPUs
there are, and the ``workers`` default they allow.

Checked before anything trains, so that ``--device cuda`` on a machine (or cluster) without a GPU
is a one-line error in seconds. Which GPUs count: on one machine, those torch sees here (the local
Ray started by the search sees the same ones); with ``ray_address``, the cluster's ``GPU``
resource (``ray.cluster_resources()``), because the driver itself may have none.

Trials run in Ray workers, each seeing only the GPUs Ray gave it, so a search takes ``cuda``, not
``cuda:N`` (restrict the GPUs with ``CUDA_VISIBLE_DEVICES`` instead); ``auto`` is resolved inside
each worker (:func:`autoshrink.device.resolve_device`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from autoshrink.device import DeviceError, resolve_device

__all__ = ["DevicePlan", "cluster_counts", "plan_devices"]


@dataclass(frozen=True)
class DevicePlan:
    """What each trial asks Ray for, and how many run at once.

    Args:
        device: passed to each trial (``"cpu"``, ``"cuda"`` or ``"auto"``; resolved in the worker).
        gpus_per_trial: Ray's ``num_gpus`` for each trial (0: none).
        workers: trials in flight at once.
    """

    device: str
    gpus_per_trial: float
    workers: int


def cluster_counts(ray_address: str | None) -> tuple[float, float]:
    """``(GPUs, CPUs)`` the trials can use: this machine's, or the cluster's at ``ray_address``
    (connected to briefly when this process has not joined it yet)."""
    if ray_address is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return float(gpus), float(os.cpu_count() or 1)
    import ray

    joined = ray.is_initialized()
    if not joined:
        ray.init(address=ray_address, logging_level="ERROR", log_to_driver=False)
    try:
        resources = ray.cluster_resources()
    finally:
        if not joined:
            ray.shutdown()
    return float(resources.get("GPU", 0.0)), float(resources.get("CPU", 1.0))


def plan_devices(
    device: str = "cpu",
    gpus_per_trial: float | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    *,
    counts: tuple[float, float] | None = None,
) -> DevicePlan:
    """Check ``device`` and ``gpus_per_trial`` against the GPUs there are; the ``workers`` default.

    - ``cpu``: no GPU is asked for; ``gpus_per_trial`` is an error.
    - ``cuda``: each trial asks for ``gpus_per_trial`` GPUs (default 1; a fraction below 1 packs
      several fine-tunes on one GPU, above 1 it must be whole, as Ray requires); none in the
      cluster is an error.
    - ``auto``: as ``cuda`` where there are GPUs, as ``cpu`` where there are none.

    ``workers`` defaults to ``floor(GPUs / gpus_per_trial)`` (at most the CPUs, at least 1) with
    GPUs, else to one per two cores (:func:`autoshrink.search.default_workers`).

    Args:
        counts: ``(GPUs, CPUs)``; None: :func:`cluster_counts` (this machine, or the cluster).

    Raises:
        DeviceError: an unknown device, ``cuda:N``, ``cuda`` without a GPU, or ``gpus_per_trial``
            that does not apply (CPU training) or cannot be granted; each says what it needs.

    Example:
        >>> plan_devices("cuda", 0.5, counts=(2.0, 16.0))
        DevicePlan(device='cuda', gpus_per_trial=0.5, workers=4)
        >>> plan_devices("auto", counts=(0.0, 8.0)).gpus_per_trial
        0.0
    """
    from autoshrink.search.config import default_workers

    spec = device.strip().lower() if isinstance(device, str) else str(resolve_device(device))
    if spec not in ("auto", "cpu", "cuda"):
        resolve_device(device)  # the unknown-value error (and cuda:N without CUDA)
        raise DeviceError(
            f"--device {spec}: trials run in Ray workers, each seeing only the GPU(s) Ray gives it; "
            "use --device cuda (restrict the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if gpus_per_trial is not None:
        if isinstance(gpus_per_trial, bool) or not isinstance(gpus_per_trial, (int, float)) or not (
                0 < gpus_per_trial < math.inf):
            raise DeviceError(f"--gpus-per-trial must be a positive number, got {gpus_per_trial!r}")
        if gpus_per_trial > 1 and gpus_per_trial != int(gpus_per_trial):
            raise DeviceError(f"--gpus-per-trial {gpus_per_trial:g}: above 1 it must be a whole number "
                              "(Ray shares a GPU only in fractions below 1)")
        if spec == "cpu":
            raise DeviceError(f"--gpus-per-trial {gpus_per_trial:g} needs --device cuda or auto (with "
                              "--device cpu no trial uses a GPU)")
    if spec == "cpu":  # nothing to count (and no cluster to connect to)
        return DevicePlan("cpu", 0.0, workers or default_workers())
    gpus, cpus = counts if counts is not None else cluster_counts(ray_address)
    where = f"the Ray cluster at {ray_address}" if ray_address else "this machine"
    if spec == "auto" and not gpus:
        if gpus_per_trial is not None:
            raise DeviceError(f"--gpus-per-trial {gpus_per_trial:g} needs a GPU, and {where} has none "
                              "(drop --gpus-per-trial, or run on a machine or cluster with GPUs)")
        return DevicePlan("auto", 0.0, workers or default_workers())
    if not gpus:
        if ray_address is None:
            resolve_device("cuda")  # torch's own one-line reason
        raise DeviceError(f"--device cuda: {where} offers no GPU (ray.cluster_resources() has no 'GPU'); "
                          "use --device cpu or --device auto, or add GPU nodes to the cluster")
    per_trial = float(gpus_per_trial) if gpus_per_trial is not None else 1.0
    if per_trial > gpus:
        raise DeviceError(f"--gpus-per-trial {per_trial:g}: {where} has {gpus:g} GPU(s), so no trial could "
                          f"start; ask for at most {gpus:g}")
    if workers is None:
        workers = max(1, min(math.floor(gpus / per_trial + 1e-9), int(cpus) or 1))
    return DevicePlan(spec, per_trial, workers)
