"""Turn (teacher, candidate) into a trainable compressed model, and lower it for deployment.

``apply`` is the search's own path: copy → structured prune → fake-quant preparation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from autoshrink.candidate import Candidate
from autoshrink.compress.prune import PruneReport, prune_
from autoshrink.compress.quantize import (
    QATModel,
    layer_bits,
    prepare_qat,
    quantized_weights,
    unsupported_layers,
)

__all__ = ["Compressed", "QATModel", "apply", "compress"]


@dataclass
class Compressed:
    """The result of compressing a copy of a model.

    Attributes:
        pruned: the pruned fp32 model (eager; what MACs and size are measured on).
        bits: weight bits per quantizable layer, as they will really be: a layer that cannot be
            quantized is at 32 here whatever the candidate asked.
        prune_report: channel counts before/after, layers left unpruned and why.
        fp32_layers: layers the candidate asked to quantize that stay fp32, and why.
    """

    pruned: nn.Module
    bits: dict[str, int]
    prune_report: PruneReport
    fp32_layers: dict[str, str] = field(default_factory=dict)

    def trainable(
        self, example_input: torch.Tensor, calibration: Iterable[torch.Tensor] | None = None
    ) -> nn.Module:
        """A fake-quant (QAT) copy of :attr:`pruned` at :attr:`bits`, ready for fine-tuning.

        The prepared graph is checked against the plan: a layer the quantizer could not match
        is moved to :attr:`fp32_layers` and its :attr:`bits` corrected (see :meth:`verify`).
        """
        prepared = prepare_qat(
            copy.deepcopy(self.pruned), _bits_candidate(self.bits), example_input, calibration
        )
        self.verify(prepared)
        return prepared

    def keep_fp32(self, layers: Iterable[str], why: str) -> None:
        """Leave ``layers`` fp32 from now on (their int8 kernel did not compile, say), recording why."""
        for name in layers:
            if self.bits.get(name, 32) < 32:
                self.bits[name] = 32
                self.fp32_layers[name] = why

    def verify(self, prepared: nn.Module) -> bool:
        """Correct :attr:`bits` to what ``prepared`` (from :func:`prepare_qat` or ``prepare_ptq``
        at :attr:`bits`) really quantizes. Returns True if anything changed."""
        if not isinstance(prepared, torch.fx.GraphModule):
            return False
        actual = quantized_weights(prepared)
        changed = False
        for name, b in list(self.bits.items()):
            got = actual.get(name, 32)
            if b < 32 and got != b:
                self.fp32_layers[name] = (
                    "the quantizer found no weight to quantize for it in the exported graph "
                    "(a weight computed in forward, or a layer called functionally); left fp32"
                    if got == 32 else f"quantized at {got} bits, not {b}"
                )
                self.bits[name] = got
                changed = True
        return changed


def _bits_candidate(bits: dict[str, int]) -> Candidate:
    return Candidate(bits=bits, default_bits=32)


def compress(model: nn.Module, candidate: Candidate, example_input: torch.Tensor) -> Compressed:
    """Prune a deep copy of ``model`` by ``candidate`` and resolve its per-layer bits.

    The input model is never modified.
    """
    pruned = copy.deepcopy(model).eval()
    report = prune_(pruned, candidate, example_input)
    fp32 = unsupported_layers(pruned, candidate)
    bits = {n: 32 if n in fp32 else b for n, b in layer_bits(pruned, candidate).items()}
    return Compressed(pruned=pruned, bits=bits, prune_report=report, fp32_layers=fp32)


def apply(model: nn.Module, candidate: Candidate, example_input: torch.Tensor) -> nn.Module:
    """Apply a found configuration to a model: the pruned, quantization-ready model.

    The same code path the search uses. Fine-tune the result like any model (``.train()``,
    an optimizer, ``.eval()`` to evaluate: fake-quant ranges freeze in eval), then lower it with
    :func:`autoshrink.compress.quantize.lower` and ``compile_cpu`` it for deployment.
    What cannot be pruned or quantized is left as it was (see :func:`compress` for the report).

    Args:
        model: your trained model (not modified).
        candidate: e.g. ``Candidate.from_json(open("best/candidate.json").read())``.
        example_input: one input batch.

    Returns:
        A trainable module, in train mode: a :class:`QATModel` (the pruned model with fake-quant
        at each layer's bits) or, if every layer stays fp32, the pruned eager model.

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 9, 2))
        >>> small = apply(m, Candidate.uniform(bits=32, prune=0.5), torch.randn(1, 1, 5, 5))
        >>> small[0].out_channels
        4
        >>> qat = apply(m, Candidate.uniform(bits=8), torch.randn(1, 1, 5, 5))
        >>> qat.eval().training, qat.train().training
        (False, True)
    """
    trainable = compress(model, candidate, example_input).trainable(example_input)
    if isinstance(trainable, torch.fx.GraphModule):
        return QATModel(trainable)
    return trainable
