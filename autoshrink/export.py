"""Use an exported model: load it compiled for int8 CPU, or convert it to ONNX.

A trial's deployable model is a ``torch.export`` program (``model.pt2``) holding the lowered
PT2E graph: ``quantized_decomposed`` quantize/dequantize ops around fp32 convs and linears, which
Inductor fuses into oneDNN int8 kernels. Two ways to use it:

- :func:`load_deployable`: torch alone, compiled exactly as the search timed it;
- :func:`to_onnx`: a QDQ ONNX model (``QuantizeLinear`` / ``DequantizeLinear`` around ``Conv`` /
  ``Gemm``), the form ONNX Runtime and TensorRT quantize from. 4-bit layers are int8 weights
  restricted to [-8, 7]; in ONNX they stay int8 (their values already fit 4 bits).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from autoshrink.errors import AutoshrinkError

__all__ = ["ExportError", "agreement", "load_deployable", "load_program", "to_onnx"]


class ExportError(AutoshrinkError, ValueError):
    """A model file that cannot be loaded or converted (the message says what and why)."""


def _register_quantized_ops() -> None:
    # The lowered graph calls torch.ops.quantized_decomposed.*, which torch defines in this
    # module but only registers when it is imported; torch.export.load fails without them.
    import torch.ao.quantization.fx._decomposed  # noqa: F401


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """Load ``model.pt2`` as a :class:`torch.export.ExportedProgram` (int8 ops registered first).

    Raises:
        FileNotFoundError: no such file.
        ExportError: the file is not a ``torch.export`` program.

    Example:
        >>> ep = load_program("runs/demo/best/model.pt2")        # doctest: +SKIP
        >>> ep.module()(x)                                          # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file (export a trial first: autoshrink export)")
    _register_quantized_ops()
    try:
        return torch.export.load(str(path))
    except (RuntimeError, ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise ExportError(f"{path}: not a loadable torch.export program ({exc})") from exc


def load_deployable(path: str | os.PathLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model in ``model.pt2``, compiled for CPU inference with int8 kernels.

    The same compilation the search times: Inductor with weight freezing, so that the
    quantize/dequantize patterns become oneDNN int8 kernels (uncompiled, PT2E runs slow
    reference kernels). The first call compiles (seconds); each new batch size compiles again.

    Args:
        path: a ``model.pt2`` written by ``autoshrink export`` / ``SearchResult.export``.

    Returns:
        A callable ``model(x) -> logits``; call it under ``torch.no_grad()``.

    Raises:
        FileNotFoundError, ExportError: as :func:`load_program`.

    Example:
        >>> model = load_deployable("runs/demo/best/model.pt2")   # doctest: +SKIP
        >>> with torch.no_grad():                                   # doctest: +SKIP
        ...     logits = model(x)
    """
    from autoshrink.compress.quantize import compile_cpu

    return compile_cpu(load_program(path).module())


# quantized_decomposed ops that ONNX expresses exactly (QuantizeLinear / DequantizeLinear)
_QDQ_OPS = frozenset({
    "quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel",
})
_DTYPE_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def _check_onnx_supported(ep: torch.export.ExportedProgram) -> None:
    """Refuse graphs that ONNX would convert with different results, naming the node."""
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        namespace = getattr(getattr(target, "_schema", None), "name", "").split("::")[0]
        if namespace != "quantized_decomposed":
            continue
        op = target._schema.name.split("::")[1]
        if op not in _QDQ_OPS:
            raise ExportError(
                f"cannot convert to ONNX: node {node.name!r} is {op}, which has no exact ONNX "
                f"equivalent (supported: {sorted(_QDQ_OPS)}); use model.pt2 with torch instead"
            )
        if op == "quantize_per_tensor":
            # ONNX QuantizeLinear saturates to the whole dtype; PyTorch clamps to quant_min/max.
            names = ("input", "scale", "zero_point", "quant_min", "quant_max", "dtype")
            given = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
            qmin, qmax, dtype = given["quant_min"], given["quant_max"], given["dtype"]
            if _DTYPE_RANGE.get(dtype) != (qmin, qmax):
                raise ExportError(
                    f"cannot convert to ONNX: node {node.name!r} quantizes activations to "
                    f"[{qmin}, {qmax}] in {dtype}, but ONNX QuantizeLinear only saturates to the "
                    f"full {dtype} range {_DTYPE_RANGE.get(dtype)}; use model.pt2 with torch instead"
                )


def to_onnx(
    pt2_path: str | os.PathLike,
    onnx_path: str | os.PathLike,
    example_input: torch.Tensor | None = None,
) -> Path:
    """Convert ``model.pt2`` to a QDQ ONNX model (``torch.onnx.export(..., dynamo=True)``).

    The quantized ops become ``QuantizeLinear`` / ``DequantizeLinear`` (opset 18), the batch
    dimension stays dynamic, and the file passes ``onnx.checker``. Ops without an exact ONNX
    equivalent are refused rather than approximated.

    Args:
        pt2_path: a ``model.pt2`` written by ``autoshrink export``.
        onnx_path: the ``.onnx`` file to write (to a temporary name, then renamed).
        example_input: if given, the ONNX model is run on it (ONNX Runtime when installed, else
            ``onnx.reference``) and its predicted classes are compared with the PT2 program's.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: no ``pt2_path``.
        ExportError: an op ONNX cannot express exactly, a failed conversion, or outputs that
            disagree with the PT2 program on ``example_input``.
        ImportError: ``onnx`` / ``onnxscript`` are not installed (``pip install autoshrink[onnx]``).

    Example:
        >>> to_onnx("runs/demo/best/model.pt2", "model.onnx")       # doctest: +SKIP
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter's op library)
    except ImportError as exc:
        raise ImportError(
            f"ONNX export needs onnx and onnxscript ({exc.name} is missing): "
            "pip install 'autoshrink[onnx]'"
        ) from exc
    ep = load_program(pt2_path)
    _check_onnx_supported(ep)
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = onnx_path.with_name(f".{onnx_path.name}.tmp{os.getpid()}")
    try:
        try:
            # An ExportedProgram is converted as is: its dynamic batch dimension is kept.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
                program = torch.onnx.export(ep, dynamo=True, verbose=False)
        except Exception as exc:  # the exporter raises many private error types
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ExportError(f"cannot convert {pt2_path} to ONNX: {first[:500]}") from exc
        program.save(str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        if example_input is not None:
            _compare(ep, tmp, example_input)
        os.replace(tmp, onnx_path)
    finally:
        tmp.unlink(missing_ok=True)
    return onnx_path


def agreement(expected, got) -> float:
    """The share of rows of two logit arrays ``[N, classes]`` that predict the same class, where a
    near tie counts as agreeing: int8 kernels of two runtimes round at quantize steps differently,
    which may flip two classes the reference puts closer than the rows' own difference. A flip
    counts as a near tie only when that row's margin in ``expected`` is under twice the row's
    largest absolute difference and that difference is under 5 % of ``expected``'s range (a
    conversion that computes something else differs by far more)."""
    import numpy as np

    expected, got = np.asarray(expected, dtype=np.float64), np.asarray(got, dtype=np.float64)
    want, have = expected.argmax(-1), got.argmax(-1)
    rows = np.arange(len(expected))
    margin = expected[rows, want] - expected[rows, have]
    diff = np.abs(got - expected).max(-1)
    spread = float(np.ptp(expected)) or 1.0
    near_tie = (margin <= 2 * diff) & (diff <= 0.05 * spread)
    return float(np.mean((want == have) | near_tie))


def _compare(ep: torch.export.ExportedProgram, onnx_file: Path, x: torch.Tensor) -> None:
    """Predicted classes of the ONNX model and the PT2 program agree on ``x``."""
    import numpy as np

    with torch.no_grad():
        expected = ep.module()(x).numpy()
    feed = x.detach().cpu().numpy()
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        got = session.run(None, {name: feed})[0]
    except ImportError:
        import onnx
        from onnx.reference import ReferenceEvaluator

        model = onnx.load(str(onnx_file))
        got = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: feed})[0]
    agree = agreement(expected, got)
    if agree < 0.99:
        raise ExportError(
            f"the ONNX model predicts differently from the PT2 program on the example input: "
            f"{agree:.1%} of {len(feed)} predictions agree (max |difference| "
            f"{float(np.max(np.abs(got - expected))):.3g})"
        )
