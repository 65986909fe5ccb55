"""The one abstraction every deployment runtime implements: build, run, save, load.

A :class:`Runtime` turns a lowered model (the PT2E graph :func:`autoshrink.compress.quantize.lower`
returns, or an fp32 ``nn.Module``) into a :class:`Deployable`: the artifact that runtime ships
(``model.pt2``, ``model.onnx``, ``model.xml``/``.bin``) opened for inference at a fixed thread
count. A deployable is a plain callable, ``deployable(x) -> logits``: numpy in, numpy out, or a
torch tensor in and a torch tensor out (so ``Task.evaluate`` runs it as it runs any model).
"""

from __future__ import annotations

import abc
import ast
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoshrink.errors import AutoshrinkError

__all__ = ["Deployable", "MissingRuntimeError", "Runtime", "RuntimeInfo", "layer_of_onnx_nodes"]


class MissingRuntimeError(AutoshrinkError, ImportError):
    """A runtime whose optional dependencies are not installed (the message gives the pip command)."""


@dataclass(frozen=True)
class RuntimeInfo:
    """Which runtime timed or ran a model: recorded with every latency figure.

    Attributes:
        runtime: ``"inductor"``, ``"onnxruntime"`` or ``"openvino"``.
        version: the runtime's own version (torch's for Inductor).
        threads: intra-op threads the model ran with.
    """

    runtime: str
    version: str
    threads: int

    def columns(self) -> dict[str, object]:
        """The ``trials.csv`` columns: ``runtime``, ``runtime_version``, ``latency_threads``.

        Example:
            >>> RuntimeInfo("onnxruntime", "1.20.0", 1).columns()
            {'runtime': 'onnxruntime', 'runtime_version': '1.20.0', 'latency_threads': 1}
        """
        return {"runtime": self.runtime, "runtime_version": self.version, "latency_threads": self.threads}


class Deployable(abc.ABC):
    """A model opened in one runtime for batch inference on the CPU.

    Attributes:
        info: runtime name, version and thread count.
        files: the artifact files it runs from (in a private temporary folder until saved).
    """

    def __init__(self, info: RuntimeInfo, files: list[Path], workdir: tempfile.TemporaryDirectory | None = None):
        self.info = info
        self.files = list(files)
        self._workdir = workdir  # kept alive as long as the deployable: its files live there

    @abc.abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a float32 batch ``x`` (numpy in, numpy out)."""

    def __call__(self, x):
        if isinstance(x, torch.Tensor):
            return torch.from_numpy(np.ascontiguousarray(self.run(x.detach().cpu().float().numpy())))
        return self.run(np.ascontiguousarray(x, dtype=np.float32))

    def kernels(self) -> dict[str, str] | None:
        """Precision each conv/linear layer really runs at in this runtime, by layer name
        (``"int8"`` or ``"fp32"``); None when the runtime does not expose it."""
        return None

    def __repr__(self) -> str:
        i = self.info
        return f"<{type(self).__name__} {i.runtime} {i.version}, {i.threads} thread(s), {[f.name for f in self.files]}>"


class Runtime(abc.ABC):
    """A deployment runtime: one small module per runtime implements these four verbs.

    Attributes:
        name: how users ask for it (``search(..., runtime=name)``, ``--runtime name``).
        extra: the ``pip install "autoshrink[extra]"`` that provides it.
        artifact: the main file it ships (``model.onnx``).
    """

    name: str = ""
    extra: str = ""
    artifact: str = ""

    @abc.abstractmethod
    def version(self) -> str:
        """The runtime's version string."""

    @abc.abstractmethod
    def build(self, lowered: torch.nn.Module, example_input: torch.Tensor, *, threads: int = 1) -> Deployable:
        """The deployable form of ``lowered`` (a lowered PT2E graph or an fp32 module).

        ``lowered`` may lose parameters no graph node reads (they are not shipped); it stays usable.
        """

    @abc.abstractmethod
    def load(self, folder: str | os.PathLike, *, threads: int = 1) -> Deployable:
        """Open the artifact that :meth:`save` wrote into ``folder``."""

    @abc.abstractmethod
    def usage_snippet(self, folder: str | os.PathLike, threads: int = 1) -> str:
        """Python that loads and runs the saved artifact with this runtime alone (no autoshrink),
        set up as it was timed (``threads`` intra-op threads); it ends with ``logits`` computed."""

    def save(self, deployable: Deployable, folder: str | os.PathLike) -> list[Path]:
        """Copy the deployable's artifact files into ``folder`` (each to a temporary name, then
        renamed); returns the paths written."""
        if deployable.info.runtime != self.name:
            raise ValueError(f"cannot save a {deployable.info.runtime} deployable with the {self.name} runtime")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for src in deployable.files:
            dest = folder / src.name
            tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
            written.append(dest)
        return written

    def info(self, threads: int) -> RuntimeInfo:
        return RuntimeInfo(self.name, self.version(), threads)

    def _artifact_in(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / self.artifact
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no {self.name} model here (save one with autoshrink.runtimes.get({self.name!r}).save)"
            )
        return path


def require(runtime: str, extra: str, modules: tuple[str, ...]) -> None:
    """Raise :class:`MissingRuntimeError` with the pip command if one of ``modules`` is not importable."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MissingRuntimeError(
                f"the {runtime} runtime needs the Python package {module!r}, which is not installed: "
                f'pip install "autoshrink[{extra}]"'
            ) from exc


def check_threads(threads: int) -> int:
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    return threads


def layer_of_onnx_nodes(onnx_model) -> tuple[dict[str, str], dict[str, str]]:
    """Which model layer each ONNX conv/linear node and weight initializer came from.

    The torch.onnx (dynamo) exporter keeps an fp32 weight's state-dict name (``layer1.0.conv1.weight``)
    and stores each node's module path in its ``pkg.torch.onnx.name_scopes`` metadata
    (``['', 'layer1', '0', 'conv1', 'conv2d']``), which names the int8 layers (their weights are
    anonymous constants).

    Returns:
        ``(by_node, by_weight)``: ONNX node name (and output name) -> layer, and weight initializer name -> layer
        (the int8 initializer behind a weight's ``DequantizeLinear`` when quantized).
    """
    producers = {out: node for node in onnx_model.graph.node for out in node.output}
    by_node: dict[str, str] = {}
    by_weight: dict[str, str] = {}
    for node in onnx_model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul", "ConvTranspose") or len(node.input) < 2:
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        weight = node.input[1]
        producer = producers.get(weight)
        if producer is not None and producer.op_type == "DequantizeLinear":
            weight = producer.input[0]
        # an fp32 weight keeps its state-dict name; the exporter names a conv fused with its
        # BatchNorm after the BatchNorm, so the weight's name is the better witness
        layer = weight.removesuffix(".weight") if weight.endswith(".weight") else ".".join(s for s in scopes[1:-1] if s)
        if not layer:
            continue
        by_node[node.name] = layer
        by_node.setdefault(node.output[0], layer)  # OpenVINO names a graph's last op after its output
        by_weight[weight] = layer
    return by_node, by_weight
