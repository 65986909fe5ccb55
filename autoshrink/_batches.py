"""One adapter between autoshrink and the shapes models and data loaders come in.

A model's input is a tensor (an image batch) or a mapping of tensors (a Hugging Face text
batch: ``input_ids``, ``attention_mask``, ...); its output is a logits tensor, an object with
``.logits`` (a ``transformers`` ``ModelOutput``), a mapping with ``"logits"``, or a tuple whose
first element is the logits. A batch from a loader is ``(inputs, targets[, ...])`` or a mapping
with the inputs and a ``labels`` (or ``label``) entry. Every place that calls a model or reads a
batch goes through these functions, so each shape is handled once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "Inputs",
    "LABEL_KEYS",
    "batch_of_two",
    "batch_size",
    "call",
    "export_args",
    "first",
    "logits_of",
    "pad_to",
    "split_batch",
]

#: A model input: one tensor, or keyword tensors (``model(**inputs)``).
Inputs = torch.Tensor | Mapping[str, torch.Tensor]

#: Keys of a mapping batch that hold the targets, not model inputs (Hugging Face's names).
LABEL_KEYS = ("labels", "label")


def call(model: Any, inputs: Inputs) -> Any:
    """``model(inputs)`` for a tensor, ``model(**inputs)`` for a mapping of tensors."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor in a model's output.

    Raises:
        TypeError: an output with no logits in any of the accepted shapes.

    Example:
        >>> logits_of((torch.zeros(2, 3), "aux")).shape
        torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"the model returned a {type(output).__name__}; expected a logits tensor, an object with "
        "`.logits`, a dict with 'logits', or a tuple whose first element is the logits"
    )


def split_batch(batch: Any) -> tuple[Inputs, torch.Tensor]:
    """``(inputs, targets)`` of one loader batch.

    Raises:
        TypeError: a batch in none of the accepted shapes.

    Example:
        >>> x, y = split_batch({"input_ids": torch.ones(2, 4, dtype=torch.long),
        ...                     "labels": torch.tensor([0, 1])})
        >>> sorted(x), y.tolist()
        (['input_ids'], [0, 1])
    """
    if isinstance(batch, Mapping):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        if key is None:
            raise TypeError(f"a dict batch needs a 'labels' entry with the targets; it has {sorted(batch)}")
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}, batch[key]
    if isinstance(batch, tuple | list) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"a batch must be (inputs, targets) or a dict with 'labels'; got a {type(batch).__name__}"
    )


def to(inputs: Inputs, device: Any, *, non_blocking: bool = False) -> Inputs:
    """``inputs`` moved to ``device`` (each tensor of a dict batch)."""
    if isinstance(inputs, Mapping):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=non_blocking)


def batch_size(inputs: Inputs) -> int:
    """Rows in a tensor input, or in the first tensor of a mapping."""
    if isinstance(inputs, Mapping):
        return len(next(iter(inputs.values())))
    return len(inputs)


def first(inputs: Inputs, n: int) -> Inputs:
    """The first ``n`` rows of every tensor, made contiguous."""
    if isinstance(inputs, Mapping):
        return {k: v[:n].contiguous() for k, v in inputs.items()}
    return inputs[:n].contiguous()


def batch_of_two(inputs: Inputs) -> Inputs:
    """The first row repeated twice: exporting with a batch of 1 specialises the batch to 1."""
    def two(t: torch.Tensor) -> torch.Tensor:
        return t[:1].expand(2, *t.shape[1:]).contiguous()

    if isinstance(inputs, Mapping):
        return {k: two(v) for k, v in inputs.items()}
    return two(inputs)


def pad_to(inputs: Inputs, rows: int) -> Inputs:
    """Zero rows appended so every tensor has ``rows`` rows (for one compiled shape)."""
    def pad(t: torch.Tensor) -> torch.Tensor:
        missing = rows - len(t)
        return t if missing <= 0 else torch.cat([t, t.new_zeros((missing, *t.shape[1:]))])

    if isinstance(inputs, Mapping):
        return {k: pad(v) for k, v in inputs.items()}
    return pad(inputs)


def export_args(inputs: Inputs, batch: Any) -> tuple[tuple, dict, Any]:
    """``(args, kwargs, dynamic_shapes)`` for ``torch.export.export`` with dimension 0 of every
    tensor marked ``batch`` (a ``torch.export.Dim``)."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs), {k: {0: batch} for k in inputs}
    return (inputs,), {}, ({0: batch},)
