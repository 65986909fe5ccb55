"""Inductor: ``torch.compile`` with weight freezing, oneDNN int8 kernels (what the search always timed).

The artifact is the ``torch.export`` program ``model.pt2``; it loads with torch alone and is
compiled on load exactly as the search compiled it (:func:`autoshrink.export.load_deployable`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from autoshrink.runtimes._base import Deployable, Runtime, check_threads

__all__ = ["InductorDeployable", "InductorRuntime"]


class InductorDeployable(Deployable):
    """A compiled lowered model; tensors in, tensors out (numpy converted on the way)."""

    def __init__(self, fn, info, files, workdir=None) -> None:
        super().__init__(info, files, workdir)
        self._fn = fn

    def __call__(self, x):
        if isinstance(x, torch.Tensor):
            with torch.no_grad():
                return self._fn(x)
        return self.run(x)

    def run(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self._fn(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


class InductorRuntime(Runtime):
    name = "inductor"
    extra = ""  # torch itself
    artifact = "model.pt2"

    def version(self) -> str:
        return torch.__version__

    def build(self, lowered: torch.nn.Module, example_input: torch.Tensor, *, threads: int = 1) -> Deployable:
        from autoshrink.compress.quantize import compile_cpu
        from autoshrink.trial import save_deployable  # lazy: trial sits above the runtimes

        check_threads(threads)
        workdir = tempfile.TemporaryDirectory(prefix="autoshrink-inductor-")
        # saved before compiling: Inductor's freezing rewrites the module's constants
        pt2 = save_deployable(lowered, example_input, Path(workdir.name) / self.artifact)
        return InductorDeployable(compile_cpu(lowered), self.info(threads), [pt2], workdir)

    def load(self, folder: str | os.PathLike, *, threads: int = 1) -> Deployable:
        from autoshrink.export import load_deployable

        check_threads(threads)
        path = self._artifact_in(folder)
        return InductorDeployable(load_deployable(path), self.info(threads), [path])

    def usage_snippet(self, folder: str | os.PathLike, threads: int = 1) -> str:
        path = Path(folder) / self.artifact
        return (
            "import torch\n"
            "import torch.ao.quantization.fx._decomposed  # registers the int8 quantize/dequantize ops\n"
            "import torch._inductor.config\n"
            "torch._inductor.config.freezing = True  # int8 patterns become oneDNN int8 kernels\n"
            f"model = torch.compile(torch.export.load({str(path)!r}).module(), dynamic=False)\n"
            f"torch.set_num_threads({threads})\n"
            "with torch.no_grad():\n"
            "    logits = model(x)  # x: a float32 batch\n"
        )
