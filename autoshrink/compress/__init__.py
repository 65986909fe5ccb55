"""Turn (teacher, candidate) into a trainable compressed model, and lower it for deployment.

``apply`` is the search's own path: copy → structured prune → fake-quant preparation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from autoshrink.candidate import Candidate
from autoshrink.compress.prune import PruneReport, prune_
from autoshrink.compress.quantize import layer_bits, prepare_qat

__all__ = ["Compressed", "apply", "compress"]


@dataclass
class Compressed:
    """The result of compressing a copy of a model.

    Attributes:
        pruned: the pruned fp32 model (eager; what MACs and size are measured on).
        bits: weight bits per quantizable layer.
        prune_report: channel counts before/after, layers left unpruned and why.
    """

    pruned: nn.Module
    bits: dict[str, int]
    prune_report: PruneReport

    def trainable(self, example_input: torch.Tensor) -> nn.Module:
        """A fake-quant (QAT) copy of :attr:`pruned` at :attr:`bits`, ready for fine-tuning."""
        return prepare_qat(copy.deepcopy(self.pruned), _bits_candidate(self.bits), example_input)


def _bits_candidate(bits: dict[str, int]) -> Candidate:
    return Candidate(bits=bits, default_bits=32)


def compress(model: nn.Module, candidate: Candidate, example_input: torch.Tensor) -> Compressed:
    """Prune a deep copy of ``model`` by ``candidate`` and resolve its per-layer bits.

    The input model is never modified.
    """
    pruned = copy.deepcopy(model).eval()
    report = prune_(pruned, candidate, example_input)
    return Compressed(pruned=pruned, bits=layer_bits(pruned, candidate), prune_report=report)


def apply(model: nn.Module, candidate: Candidate, example_input: torch.Tensor) -> nn.Module:
    """Apply a found configuration to a model: the pruned, quantization-ready model.

    The same code path the search uses. Fine-tune the result (QAT), then
    :func:`autoshrink.compress.quantize.lower` and ``compile_cpu`` it for deployment.

    Args:
        model: your trained model (not modified).
        candidate: e.g. ``Candidate.from_json(open("best/candidate.json").read())``.
        example_input: one input batch.

    Returns:
        A trainable module: the pruned model with fake-quant at each layer's bits (an exported
        GraphModule), or the pruned eager model if every layer stays fp32.

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 9, 2))
        >>> small = apply(m, Candidate.uniform(bits=32, prune=0.5), torch.randn(1, 1, 5, 5))
        >>> small[0].out_channels
        4
    """
    return compress(model, candidate, example_input).trainable(example_input)
