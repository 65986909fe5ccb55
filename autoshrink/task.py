"""`Task`: what a search compresses (the teacher) and how it is judged (data and metric)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from autoshrink import _batches
from autoshrink.errors import AutoshrinkError

__all__ = ["Task", "TaskError", "top1_accuracy"]

Metric = Callable[[torch.Tensor, torch.Tensor], float]


class TaskError(AutoshrinkError, ValueError):
    """A task's model, data or example input cannot be used as given."""


def top1_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in percent.

    Example:
        >>> top1_accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        50.0
    """
    return 100.0 * (logits.argmax(dim=1) == targets).float().mean().item()


@dataclass
class Task:
    """A teacher model with its data.

    Args:
        model: the trained model to compress (the teacher). It is never modified.
        train_data: a Dataset or DataLoader of ``(input, target)`` for the KD fine-tune.
        val_data: a Dataset or DataLoader of ``(input, target)`` for accuracy; never trained on.
            Early stopping and the choice of the best trial use it.
        example_input: one input batch (batch size 1 is what latency is measured at).
        metric: ``metric(logits, targets) -> float`` on the whole validation set, higher is
            better; defaults to top-1 accuracy in percent.
        name: shown in reports.
        teacher_accuracy: the teacher's metric on ``val_data`` if known (computed otherwise).
        description: how the data was built, for the run report.
        test_data: optional Dataset or DataLoader of ``(input, target)`` never used for any
            choice: scored once, for the front and the chosen model (``evaluate(split="test")``).
            Without it, the reported accuracy is also the selection criterion.

    Raises:
        TaskError: if the example input does not run through the model, or data is empty.

    Example:
        >>> import torch.nn as nn
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
        >>> t = Task(model=nn.Linear(4, 2), train_data=data, val_data=data,
        ...          example_input=torch.randn(1, 4))
        >>> t.num_classes
        2
    """

    model: nn.Module
    train_data: Dataset | DataLoader
    val_data: Dataset | DataLoader
    example_input: torch.Tensor
    metric: Metric | None = None
    name: str = "custom"
    teacher_accuracy: float | None = None
    description: str = ""
    test_data: Dataset | DataLoader | None = None
    num_classes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TaskError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        x = self.example_input
        if not (isinstance(x, torch.Tensor) or (
                isinstance(x, Mapping) and x and all(isinstance(v, torch.Tensor) for v in x.values()))):
            raise TaskError(
                "example_input must be a torch.Tensor batch or a dict of tensors (model(**inputs)), "
                f"got {type(self.example_input).__name__}"
            )
        splits = [("train_data", self.train_data), ("val_data", self.val_data)]
        if self.test_data is not None:
            splits.append(("test_data", self.test_data))
        for label, data in splits:
            if not isinstance(data, (Dataset, DataLoader)):
                raise TaskError(f"{label} must be a torch Dataset or DataLoader, got {type(data).__name__}")
            try:
                n = len(data)
            except TypeError:
                n = None
            if n == 0:
                raise TaskError(f"{label} is empty")
        self.model.eval()
        try:
            with torch.no_grad():
                out = _batches.call(self.model, self.example_input)
        except Exception as exc:  # the user's model: any error means the input does not fit
            raise TaskError(
                f"the model does not accept example_input of shape {_shapes(self.example_input)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        try:
            out = _batches.logits_of(out)
        except TypeError as exc:
            raise TaskError(str(exc)) from None
        if out.dim() != 2:
            raise TaskError(
                "the model must return a (batch, classes) tensor of logits; got "
                f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
            )
        self.num_classes = int(out.shape[1])

    # -- data ---------------------------------------------------------------------------------------
    def loader(self, which: str, batch_size: int, *, shuffle: bool, seed: int = 0,
               device: str | torch.device = "cpu") -> DataLoader:
        """A loader over the train, val or test data (a user's own DataLoader is returned as
        given); worker processes and pinned memory as :func:`autoshrink.device.loader_options` says."""
        from autoshrink.device import loader_options

        data = self._split(which)
        if isinstance(data, DataLoader):
            return data
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=False,
                          **loader_options(data, device))

    def _split(self, which: str) -> Dataset | DataLoader:
        if which == "test":
            if self.test_data is None:
                raise TaskError(
                    f"task {self.name!r} has no test data; pass test_data= to Task (a Dataset or "
                    "DataLoader never used for selection) to score the test split"
                )
            return self.test_data
        if which not in ("train", "val"):
            raise TaskError(f"split must be one of 'train', 'val', 'test', got {which!r}")
        return self.train_data if which == "train" else self.val_data

    def calibration_batches(self, n: int = 4, batch_size: int = 32) -> Iterator[torch.Tensor]:
        """A few training inputs for PTQ observers (deterministic)."""
        for i, batch in enumerate(self.loader("train", batch_size, shuffle=True, seed=1234)):
            if i >= n:
                return
            yield _batches.split_batch(batch)[0]

    def evaluate(
        self,
        model: Callable,
        *,
        batch_size: int = 256,
        limit: int | None = None,
        fixed_batch: bool = False,
        guard: Callable[[], AbstractContextManager] | None = None,
        split: str = "val",
        device: str | torch.device = "cpu",
    ) -> tuple[float, float | None]:
        """The metric of ``model`` on the validation data (or ``split``), with its standard error
        when the metric is the default top-1 accuracy (binomial: sqrt(p(1-p)/n), in points).

        Args:
            model: any callable from inputs to logits (eager, exported, or compiled).
            limit: use only the first ``limit`` validation samples (for intermediate reports).
            fixed_batch: pad the last batch to ``batch_size`` so a compiled model sees one shape
                (one compilation instead of two); padded rows are dropped before scoring.
            guard: a context-manager factory held around each batch (the machine lock's shared
                side during a search).
            split: ``"val"`` (default) or ``"test"`` (only for the front and the chosen model,
                once: choosing on it would make it a second validation set).

        Raises:
            TaskError: ``split="test"`` on a task without ``test_data``, an unknown split, or a
                metric that returns NaN or infinity.
            device: where to run (``"cpu"``, ``"cuda"``, ...; see
                :func:`autoshrink.device.resolve_device`). Batches are moved there; an
                ``nn.Module`` is moved there for the evaluation and back to where it was after.
                A compiled CPU model (the lowered int8 one) is evaluated with the default CPU.
        """
        from autoshrink.device import model_device, resolve_device

        dev = resolve_device(device)
        hold = guard or contextlib.nullcontext
        home = model_device(model) if isinstance(model, nn.Module) and dev.type != "cpu" else None
        if home is not None:
            model.to(dev)
        logits, targets = [], []
        seen = 0
        try:
            with torch.no_grad():
                for batch in self.loader(split, batch_size, shuffle=False, device=dev):
                    x, y = _batches.split_batch(batch)
                    if limit is not None and seen >= limit:
                        break
                    if limit is not None:
                        x, y = _batches.first(x, limit - seen), y[: limit - seen]
                    n = _batches.batch_size(x)
                    if fixed_batch and n < batch_size:
                        x = _batches.pad_to(x, batch_size)
                    if dev.type != "cpu":
                        x = _batches.to(x, dev, non_blocking=True)
                    with hold():
                        logits.append(_batches.logits_of(_batches.call(model, x))[:n].float().cpu())
                    targets.append(y)
                    seen += len(y)
        finally:
            if home is not None:
                model.to(home)
        out, tgt = torch.cat(logits), torch.cat(targets)
        if self.metric is None:
            acc = top1_accuracy(out, tgt)
            se = 100.0 * math.sqrt(max(acc / 100 * (1 - acc / 100), 0.0) / len(tgt))
            return acc, se
        value = float(self.metric(out, tgt))
        if not math.isfinite(value):
            # told to the sampler, a NaN would become an accuracy of 0 or a crash: stop it here
            name = getattr(self.metric, "__name__", type(self.metric).__name__)
            raise TaskError(
                f"task {self.name!r}: the metric {name} returned {value} on {len(tgt)} {split} samples "
                f"(logits finite: {bool(torch.isfinite(out).all())}); a metric must return a finite number"
            )
        return value, None


def _shapes(x) -> object:
    if isinstance(x, Mapping):
        return {k: tuple(v.shape) for k, v in x.items()}
    return tuple(x.shape)
