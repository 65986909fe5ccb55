"""Per-layer weight quantization with PT2E (``torchao.quantization.pt2e``) for x86 CPUs.

The same per-layer plan serves two purposes:

- **fine-tuning**: :func:`prepare_qat` exports the model and inserts fake-quant at each layer's
  bit-width (quantization-aware training), so the KD fine-tune sees the rounding it will get;
- **deployment**: :func:`lower` converts a prepared model to real quantized ops, and
  :func:`compile_cpu` hands it to Inductor, which fuses them into oneDNN int8 kernels. Uncompiled,
  PT2E runs slow reference kernels (slower than fp32), so latency is only ever measured compiled.

Bit-widths: 8 bits is per-channel symmetric int8; 4 bits uses the same int8 kernels with weights
restricted to [-8, 7] (so they pack into 4 bits for storage: ``size_mb`` counts 4 bits, the CPU
computes in int8); 32 bits leaves the layer in fp32. Only weight settings vary per layer;
activations of quantized layers are uint8 per-tensor everywhere, because mixing activation
settings adds quantize/dequantize steps that cost more than they save.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn

from autoshrink.candidate import Candidate

__all__ = [
    "QUANTIZABLE",
    "compile_cpu",
    "export_model",
    "layer_bits",
    "lower",
    "prepare_ptq",
    "prepare_qat",
    "quantizable_layers",
    "set_eval",
    "set_train",
]

QUANTIZABLE = (nn.Conv2d, nn.Linear)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the layers that take a per-layer bit-width (Conv2d and Linear)."""
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def layer_bits(model: nn.Module, candidate: Candidate) -> dict[str, int]:
    """Each quantizable layer's weight bits under ``candidate``."""
    return {n: candidate.bits_for(n) for n in quantizable_layers(model)}


def _batch_of_two(example_input: torch.Tensor) -> torch.Tensor:
    # Exporting with a batch of 1 would specialise the batch dimension to 1.
    return example_input[:1].expand(2, *example_input.shape[1:]).contiguous()


def export_model(model: nn.Module, example_input: torch.Tensor) -> torch.fx.GraphModule:
    """``torch.export`` the model with a dynamic batch dimension, as a GraphModule."""
    x = _batch_of_two(example_input)
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
    gm = ep.module()
    _split_reused_activations(gm)
    return gm


# one graph node per call, no parameters: safe to name each call apart
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU,
                nn.Sigmoid, nn.Tanh, nn.Identity)


def _split_reused_activations(gm: torch.fx.GraphModule) -> None:
    """Give each call of a reused parameter-free module (``self.relu`` called twice in a
    residual block, as torchvision's ResNet does) its own source partition.

    PT2E's quantizer groups graph nodes into partitions by the module they came from (with a
    non-strict export, by the innermost ``nn_module_stack`` entry); a module called twice becomes
    one partition with two outputs, which the x86 quantizer rejects ("Input partition has more
    than one output node"). Each call of an activation is an independent op, so naming the calls
    apart (through ``source_fn_stack``, which the partitioner reads first) is exact.
    """
    by_name = {f"{c.__module__}.{c.__qualname__}": c for c in _ACTIVATIONS}
    calls: dict[str, list[tuple[torch.fx.Node, type]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.meta.get("source_fn_stack"):
            continue
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        fqn, cls = list(stack.values())[-1]
        kind = by_name.get(cls) if isinstance(cls, str) else cls
        if isinstance(kind, type) and issubclass(kind, _ACTIVATIONS):
            calls.setdefault(fqn, []).append((node, kind))
    for fqn, nodes in calls.items():
        if len(nodes) > 1:
            for i, (node, kind) in enumerate(nodes):
                node.meta["source_fn_stack"] = [(f"{fqn}__call{i}", kind)]


def _quantizer(bits: dict[str, int], is_qat: bool):
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    base = xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat)
    four = dataclasses.replace(
        base, weight=dataclasses.replace(base.weight, quant_min=-8, quant_max=7)
    )
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(base)
    for name, b in bits.items():
        quantizer.set_module_name_qconfig(name, {4: four, 8: base, 32: None}[b])
    return quantizer


def _quantized(bits: dict[str, int]) -> bool:
    return any(b < 32 for b in bits.values())


def prepare_qat(model: nn.Module, candidate: Candidate, example_input: torch.Tensor) -> nn.Module:
    """A trainable copy of ``model`` with fake-quant at each layer's bit-width.

    Returns the model itself (in train mode) when every layer stays at 32 bits.
    """
    bits = layer_bits(model, candidate)
    if not _quantized(bits):
        return model.train()
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    # PT2E's QAT conv-BN fusion assumes every conv it fuses is annotated; fp32 convs are not, so
    # their BatchNorm is folded into them first (exact in eval; they then fine-tune without BN).
    fold_bn_(model, {n for n, b in bits.items() if b == 32}, example_input)
    model.train()
    gm = export_model(model, example_input)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_pt2e(gm, _quantizer(bits, is_qat=True))
    set_train(prepared)
    return prepared


def fold_bn_(model: nn.Module, layers: set[str], example_input: torch.Tensor) -> list[str]:
    """Fold each BatchNorm that directly follows one of ``layers`` (convs) into that conv, in place.

    Pairs are found by running the model once: a BatchNorm whose input is exactly a conv's
    output. The BatchNorm is replaced by ``nn.Identity``. Returns the names of folded convs.
    """
    if not layers:
        return []
    modules = dict(model.named_modules())
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # keeps outputs alive: ids stay unique
    pairs: list[tuple[str, str]] = []
    hooks = []
    for name, m in modules.items():
        if name in layers and isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(
                lambda _m, _i, out, name=name: produced.__setitem__(id(out), (name, out))))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(
                lambda _m, inp, name=name: pairs.append((produced[id(inp[0])][0], name))
                if id(inp[0]) in produced else None))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    folded = []
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
            conv.weight = fused.weight
            conv.bias = fused.bias
            parent_name, _, attr = bn_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())
            folded.append(conv_name)
    return folded


def prepare_ptq(
    model: nn.Module,
    candidate: Candidate,
    example_input: torch.Tensor,
    calibration: Iterable[torch.Tensor],
) -> nn.Module:
    """Post-training quantization: observers at each layer's bit-width, calibrated on a few batches.

    Used for the budget gate (latency does not depend on the weights' values, only on the
    lowered graph, which is the same as after QAT) and for sensitivity analysis.
    """
    bits = layer_bits(model, candidate)
    model.eval()
    if not _quantized(bits):
        return model
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    gm = export_model(model, example_input)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(gm, _quantizer(bits, is_qat=False))
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    return prepared


def set_train(model: nn.Module) -> nn.Module:
    """Train mode for a plain or an exported/prepared model (BatchNorm and fake-quant observers)."""
    if isinstance(model, torch.fx.GraphModule):
        from torchao.quantization.pt2e import enable_observer, move_exported_model_to_train

        move_exported_model_to_train(model)
        model.apply(enable_observer)
    else:
        model.train()
    return model


def set_eval(model: nn.Module) -> nn.Module:
    """Eval mode for a plain or an exported/prepared model. Fake-quant observers are frozen too,
    so evaluating on validation data never moves the quantization ranges."""
    if isinstance(model, torch.fx.GraphModule):
        from torchao.quantization.pt2e import disable_observer, move_exported_model_to_eval

        move_exported_model_to_eval(model)
        model.apply(disable_observer)
    else:
        model.eval()
    return model


def lower(prepared: nn.Module) -> nn.Module:
    """Replace fake-quant/observers by real quantize/dequantize ops (``convert_pt2e``).

    A model with no quantized layer is returned as is (in eval mode). The input is not changed.
    """
    if not isinstance(prepared, torch.fx.GraphModule):
        return set_eval(prepared)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    gm = copy.deepcopy(prepared)
    set_eval(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_pt2e(gm)


def compile_cpu(model: nn.Module):
    """Compile for CPU inference with Inductor, with weight freezing so that PT2E's
    quantize/dequantize patterns become oneDNN int8 kernels (and fp32 convs get prepacked)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model, dynamic=False)
