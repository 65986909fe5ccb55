"""Static cost of a model: MACs (fvcore), bit-operations, parameters and bytes at true bit-widths."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from autoshrink import _batches

__all__ = ["NO_MACS_OPS", "Cost", "mmacs_text", "model_cost"]

#: Operators fvcore has no MAC formula for that do no multiply-accumulate work by the usual
#: convention (elementwise maths, activations, reductions): MACs count convolutions and matrix
#: products. Every *other* operator fvcore cannot count (scaled-dot-product attention, custom
#: ops, ...) is listed in ``Cost.uncounted_ops``, and the MACs are then a lower bound.
NO_MACS_OPS = frozenset(
    f"aten::{op}" for op in (
        "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "abs", "pow",
        "sqrt", "rsqrt", "exp", "log", "erf", "clamp", "clamp_", "clamp_min", "where",
        "softmax", "log_softmax", "gelu", "silu", "silu_", "sigmoid", "tanh", "hardswish",
        "hardswish_", "hardsigmoid", "hardtanh", "hardtanh_", "relu6", "leaky_relu", "elu",
        "mean", "sum", "max", "min", "amax", "amin", "argmax", "cumsum",
    )
)


@dataclass(frozen=True)
class Cost:
    """Static cost of one model under a per-layer bit plan.

    ``bops`` = Σ over layers of MACs × weight bits × activation bits (activations are 8-bit
    where the layer is quantized, 32-bit otherwise; MACs outside Conv/Linear count at 32×32).
    ``size_mb`` = bytes / 1e6 of what a deployment stores: each weight at its layer's bits (4-bit
    weights packed two per byte), one fp32 scale per output channel of a quantized layer, biases
    and every other parameter in fp32, BatchNorm counted as folded into the preceding layer's bias.
    ``uncounted_ops``: operator -> calls that fvcore could not count and that are not in
    :data:`NO_MACS_OPS`; when it is not empty, ``mmacs`` (and ``bops``) are *at least* that much.
    """

    mmacs: float
    bops: float
    params: int
    size_mb: float
    layer_macs: Mapping[str, float]
    uncounted_ops: Mapping[str, int] = field(default_factory=dict)

    @property
    def mmacs_is_lower_bound(self) -> bool:
        """True when an operator's MACs are missing from ``mmacs`` (see ``uncounted_ops``)."""
        return bool(self.uncounted_ops)


def mmacs_text(mmacs: float | None, uncounted_ops: Mapping[str, int] | None = None, fmt: str = ".2f") -> str:
    """MACs (millions) for people: ``"at least 12.34"`` when some operator went uncounted.

    Example:
        >>> mmacs_text(12.3456), mmacs_text(12.3456, {"aten::scaled_dot_product_attention": 2})
        ('12.35', 'at least 12.35')
    """
    if mmacs is None:
        return "-"
    text = format(float(mmacs), fmt)
    return f"at least {text}" if uncounted_ops else text


def model_cost(model: nn.Module, example_input: torch.Tensor, bits: Mapping[str, int]) -> Cost:
    """Measure MACs with fvcore and derive BOPs and size from the per-layer ``bits``.

    Args:
        model: an eager (not exported) fp32 model, pruned or not.
        example_input: batch-1 input; MACs are per sample.
        bits: layer name -> weight bits for quantizable layers (missing layers are fp32).

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 3))
        >>> model_cost(m, torch.randn(1, 4), {"0": 8}).mmacs
        1.2e-05
    """
    from fvcore.nn import FlopCountAnalysis

    x = _batches.first(example_input, 1)
    keys = list(x) if isinstance(x, Mapping) else None
    was_training = model.training
    model.eval()
    try:
        # fvcore traces positional tensors to a tensor: a dict input or a `.logits` output is adapted
        analysis = FlopCountAnalysis(_Positional(model, keys), tuple(x.values()) if keys else (x,))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        logging.getLogger("fvcore").setLevel(logging.ERROR)
        total = float(analysis.total())
        by_module = {k.removeprefix("model."): v for k, v in analysis.by_module().items()}
        # warnings are off (they would print per trial), so what fvcore skipped is recorded instead
        uncounted = {op: int(n) for op, n in sorted(analysis.unsupported_ops().items()) if op not in NO_MACS_OPS}
    finally:
        model.train(was_training)
    layer_macs = {name: float(by_module.get(name, 0.0)) for name in bits}
    covered = sum(layer_macs.values())
    bops = sum(
        macs * bits[name] * (8 if bits[name] < 32 else 32) for name, macs in layer_macs.items()
    )
    bops += max(total - covered, 0.0) * 32 * 32

    params = sum(p.numel() for p in model.parameters())
    nbytes = 0.0
    named = dict(model.named_modules())
    for mod_name, module in named.items():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nbytes += module.num_features * 4  # folds into a bias
            continue
        b = bits.get(mod_name, 32)
        for pname, p in own:
            if pname == "weight" and b < 32:
                nbytes += p.numel() * b / 8 + p.shape[0] * 4  # packed weights + per-channel scale
            else:
                nbytes += p.numel() * 4
    return Cost(
        mmacs=total / 1e6,
        bops=bops,
        params=int(params),
        size_mb=nbytes / 1e6,
        layer_macs=layer_macs,
        uncounted_ops=uncounted,
    )


class _Positional(nn.Module):
    """``model`` with positional tensor inputs (the keys of a dict input, in order) and a logits
    tensor output; its layers keep their names under ``model.``."""

    def __init__(self, model: nn.Module, keys: list[str] | None) -> None:
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        inputs = dict(zip(self.keys, args, strict=True)) if self.keys else args[0]
        return _batches.logits_of(_batches.call(self.model, inputs))
