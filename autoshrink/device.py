"""Where training runs: device choice, bf16 autocast, seeding, DataLoader options, CUDA out-of-memory.

A run setting, never part of :class:`autoshrink.Task`: teacher training, teacher logits, the KD
fine-tune and validation of trainable models run on ``device``; lowering to int8 and every
latency timing stay on the CPU, because that is what is deployed. Models are moved to the
device for the work and back to where they were afterwards.

Mixed precision: on CUDA, the teacher's forward (no gradient, only soft targets) and a student
with no fake-quant run under bf16 autocast. A student with fake-quant runs in fp32 entirely:
under autocast, a quantized conv or linear without BatchNorm after it hands torchao's PT2E
activation fake-quant a bf16 tensor, and it fails (``fused_moving_avg_obs_fake_quant``:
"expected scalar type Float but found BFloat16", with CPU autocast on torch 2.13 / torchao
0.18; a test checks it); where BatchNorm follows, it runs, but the quantized layers' arithmetic
is then bf16, which is not what int8 deployment computes.
On the CPU nothing is autocast (the CPU path is unchanged).

This module imports torch only; CUDA is queried only when a CUDA device is asked for.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from autoshrink.errors import AutoshrinkError

__all__ = [
    "DEVICE_CHOICES",
    "DeviceError",
    "TrialOOM",
    "autocast",
    "default_workers",
    "deterministic",
    "describe_device",
    "has_fake_quant",
    "loader_options",
    "model_device",
    "out_of_memory_reason",
    "resolve_device",
    "seed_everything",
]

#: What ``--device`` / ``device=`` accept (``cuda:N`` too).
DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceError(AutoshrinkError, ValueError):
    """A ``device`` that cannot be used here (malformed, or CUDA asked for without one)."""


class TrialOOM(RuntimeError):
    """The device ran out of memory during one trial's fine-tune (that trial fails, the search
    goes on).

    Attributes:
        device: the device, e.g. ``"cuda:0"``.
        step: the fine-tune step it happened at (0: while moving the models there).
        batch_size: the fine-tune batch size.
        reason: the allocator's first line ("Tried to allocate 2.00 GiB ...").
    """

    def __init__(self, device: str, step: int, batch_size: int, reason: str) -> None:
        self.device, self.step, self.batch_size, self.reason = device, step, batch_size, reason
        super().__init__(
            f"{device} ran out of memory in the fine-tune at step {step} (batch size {batch_size}): "
            f"{reason}; use a smaller batch_size, or give each trial more of a GPU (a larger "
            "--gpus-per-trial, fewer trials per GPU)"
        )

    def __reduce__(self):  # rebuilt from its fields, so it travels back from Ray workers
        return type(self), (self.device, self.step, self.batch_size, self.reason)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` for ``--device auto|cpu|cuda|cuda:N``.

    ``auto`` is CUDA when this process sees a GPU, else the CPU. Under Ray, a trial sees only the
    GPUs Ray gave it, so ``cuda`` is its own one.

    Raises:
        DeviceError: an unknown value, or ``cuda`` / ``cuda:N`` where CUDA is not available (or
            has fewer GPUs), with the fix in one line.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None:
        device = "auto"
    if isinstance(device, torch.device):
        spec = str(device)
    elif isinstance(device, str):
        spec = device.strip().lower()
    else:
        raise DeviceError(f"--device must be one of {list(DEVICE_CHOICES)} or cuda:N, got {device!r}")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    kind, sep, index = spec.partition(":")
    if kind != "cuda" or (sep and not index.isdigit()):
        raise DeviceError(f"--device {device!r}: expected one of {list(DEVICE_CHOICES)} or cuda:N (N a "
                          "GPU index, e.g. cuda:0)")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {spec}: CUDA is not available here (torch {torch.__version__}); use "
                          "--device cpu or --device auto, or install a CUDA build of torch")
    if sep:
        count = torch.cuda.device_count()
        if int(index) >= count:
            raise DeviceError(f"--device {spec}: this process sees {count} GPU(s) (cuda:0..cuda:{count - 1}); "
                              "pick one of those, or --device cuda")
        return torch.device("cuda", int(index))
    return torch.device("cuda")


def describe_device(device: str | torch.device) -> str:
    """A line for the report: ``"cpu"`` or ``"cuda:0 (NVIDIA H200)"``.

    Example:
        >>> describe_device("cpu")
        'cpu'
    """
    dev = resolve_device(device)
    if dev.type != "cuda":
        return str(dev)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (the CPU for a model without any)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def has_fake_quant(model: nn.Module) -> bool:
    """Whether ``model`` holds fake-quant modules (a QAT-prepared student)."""
    from torch.ao.quantization import FakeQuantizeBase as TorchFakeQuantizeBase

    kinds: tuple[type, ...] = (TorchFakeQuantizeBase,)
    try:
        from torchao.quantization.pt2e import FakeQuantizeBase

        kinds = (*kinds, FakeQuantizeBase)
    except ImportError:  # torchao not importable: only torch's own fake-quant can be there
        pass
    return any(isinstance(m, kinds) for m in model.modules())


def autocast(device: str | torch.device, *, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device that supports bf16; a no-op elsewhere (and when not
    ``enabled``). Use it around a teacher forward, or a student without fake-quant (see the
    module docstring for why fake-quant stays fp32).

    Example:
        >>> with autocast("cpu"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    if not enabled or resolve_device(device).type != "cuda" or not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (torch's seeds every CUDA device too).

    Example:
        >>> seed_everything(0); a = torch.rand(1); seed_everything(0); bool(torch.rand(1) == a)
        True
    """
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic(device: str | torch.device) -> Iterator[None]:
    """Deterministic kernels on CUDA for the duration (same seed, same GPU: same result).

    Sets ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op without a
    deterministic CUDA kernel warns instead of failing), ``cudnn.deterministic`` and turns off
    ``cudnn.benchmark``; restores all three on exit. cuBLAS also needs
    ``CUBLAS_WORKSPACE_CONFIG``, which is set (if unset) before the first CUDA call and kept.
    On the CPU this does nothing: its kernels are already deterministic at a fixed thread count.
    """
    dev = resolve_device(device)
    if dev.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def loader_options(data: Any, device: str | torch.device) -> dict[str, Any]:
    """``DataLoader`` keyword arguments for ``data`` feeding ``device``.

    Worker processes come from the dataset's ``num_workers`` attribute: a streamed image folder
    has one (None: automatic, half the CPUs up to 4 when feeding CUDA, none when training on
    the CPU, where decoding would only take the training cores); in-memory tensors have none and
    need none. Batches are pinned for a fast copy when the device is CUDA. Each worker's torch
    generator is seeded by the loader from its ``generator`` (``base_seed + worker_id``), so
    seeded augmentation stays reproducible with workers.

    Example:
        >>> loader_options(object(), "cpu")
        {'num_workers': 0, 'pin_memory': False}
    """
    cuda = resolve_device(device).type == "cuda"
    workers = getattr(data, "num_workers", 0)
    if workers is None:
        workers = default_workers() if cuda else 0
    workers = workers if isinstance(workers, int) and not isinstance(workers, bool) and workers > 0 else 0
    return {"num_workers": workers, "pin_memory": cuda}


def default_workers() -> int:
    """DataLoader worker processes for decoding: half the CPUs this process may use, at most 4
    (the other half trains; several trials per machine share the rest).

    Example:
        >>> default_workers() >= 0
        True
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(4, cpus // 2)


def out_of_memory_reason(exc: BaseException) -> str:
    """The first line of a CUDA out-of-memory error, without the allocator's long advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". Of the allocated")[0].split(". GPU ")[0][:300]
