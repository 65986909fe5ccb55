"""The lowered graph as a QDQ ONNX file: what ONNX Runtime runs and OpenVINO reads."""

from __future__ import annotations

from pathlib import Path

import torch


def export_onnx(lowered: torch.nn.Module, example_input: torch.Tensor, folder: Path) -> Path:
    """Write ``folder/model.onnx`` from a lowered model, through the same ``model.pt2`` program
    a trial ships (:func:`autoshrink.trial.save_deployable`) and :func:`autoshrink.export.to_onnx`,
    whose predictions are checked against the program's on ``example_input``.

    An fp32 module takes the same path: a plain ONNX graph without Quantize/DequantizeLinear.
    """
    from autoshrink.export import to_onnx
    from autoshrink.trial import save_deployable  # lazy: trial sits above the runtimes

    pt2 = save_deployable(lowered, example_input, folder / "model.pt2")
    try:
        return to_onnx(pt2, folder / "model.onnx", example_input=example_input)
    finally:
        pt2.unlink(missing_ok=True)

