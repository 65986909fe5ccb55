"""OpenVINO: the CPU plugin with the latency hint, from the same QDQ ONNX graph.

OpenVINO reads ``QuantizeLinear``/``DequantizeLinear`` as ``FakeQuantize`` and its
low-precision transformations run the quantized convs and linears with u8/i8 kernels. The
artifact is OpenVINO IR (``model.xml`` + ``model.bin``, fp32 weights kept: no fp16 compression).
Float layers are pinned to fp32 (``INFERENCE_PRECISION_HINT``): on CPUs with bf16 support the
plugin would otherwise run them in bf16, and a layer the plan leaves fp32 must stay fp32.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from autoshrink.measure.fresh import openvino_config as compile_config
from autoshrink.measure.fresh import openvino_core
from autoshrink.runtimes._base import Deployable, Runtime, check_threads, layer_of_onnx_nodes, require
from autoshrink.runtimes._onnx import export_onnx

__all__ = ["OpenVinoDeployable", "OpenVinoRuntime", "compile_config"]

_LAYERS = ["autoshrink", "layers"]  # rt_info key of the layer map in model.xml
_COMPUTE = frozenset({"Convolution", "FullyConnected", "MatMul", "Deconvolution", "GroupConvolution"})


class OpenVinoDeployable(Deployable):
    """An OpenVINO ``CompiledModel`` on the CPU, with one reused infer request."""

    def __init__(self, xml: Path, info, workdir=None) -> None:
        super().__init__(info, [xml, xml.with_suffix(".bin")], workdir)
        core = openvino_core()  # one per process: see openvino_core
        model = core.read_model(str(xml))
        self.compiled = core.compile_model(model, "CPU", compile_config(info.threads))
        self._request = self.compiled.create_infer_request()
        # ONNX node name -> model layer, stored in the IR by build (absent in a foreign model.xml)
        self._layers = json.loads(model.get_rt_info(_LAYERS).astype(str)) if model.has_rt_info(_LAYERS) else {}

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._request.infer({0: x})[0]

    def kernels(self) -> dict[str, str]:
        """Each conv/linear's execution precision in the compiled CPU graph (its
        ``runtimePrecision``: u8/i8 means int8 kernels), by layer name when known."""
        out: dict[str, str] = {}
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            if rt["layerType"].astype(str) not in _COMPUTE:
                continue
            precision = rt["runtimePrecision"].astype(str).lower()
            names = [n.split("/")[0] for n in rt["originalLayersNames"].astype(str).split(",")]
            layer = next((self._layers[n] for n in names if n in self._layers), op.get_friendly_name())
            out[layer] = "int8" if precision in ("u8", "i8") else "fp32"
        return out


class OpenVinoRuntime(Runtime):
    name = "openvino"
    extra = "openvino"
    artifact = "model.xml"

    def __init__(self) -> None:
        require(self.name, self.extra, ("openvino", "onnx", "onnxscript"))

    def version(self) -> str:
        import openvino

        return openvino.get_version()

    def build(self, lowered: torch.nn.Module, example_input: torch.Tensor, *, threads: int = 1) -> Deployable:
        import onnx
        import openvino as ov

        check_threads(threads)
        workdir = tempfile.TemporaryDirectory(prefix="autoshrink-ov-")
        folder = Path(workdir.name)
        onnx_path = export_onnx(lowered, example_input, folder)
        by_node, _ = layer_of_onnx_nodes(onnx.load(str(onnx_path), load_external_data=False))
        xml = folder / self.artifact
        model = openvino_core().read_model(str(onnx_path))
        model.set_rt_info(json.dumps(by_node), _LAYERS)
        ov.save_model(model, str(xml), compress_to_fp16=False)
        onnx_path.unlink()
        return OpenVinoDeployable(xml, self.info(threads), workdir)

    def load(self, folder: str | os.PathLike, *, threads: int = 1) -> Deployable:
        check_threads(threads)
        xml = self._artifact_in(folder)
        if not xml.with_suffix(".bin").is_file():
            raise FileNotFoundError(f"{xml.with_suffix('.bin')}: the weights of {xml} are missing")
        return OpenVinoDeployable(xml, self.info(threads))

    def usage_snippet(self, folder: str | os.PathLike, threads: int = 1) -> str:
        path = Path(folder) / self.artifact
        return (
            "import numpy as np\n"
            "import openvino as ov\n"
            f"model = ov.Core().compile_model({str(path)!r}, 'CPU', {{'PERFORMANCE_HINT': 'LATENCY',\n"
            f"    'INFERENCE_NUM_THREADS': {threads}, 'INFERENCE_PRECISION_HINT': 'f32'}})  # as the search timed it\n"
            "shape = model.input(0).get_partial_shape()\n"
            "x = np.zeros([1 if d.is_dynamic else d.get_length() for d in shape], np.float32)  # your batch\n"
            "logits = model(x)[0]\n"
        )
