"""Running a model once to see what it does: hooks registered for one forward pass, then removed.

Several parts need one look inside a forward pass (which layer runs last, what feeds each layer,
which BatchNorm reads which conv's output); :func:`run_with_hooks` is that pass, done one way:
eval mode (restored afterwards), no autograd, and every hook removed even when the model raises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from autoshrink import _batches

__all__ = ["run_with_hooks"]


def run_with_hooks(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    forward: Mapping[nn.Module, Callable[..., Any]] | None = None,
    pre: Mapping[nn.Module, Callable[..., Any]] | None = None,
) -> Any:
    """Call ``model(example_input)`` once with hooks on some of its modules.

    Args:
        model: the model; left in the train/eval mode it was in.
        example_input: the input to run.
        forward: module -> ``hook(module, inputs, output)``, run after the module's forward.
        pre: module -> ``hook(module, inputs)``, run before it.

    Returns:
        The model's output.

    Example:
        >>> seen = []
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
        >>> _ = run_with_hooks(net, torch.randn(1, 3), pre={net[0]: lambda m, inp: seen.append(inp[0].shape)})
        >>> seen
        [torch.Size([1, 3])]
    """
    handles = [m.register_forward_hook(h) for m, h in (forward or {}).items()]
    handles += [m.register_forward_pre_hook(h) for m, h in (pre or {}).items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _batches.call(model, example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
