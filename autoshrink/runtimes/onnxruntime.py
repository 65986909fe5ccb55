"""ONNX Runtime: the QDQ ONNX model on the CPU execution provider, graph optimisations on.

ONNX Runtime fuses ``DequantizeLinear -> Conv/Gemm -> QuantizeLinear`` into int8 kernels
(``QLinearConv``, ``QGemm``); a quantized layer whose output is not re-quantized (the PT2E x86
graph leaves the last conv before pooling and the classifier's output in float) runs as a
float kernel on dequantized weights. :meth:`OrtDeployable.kernels` says which layer got which.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from autoshrink.measure.fresh import ort_session_options as session_options
from autoshrink.runtimes._base import Deployable, Runtime, check_threads, layer_of_onnx_nodes, require
from autoshrink.runtimes._onnx import export_onnx

__all__ = ["INT8_KERNELS", "OnnxRuntime", "OrtDeployable", "session_options"]

# ONNX Runtime's integer kernels for convs and matrix products (after its QDQ fusions)
INT8_KERNELS = frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                          "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearConvTranspose"})
FLOAT_KERNELS = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "ConvTranspose",
                           "NhwcFusedConv"})


class OrtDeployable(Deployable):
    """An ``onnxruntime.InferenceSession`` on ``model.onnx``."""

    def __init__(self, path: Path, info, workdir=None) -> None:
        import onnxruntime as ort

        super().__init__(info, [path], workdir)
        self.path = path
        self.session = ort.InferenceSession(str(path), session_options(info.threads),
                                            providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: x})[0]

    def kernels(self) -> dict[str, str]:
        """Each conv/linear layer's kernel precision in the session ONNX Runtime really runs.

        Read from the optimised graph ONNX Runtime writes (``optimized_model_filepath``, before
        the layout passes, which change no kernel's precision): a layer
        is ``"int8"`` when its weight feeds an integer kernel (``QLinearConv``, ``QGemm``, ...),
        ``"fp32"`` when it feeds a float one (``Conv``, ``FusedConv``, ``Gemm``, ...) — including a
        quantized layer whose int8 weight is only dequantized back to float.
        """
        import onnx
        import onnxruntime as ort

        _, by_weight = layer_of_onnx_nodes(onnx.load(str(self.path), load_external_data=False))
        with tempfile.TemporaryDirectory(prefix="autoshrink-ort-opt-") as tmp:
            opt = Path(tmp) / "optimized.onnx"
            ort.InferenceSession(str(self.path), session_options(self.info.threads, opt, layout=False),
                                 providers=["CPUExecutionProvider"])
            graph = onnx.load(str(opt), load_external_data=False).graph
        producers = {out: node for node in graph.node for out in node.output}
        out: dict[str, str] = {}
        for node in graph.node:
            if node.op_type in INT8_KERNELS:
                precision = "int8"
            elif node.op_type in FLOAT_KERNELS:
                precision = "fp32"
            else:
                continue
            layer = None
            for name in node.input:
                producer = producers.get(name)
                if producer is not None and producer.op_type == "DequantizeLinear":
                    name = producer.input[0]
                if name in by_weight:
                    layer = by_weight[name]
                    break
            out[layer or f"<{node.op_type} {node.name}>"] = precision
        return out


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    extra = "onnxruntime"
    artifact = "model.onnx"

    def __init__(self) -> None:
        require(self.name, self.extra, ("onnxruntime", "onnx", "onnxscript"))

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def build(self, lowered: torch.nn.Module, example_input: torch.Tensor, *, threads: int = 1) -> Deployable:
        check_threads(threads)
        workdir = tempfile.TemporaryDirectory(prefix="autoshrink-ort-")
        path = export_onnx(lowered, example_input, Path(workdir.name))
        return OrtDeployable(path, self.info(threads), workdir)

    def load(self, folder: str | os.PathLike, *, threads: int = 1) -> Deployable:
        check_threads(threads)
        return OrtDeployable(self._artifact_in(folder), self.info(threads))

    def usage_snippet(self, folder: str | os.PathLike, threads: int = 1) -> str:
        path = Path(folder) / self.artifact
        return (
            "import numpy as np\n"
            "import onnxruntime as ort\n"
            "so = ort.SessionOptions()\n"
            "so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL\n"
            f"so.intra_op_num_threads, so.inter_op_num_threads = {threads}, 1  # as the search timed it\n"
            "so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL\n"
            f"session = ort.InferenceSession({str(path)!r}, so, providers=['CPUExecutionProvider'])\n"
            "inp = session.get_inputs()[0]\n"
            "x = np.zeros([1 if isinstance(d, str) else d for d in inp.shape], np.float32)  # your batch\n"
            "logits = session.run(None, {inp.name: x})[0]\n"
        )
