"""Knowledge distillation: the short fine-tune that recovers a compressed student's accuracy.

Loss (Hinton et al., 2015): ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``
with the teacher frozen. The T² factor keeps the gradient scale of the soft term independent of T.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from autoshrink import _batches
from autoshrink._files import atomic_path
from autoshrink.candidate import Candidate
from autoshrink.compress.quantize import set_eval, set_train
from autoshrink.device import (
    TrialOOM,
    autocast,
    describe_device,
    deterministic,
    has_fake_quant,
    loader_options,
    model_device,
    out_of_memory_reason,
    resolve_device,
)
from autoshrink.task import Task

__all__ = ["FinetuneResult", "StopTrial", "TrialOOM", "finetune", "kd_loss", "teacher_logits"]

# gradient-norm clip for the fine-tune: catches spikes, never touches a normal step
GRAD_CLIP = 10.0


class StopTrial(Exception):
    """Raised by a ``report`` callback to stop an unpromising fine-tune early."""


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Distillation loss (batch mean).

    Example:
        >>> s, t = torch.zeros(2, 3), torch.zeros(2, 3)
        >>> round(kd_loss(s, t, torch.tensor([0, 1]), 4.0, 1.0).item(), 6)  # identical -> KL = 0
        0.0
    """
    T = float(temperature)
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(student_logits, targets)
    return alpha * T * T * kl + (1.0 - alpha) * ce


class _Indexed(Dataset):
    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.data[i]
        return x, y, i


def teacher_logits(
    teacher: nn.Module, data: Dataset, batch_size: int = 256, cache: bool = True,
    device: str | torch.device = "cpu",
) -> torch.Tensor | None:
    """The teacher's logits for every training sample, when the training data is fixed
    (a ``TensorDataset``): KD then costs no teacher forward per step. Returns None for
    datasets that may change between reads (random augmentation), where the teacher runs online.

    With ``cache``, the logits are kept in the cache folder under a hash of the teacher's
    weights and the data, so later searches on the same task skip the pass.

    ``device`` runs the pass there (on a copy of the teacher; fp32, so the cached logits do not
    depend on where they were computed beyond rounding); the logits are returned on the CPU.
    """
    if not isinstance(data, TensorDataset):
        return None
    path = _logits_path(teacher, data) if cache else None
    if path is not None and path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache file is recomputed, never trusted
            path.unlink(missing_ok=True)
    dev = resolve_device(device)
    teacher = teacher.eval() if dev.type == "cpu" else copy.deepcopy(teacher).to(dev).eval()
    out = []
    with torch.no_grad():
        for (x, *_rest) in DataLoader(data, batch_size=batch_size, shuffle=False,
                                      **loader_options(data, dev)):
            out.append(_batches.logits_of(teacher(x.to(dev, non_blocking=True))).float().cpu())
    logits = torch.cat(out)
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save(logits, tmp)
    return logits


def _logits_path(teacher: nn.Module, data: TensorDataset):
    from autoshrink._env import cache_dir

    h = hashlib.sha1()
    for name, t in list(teacher.state_dict().items()) + [(str(i), t) for i, t in enumerate(data.tensors)]:
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return cache_dir() / "logits" / f"{h.hexdigest()[:20]}.pt"


@dataclass
class FinetuneResult:
    steps: int = 0
    seconds: float = 0.0
    final_loss: float = float("nan")
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, val accuracy)
    device: str = "cpu"  # where it ran, for the report: "cpu" or "cuda:0 (NVIDIA ...)"


def finetune(
    student: nn.Module,
    task: Task,
    candidate: Candidate,
    *,
    cached_logits: torch.Tensor | None = None,
    report: Callable[[int, float], None] | None = None,
    eval_every: int = 0,
    eval_limit: int = 1000,
    seed: int = 0,
    guard: Callable[[], AbstractContextManager] | None = None,
    device: str | torch.device = "cpu",
) -> FinetuneResult:
    """KD fine-tune ``student`` in place (a plain model or a fake-quant prepared one).

    Args:
        student: the compressed model (from :func:`autoshrink.compress.apply`).
        task: gives the teacher (``task.model``) and the training data.
        candidate: ``finetune_steps``, ``lr``, ``batch_size``, ``kd_temperature``, ``kd_alpha``.
        cached_logits: teacher logits per training sample (:func:`teacher_logits`), or None.
        report: called as ``report(step, accuracy)`` every ``eval_every`` steps with accuracy on
            the first ``eval_limit`` validation samples; it may raise :class:`StopTrial`.
        seed: seeds data order.
        guard: a context-manager factory held around each step and each evaluation (the
            machine lock's shared side, so latency timing elsewhere can cut in between steps).
        device: where to train (:func:`autoshrink.device.resolve_device`). The student is moved
            there and back to where it was when the fine-tune ends, however it ends (lowering
            and timing stay on the CPU); the teacher runs as a copy there. On CUDA the teacher
            forward (and a student without fake-quant) run under bf16 autocast, with
            deterministic kernels (:func:`autoshrink.device.deterministic`).

    Raises:
        FloatingPointError: if the loss becomes NaN or infinite.
        StopTrial: when ``report`` asks to stop.
        TrialOOM: the device ran out of memory (the reason and the step in the message).
    """
    dev = resolve_device(device)
    result = FinetuneResult(device=describe_device(dev))
    steps = candidate.finetune_steps
    if steps == 0:
        return result
    torch.manual_seed(seed)
    home = model_device(student)
    progress = {"step": 0}
    oom = None
    try:
        with deterministic(dev):
            _finetune(student, task, candidate, result, progress, dev, cached_logits=cached_logits,
                      report=report, eval_every=eval_every, eval_limit=eval_limit, seed=seed, guard=guard)
    except torch.OutOfMemoryError as exc:  # one trial's problem: the caller records it as failed
        oom = out_of_memory_reason(exc)
    finally:
        if dev.type != "cpu":
            student.to(home)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if oom is not None:  # raised outside the handler, so the failed step's tensors are freed first
        raise TrialOOM(str(dev), progress["step"], candidate.batch_size, oom)
    return result


def _finetune(
    student: nn.Module,
    task: Task,
    candidate: Candidate,
    result: FinetuneResult,
    progress: dict[str, int],
    dev: torch.device,
    *,
    cached_logits: torch.Tensor | None,
    report: Callable[[int, float], None] | None,
    eval_every: int,
    eval_limit: int,
    seed: int,
    guard: Callable[[], AbstractContextManager] | None,
) -> None:
    steps = candidate.finetune_steps
    on_device = dev.type != "cpu"
    teacher = task.model.eval()
    if on_device:
        teacher = copy.deepcopy(teacher).to(dev).eval()  # task.model stays where it is
        student.to(dev)
    student_amp = not has_fake_quant(student)  # fake-quant fails under autocast: fp32 (module docstring)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=candidate.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    use_cache = cached_logits is not None and not isinstance(task.train_data, DataLoader)
    data = _Indexed(task.train_data) if use_cache else task.train_data
    if isinstance(data, DataLoader):
        loader_factory = lambda epoch: data  # noqa: E731 - the user's own loader, as given
    else:
        def loader_factory(epoch: int) -> DataLoader:
            gen = torch.Generator().manual_seed(seed * 1000 + epoch)
            return DataLoader(data, batch_size=candidate.batch_size, shuffle=True, generator=gen,
                              drop_last=len(data) > candidate.batch_size,
                              **loader_options(task.train_data, dev))

    hold = guard or contextlib.nullcontext
    start = time.perf_counter()
    set_train(student)
    step, epoch = 0, 0
    loss_value = float("nan")
    while step < steps:
        for batch in loader_factory(epoch):
            if use_cache:
                x, y, idx = batch
                t_logits = cached_logits[idx]
            else:
                x, y = _batches.split_batch(batch)
            if on_device:
                x, y = _batches.to(x, dev, non_blocking=True), y.to(dev, non_blocking=True)
            if not use_cache:
                with torch.no_grad(), autocast(dev):
                    t_logits = _batches.logits_of(_batches.call(teacher, x)).float()
            elif on_device:
                t_logits = t_logits.to(dev, non_blocking=True)
            with hold():
                with autocast(dev, enabled=student_amp):
                    s_logits = _batches.logits_of(_batches.call(student, x))
                loss = kd_loss(s_logits.float(), t_logits, y, candidate.kd_temperature, candidate.kd_alpha)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"fine-tune loss became {loss_value} at step {step} (lr={candidate.lr:g}); "
                        "try a lower learning rate"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # a spike (coarse 4-bit fake-quant next to fp32 layers, a high T) must not throw
                # the short fine-tune off: normal steps stay far below this norm
                torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                opt.step()
                sched.step()
            step += 1
            progress["step"] = step
            if report is not None and eval_every and step % eval_every == 0 and step < steps:
                set_eval(student)
                acc, _ = task.evaluate(student, limit=eval_limit, guard=guard, device=dev)
                result.history.append((step, acc))
                set_train(student)
                report(step, acc)  # may raise StopTrial
            if step >= steps:
                break
        epoch += 1
    set_eval(student)
    result.steps = step
    result.seconds = time.perf_counter() - start
    result.final_loss = loss_value
