"""Compile a lowered model for CPU with Inductor, and the fallback when its int8 kernels do not.

:func:`compile_cpu` is how every deployable model is compiled (the search's trials, the latency
target, ``plan``, export); :func:`compile_checked` compiles and runs it once so that a failure of
torchao's x86 int8 fusion passes shows at once, as an :class:`Int8CompileError` naming the int8
layers implicated, for the caller to leave them fp32 and retry. The PT2E steps before it
(export, prepare, lower) are in :mod:`autoshrink.compress.quantize`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from autoshrink import _batches

__all__ = ["Int8CompileError", "compile_checked", "compile_cpu"]


def compile_cpu(model: nn.Module):
    """Compile for CPU inference with Inductor, with weight freezing so that PT2E's
    quantize/dequantize patterns become oneDNN int8 kernels (and fp32 convs get prepacked).

    Freezing is Inductor's ``freezing`` setting, switched on only while the returned callable
    runs, never for the rest of the process. ``torch.compile`` is lazy (it compiles on the first
    call, and again on a recompile), and neither ``options={"freezing": True}`` nor a patch
    around the backend call yields a frozen graph in torch 2.13: the setting must hold while
    the compiled model is called. The toggle costs a few microseconds per call.

    Returns:
        A callable ``model(x) -> output``; call it under ``torch.no_grad()`` (freezing only
        applies to inference).
    """
    import torch._inductor.config as inductor_config

    compiled = torch.compile(model, dynamic=False)

    @functools.wraps(compiled)
    def frozen(*args, **kwargs):
        before = inductor_config.freezing
        inductor_config.freezing = True
        try:
            return compiled(*args, **kwargs)
        finally:
            inductor_config.freezing = before

    return frozen


class Int8CompileError(RuntimeError):
    """Inductor could not compile the int8 kernels of some layers.

    Attributes:
        layers: the quantized layers implicated (to be left fp32 and retried), possibly empty.
        reason: the compiler's error, one line.
    """

    def __init__(self, layers: list[str], reason: str) -> None:
        super().__init__(f"int8 kernels did not compile ({reason}); implicated layers: {layers or 'none found'}")
        self.layers, self.reason = layers, reason


# Inductor patterns that fuse an int8 linear/conv with the op after it (torchao's x86 passes)
_POST_OPS = {"gelu", "relu", "hardtanh", "hardswish", "silu", "sigmoid", "tanh", "leaky_relu", "add", "add_"}


def compile_checked(lowered: nn.Module, example_input: torch.Tensor):
    """:func:`compile_cpu` ``lowered`` and run it once, so that a compile failure shows here.

    Inductor compiles on the first call, made here in inference mode as
    :func:`~autoshrink.measure.latency.measure_latency` makes its calls, so that the timing reuses
    this compilation. When its int8 lowering fails (torchao's x86
    ``qlinear_post_op_fusion`` asserting on some Linear -> GELU graphs, say), the error is
    translated to :class:`Int8CompileError` naming the int8 layers whose kernel is fused with the
    op after it (Linear layers for a ``qlinear`` pass, convs for ``qconv``, both otherwise), so
    the caller can leave them fp32 and retry.
    """
    compiled = compile_cpu(lowered)
    try:
        # in inference mode, as measure_latency calls it: the grad mode is one of Dynamo's guards,
        # and a first call under no_grad made the timer's first call compile the whole model again
        with torch.inference_mode():
            _batches.call(compiled, example_input)
    except Exception as exc:  # noqa: BLE001 - the compiler's error, translated with the layers
        text = f"{type(exc).__name__}: {exc}"
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
        raise Int8CompileError(_fused_int8_layers(lowered, text), first[:300]) from exc
    return compiled


def _fused_int8_layers(lowered: nn.Module, error: str) -> list[str]:
    """int8 Conv2d/Linear layers of a lowered graph whose output feeds a post-op Inductor fuses."""
    if not isinstance(lowered, torch.fx.GraphModule):
        return []
    want = {torch.ops.aten.linear.default} if "qlinear" in error else (
        {torch.ops.aten.conv2d.default} if "qconv" in error else
        {torch.ops.aten.linear.default, torch.ops.aten.conv2d.default})
    layers: list[str] = []
    for node in lowered.graph.nodes:
        if node.op != "call_function" or node.target not in want or len(node.args) < 2:
            continue
        weight = node.args[1]
        if not (isinstance(weight, torch.fx.Node) and "dequantize" in str(weight.target)):
            continue  # an fp32 layer: nothing int8 to compile
        if not any(_op_name(u) in _POST_OPS for u in node.users):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            layers.append(list(stack.values())[-1][0])
    return list(dict.fromkeys(layers))


def _op_name(node: torch.fx.Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    return target.split(".")[0]
