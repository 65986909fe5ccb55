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

On x86 CPUs without VNNI (AVX2 only: AMD Zen 1-3, Intel before Cascade Lake), the u8 x s8 int8
kernels of oneDNN and ONNX Runtime multiply with ``vpmaddubsw``, which saturates the int16 sum of
two products: a uint8 activation against a full-range int8 weight can overflow it, and the
deployed model silently computes something other than the one calibrated (seen on such a CPU: a
tiny MLP's int8 outputs off by 3.6x the tolerance, an int8 CNN's ONNX export keeping 62 % of its
predictions). There 8-bit weights use 7 bits, [-64, 63] (255 x 64 x 2 fits in int16), which
cannot overflow; activations keep their full range, so the ONNX export stays exact (QuantizeLinear
saturates to the whole dtype). :func:`weight_range` says which applies on this machine;
``AUTOSHRINK_INT8_WEIGHT_BITS=7`` / ``8`` overrides it (a model built here for another CPU).

Compiling the lowered model (Inductor, and the fp32 fallback for int8 kernels that do not
compile) is :mod:`autoshrink.compress.compile`; its names are re-exported here.

Long module (~700 lines): the PT2E plan (export, annotate, prepare, fold, lower) is one pipeline
whose steps share the graph conventions they rely on, and the torchao patches that keep it
working on this torchao release sit next to the steps they patch.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import platform
import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn

from autoshrink import _batches
from autoshrink._forward import run_with_hooks
from autoshrink.candidate import Candidate
from autoshrink.compress._patterns import PatternCache
from autoshrink.compress.compile import Int8CompileError, compile_checked, compile_cpu

__all__ = [
    "QUANTIZABLE",
    "Int8CompileError",
    "QATModel",
    "compile_checked",
    "compile_cpu",
    "explicit_conv_padding_",
    "export_model",
    "layer_bits",
    "lower",
    "patch_warnings",
    "prepare_ptq",
    "prepare_qat",
    "quantizable_layers",
    "quantized_weights",
    "weight_range",
    "weight_range_warning",
    "set_eval",
    "set_train",
    "unsupported_layers",
]

QUANTIZABLE = (nn.Conv2d, nn.Linear)


# layers with weights that the x86 PT2E quantizer has no int8 pattern for: they stay fp32
_UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the layers that take a per-layer bit-width (Conv2d and Linear)."""
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def unsupported_layers(model: nn.Module, candidate: Candidate) -> dict[str, str]:
    """Layers the candidate asks to quantize that can only stay fp32, and why.

    Conv1d/Conv3d, transposed convs, embeddings and ``nn.MultiheadAttention`` (whose projections
    run as functional calls the quantizer cannot name) have no int8 lowering here; they are
    left fp32, counted at 32 bits in size and BOPs, and the run goes on.

    Example:
        >>> m = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(8, 2))
        >>> unsupported_layers(m, Candidate.uniform(bits=8))
        {'0': 'Conv1d has no int8 lowering on x86 (Conv2d and Linear do); left fp32'}
    """
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, _UNSUPPORTED) and candidate.bits_for(name) < 32:
            out[name] = f"{type(m).__name__} has no int8 lowering on x86 (Conv2d and Linear do); left fp32"
        elif isinstance(m, QUANTIZABLE) and _inside(name, out) and candidate.bits_for(name) < 32:
            out[name] = f"runs inside {_inside(name, out)}, which stays fp32"
    return out


def _inside(name: str, parents: dict[str, str]) -> str | None:
    return next((p for p in parents if name.startswith(p + ".")), None)


def quantized_weights(prepared: nn.Module) -> dict[str, int]:
    """Layers whose weight really carries a fake-quant/observer in a prepared model, and at what
    bits (4 when the weight range is [-8, 7], else 8). An eager model has none.

    Read from the graph, so it is the truth about what :func:`lower` will quantize, whatever the
    plan said: a Conv2d or Linear that the quantizer could not match (a weight computed in
    ``forward``, a layer called through ``F.linear``) is absent.
    """
    if not isinstance(prepared, torch.fx.GraphModule):
        return {}
    weight_ops = {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default}
    found: dict[str, int] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target not in weight_ops or len(node.args) < 2:
            continue
        weight = node.args[1]
        if not (isinstance(weight, torch.fx.Node) and weight.op == "call_module"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            continue
        layer = list(stack.values())[-1][0]
        observer = prepared.get_submodule(weight.target)
        found[layer] = 4 if getattr(observer, "quant_min", None) == -8 else 8
    return found


def layer_bits(model: nn.Module, candidate: Candidate) -> dict[str, int]:
    """Each quantizable layer's weight bits under ``candidate``."""
    return {n: candidate.bits_for(n) for n in quantizable_layers(model)}


def batch_of_two(example_input: torch.Tensor) -> torch.Tensor:
    # Exporting with a batch of 1 would specialise the batch dimension to 1.
    return _batches.batch_of_two(example_input)


def export_model(model: nn.Module, example_input: torch.Tensor) -> torch.fx.GraphModule:
    """``torch.export`` the model with a dynamic batch dimension, as a GraphModule."""
    x = batch_of_two(example_input)
    batch = torch.export.Dim("batch", min=1, max=4096)
    args, kwargs, dynamic = _batches.export_args(x, batch)  # a dict input is passed as keywords
    ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    gm = ep.module()
    _split_reused_activations(gm)
    explicit_conv_padding_(gm)
    return gm


def explicit_conv_padding_(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``padding="same"``/``"valid"`` convolutions (``aten.conv2d.padding``) to explicit
    padding (``aten.conv2d.default``), in place, so that the x86 quantizer can match them (it
    knows only the latter, and raises "conv2d is not an aten conv2d operator" on the former).

    Exact: "same" pads ``dilation * (kernel - 1)`` in total per side pair, half before; when that
    is odd (an even kernel) the extra row/column goes after, as PyTorch does, through an
    explicit ``constant_pad_nd`` before the conv. Returns the number of convs rewritten.
    """
    aten = torch.ops.aten
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.conv2d.padding:
            continue
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, [1, 1], "valid", [1, 1], 1)
        given = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        x, weight, bias, stride, padding, dilation, groups = (given.get(n, d) for n, d in zip(names, defaults,
                                                                                              strict=True))
        w = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
        if w is None or w.dim() != 4:
            continue
        dilation = list(dilation) * (2 // len(dilation))
        total = [0, 0] if padding == "valid" else [d * (k - 1) for d, k in zip(dilation, w.shape[2:], strict=True)]
        before = [t // 2 for t in total]
        if any(t % 2 for t in total):
            # constant_pad_nd takes (left, right, top, bottom): last dimension first
            pads = [before[1], total[1] - before[1], before[0], total[0] - before[0]]
            with gm.graph.inserting_before(node):
                x = gm.graph.call_function(aten.constant_pad_nd.default, (x, pads, 0.0))
            x.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
            before = [0, 0]
        node.target = aten.conv2d.default
        node.args = (x, weight, bias, list(stride), before, dilation, groups)
        node.kwargs = {}
        count += 1
    if count:
        gm.recompile()
    return count


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


def _patch_torchao() -> None:
    """Three targeted fixes to torchao's PT2E internals, installed once per process (each checks
    that the function it wraps exists, and leaves torchao alone otherwise, with a warning that
    :func:`patch_warnings` keeps)."""
    global _PATCHED
    if _PATCHED:
        return
    _PATCHED = True
    _memoize_pattern_exports()
    _skip_absent_conv_kinds()
    _skip_empty_qspec_updates()


_PATCHED = False
_PATCH_WARNINGS: list[str] = []


def patch_warnings() -> list[str]:
    """Why a torchao patch was not installed in this process (its target moved in this torchao
    version), one line each; empty when all are in place. For the run's summary and report.

    Example:
        >>> isinstance(patch_warnings(), list)
        True
    """
    return list(_PATCH_WARNINGS)


def _patch_skipped(patch: str, target: str, exc: BaseException, effect: str) -> None:
    """Record and warn, once per process and patch, that torchao's layout changed under a patch."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    message = (f"torchao {version}: {target} not found ({type(exc).__name__}: {exc}), so the "
               f"{patch} patch is not installed: {effect}")
    if message not in _PATCH_WARNINGS:
        _PATCH_WARNINGS.append(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _skip_absent_conv_kinds() -> None:
    """QAT conv-BN fusion (prepare) and folding (convert) try every conv kind in turn (conv1d,
    conv2d, conv_transpose1d/2d), each by exporting a dozen pattern graphs, whether or not the
    model has such convs: ~3/4 of the ~110 pattern exports a process pays once (~20 s) are for
    kinds a Conv2d model never has. A kind with no op in the graph has nothing to rewrite, so it
    is skipped while another kind is present (that one runs with the stock bookkeeping)."""
    import importlib

    import torch.nn.functional as F

    try:
        qat_utils = importlib.import_module("torchao.quantization.pt2e.qat_utils")
        helpers = {name: getattr(qat_utils, name)
                   for name in ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")}
    except (ImportError, AttributeError) as exc:
        _patch_skipped("skip-absent-conv-kinds", "torchao.quantization.pt2e.qat_utils._fuse/_fold_conv_bn_qat_helper",
                       exc, "QAT conv-BN fusion tries every conv kind again (slower, same result)")
        return
    aten = torch.ops.aten
    ops = {
        F.conv1d: {aten.conv1d.default, aten.conv1d.padding},
        F.conv2d: {aten.conv2d.default, aten.conv2d.padding},
        F.conv_transpose1d: {aten.conv_transpose1d.default},
        F.conv_transpose2d: {aten.conv_transpose2d.input},
    }

    def skipping(helper):
        def run(m, conv_fn, example_inputs, is_cuda, *args, **kwargs):
            targets = {n.target for n in m.graph.nodes if n.op == "call_function"}
            present = {fn for fn, kind in ops.items() if targets & kind}
            # a graph with none of the kinds still runs the stock path (its bookkeeping included)
            if conv_fn in ops and present and conv_fn not in present:
                return m
            return helper(m, conv_fn, example_inputs, is_cuda, *args, **kwargs)

        return run

    for name, helper in helpers.items():
        setattr(qat_utils, name, skipping(helper))


def _skip_empty_qspec_updates() -> None:
    """QAT conv-BN fusion crashes (``IndexError`` in ``_update_conv_input_qspec_map_after_
    replacement``) when the conv feeding a fused conv-BN is itself a conv left fp32: the fusion
    revisits that input conv to re-key its quantization specs, and an fp32 conv's annotation
    has none. MobileNetV2's last projection (fp32) feeding ``conv_head`` (int8) hits it. An
    empty map has nothing to re-key, so it is skipped."""
    import importlib

    try:
        qat_utils = importlib.import_module("torchao.quantization.pt2e.qat_utils")
        original = qat_utils._update_conv_input_qspec_map_after_replacement
    except (ImportError, AttributeError) as exc:
        _patch_skipped("skip-empty-qspec-updates",
                       "torchao.quantization.pt2e.qat_utils._update_conv_input_qspec_map_after_replacement", exc,
                       "QAT may fail with IndexError where an fp32 conv feeds a fused conv-BN (e.g. MobileNetV2)")
        return

    def update(original_node, replacement_node):
        annotation = original_node.meta.get("quantization_annotation")
        if annotation is not None and not annotation.input_qspec_map:
            return
        original(original_node, replacement_node)

    qat_utils._update_conv_input_qspec_map_after_replacement = update


def _memoize_pattern_exports() -> None:
    """Export each of torchao's fixed rewrite patterns once, not once per call: in memory for the
    process, on disk for the next one (:mod:`autoshrink.compress._patterns`). torchao exports
    every pattern afresh each time it rewrites: ~100 exports (tens of seconds) per :func:`lower`
    of a QAT model, ~20 per :func:`prepare_qat` and a few per :func:`set_eval`."""
    import importlib

    try:
        utils = importlib.import_module("torchao.quantization.pt2e.utils")
        original = utils._get_aten_graph_module_for_pattern
    except (ImportError, AttributeError) as exc:  # another torchao layout: nothing to speed up
        _patch_skipped("memoize-pattern-exports", "torchao.quantization.pt2e.utils._get_aten_graph_module_for_pattern",
                       exc, "each lower() of a QAT model exports its ~100 rewrite patterns again (slower, same result)")
        return
    cached = PatternCache(original)

    # the helpers import the function by name, so each importing module gets the wrapper too
    for name in ("utils", "qat_utils", "export_utils", "reference_representation_rewrite"):
        try:
            mod = importlib.import_module(f"torchao.quantization.pt2e.{name}")
        except ImportError:
            continue
        if getattr(mod, "_get_aten_graph_module_for_pattern", None) is original:
            mod._get_aten_graph_module_for_pattern = cached
    utils._get_aten_graph_module_for_pattern = cached


@functools.cache
def weight_range() -> tuple[int, int]:
    """The integer range of 8-bit weights on this machine: ``(-128, 127)``, or ``(-64, 63)`` on an
    x86 CPU without VNNI (no AVX512-VNNI, AVX-VNNI or AMX), where full-range weights can saturate
    the int8 kernels' int16 sums (the module's docstring). ``AUTOSHRINK_INT8_WEIGHT_BITS`` = 7 / 8
    forces it.

    Example:
        >>> weight_range() in ((-128, 127), (-64, 63))
        True
    """
    forced = os.environ.get("AUTOSHRINK_INT8_WEIGHT_BITS", "").strip()
    if forced:
        if forced not in ("7", "8"):
            raise ValueError(f"AUTOSHRINK_INT8_WEIGHT_BITS={forced!r}: use 8 (full-range int8 weights) or 7 "
                             "(for x86 CPUs without VNNI)")
        return (-128, 127) if forced == "8" else (-64, 63)
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return (-128, 127)
    caps = torch.cpu.get_capabilities()
    vnni = any(caps.get(k, False) for k in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return (-128, 127) if vnni else (-64, 63)


def weight_range_warning() -> str | None:
    """One line for the run's warnings when this machine quantizes 8-bit weights to 7 bits (no
    VNNI), naming the host; None where weights use the full int8 range. A bad
    ``AUTOSHRINK_INT8_WEIGHT_BITS`` is returned as the line (every trial has failed on it already,
    with the same message), not raised: the caller is a worker reporting what it did."""
    try:
        if weight_range() == (-128, 127):
            return None
    except ValueError as exc:
        return str(exc)
    import socket

    why = ("AUTOSHRINK_INT8_WEIGHT_BITS=7" if os.environ.get("AUTOSHRINK_INT8_WEIGHT_BITS", "").strip()
           else "this x86 CPU has no VNNI, where full-range int8 weights saturate the int8 kernels")
    return (f"8-bit weights were quantized to 7 bits ([-64, 63]) on {socket.gethostname()}: {why}; a model "
            "for a CPU with VNNI (AVX512-VNNI, AVX-VNNI, AMX) can use all 8 with AUTOSHRINK_INT8_WEIGHT_BITS=8")


def _quantizer(bits: dict[str, int], is_qat: bool):
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    base = xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat)
    low, high = weight_range()
    if (low, high) != (base.weight.quant_min, base.weight.quant_max):
        base = dataclasses.replace(base, weight=dataclasses.replace(base.weight, quant_min=low, quant_max=high))
    if is_qat:
        # The default QAT weight fake-quant (FusedMovingAvgObsFakeQuantize) trains with a scale
        # of amax / (n/2 - 1) but convert_pt2e recomputes it from its observer as amax / (n/2):
        # 0.4 % apart at 8 bits, 7 % at 4 bits, enough to cost points after lowering. The
        # unfused FakeQuantize stores exactly what its observer computes, so the deployed model
        # matches the one fine-tuning saw.
        from torchao.quantization.pt2e import FakeQuantize, MovingAveragePerChannelMinMaxObserver

        base = dataclasses.replace(base, weight=dataclasses.replace(
            base.weight,
            observer_or_fake_quant_ctr=FakeQuantize.with_args(
                observer=MovingAveragePerChannelMinMaxObserver, eps=2**-12),
        ))
    four = dataclasses.replace(
        base, weight=dataclasses.replace(base.weight, quant_min=-8, quant_max=7)
    )
    quantizer = (_one_sweep_quantizer() or xiq.X86InductorQuantizer)()
    quantizer.set_global(base)
    for name, b in bits.items():
        quantizer.set_module_name_qconfig(name, {4: four, 8: base, 32: None}[b])
    return quantizer


@functools.cache
def _one_sweep_quantizer():
    """``X86InductorQuantizer`` that annotates all layers sharing a setting in one sweep.

    The stock quantizer walks the whole graph once per ``set_module_name_qconfig`` entry, so
    per-layer settings cost O(layers x graph): half of a MobileNetV2's preparation time. Layer
    names here are leaf Conv2d/Linear modules, whose only op is the conv/linear itself, and no
    x86 pattern holds two of those, so "every node of the pattern comes from one of these
    layers" accepts exactly the patterns the per-layer filters accept: same annotations, one
    sweep per distinct setting (at most three: 4, 8, fp32).
    """
    try:
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        base_cls = xiq.X86InductorQuantizer
        global_filter = xiq._global_config_filter
        for attr in ("_annotate_with_config", "_annotate_output_for_int8_in_int8_out_pattern_entry"):
            getattr(base_cls, attr)
    except (ImportError, AttributeError):  # another torchao layout: the stock quantizer
        return None

    def from_layers(names: set[str]):
        def layers_of(node) -> set[str]:
            stack = node.meta.get("nn_module_stack", {})
            return {p.removeprefix("L['self'].") for p, _ in stack.values()}

        return lambda nodes: all(layers_of(n) & names for n in nodes)

    class OneSweepPerSetting(base_cls):
        def annotate(self, model):
            if self.operator_type_qconfig:
                return super().annotate(model)
            groups: dict[int, tuple[object, set[str]]] = {}
            for name, config in self.module_name_qconfig.items():
                groups.setdefault(id(config), (config, set()))[1].add(name)
            for config, names in groups.values():
                self._annotate_with_config(model, config, from_layers(names))
            if self.global_config:
                self._annotate_with_config(model, self.global_config, global_filter)
            self._annotate_output_for_int8_in_int8_out_pattern_entry(model)
            return model

    return OneSweepPerSetting


def _quantized(bits: dict[str, int]) -> bool:
    return any(b < 32 for b in bits.values())


def prepare_qat(
    model: nn.Module,
    candidate: Candidate,
    example_input: torch.Tensor,
    calibration: Iterable[torch.Tensor] | None = None,
) -> nn.Module:
    """A trainable copy of ``model`` with fake-quant at each layer's bit-width.

    The fake-quant ranges are initialised on ``calibration`` batches (default: the example
    input) with BatchNorm in eval mode, so the prepared model is usable before any training
    step (a zero-step fine-tune, an early evaluation) and BatchNorm statistics are untouched.

    Returns the model itself (in train mode) when every layer stays at 32 bits.
    """
    bits = layer_bits(model, candidate)
    if not _quantized(bits):
        return model.train()
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    _patch_torchao()

    # PT2E's QAT conv-BN fusion assumes every conv it fuses is annotated; fp32 convs are not, so
    # their BatchNorm is folded into them first (exact in eval; they then fine-tune without BN).
    fold_bn_(model, {n for n, b in bits.items() if b == 32}, example_input)
    model.train()
    gm = export_model(model, example_input)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_pt2e(gm, _quantizer(bits, is_qat=True))
    from torchao.quantization.pt2e import enable_observer

    set_eval(prepared)
    prepared.apply(enable_observer)
    with torch.no_grad():
        for x in calibration if calibration is not None else [example_input]:
            _batches.call(prepared, x)
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
    forward, pre = {}, {}
    for name, m in modules.items():
        if name in layers and isinstance(m, nn.Conv2d):
            forward[m] = lambda _m, _i, out, name=name: produced.__setitem__(id(out), (name, out))
        elif isinstance(m, nn.BatchNorm2d):
            pre[m] = (lambda _m, inp, name=name: pairs.append((produced[id(inp[0])][0], name))
                      if id(inp[0]) in produced else None)
    run_with_hooks(model, example_input, forward=forward, pre=pre)
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

    _patch_torchao()

    gm = export_model(model, example_input)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(gm, _quantizer(bits, is_qat=False))
    with torch.no_grad():
        for x in calibration:
            _batches.call(prepared, x)
    return prepared


class QATModel(nn.Module):
    """A fake-quant (QAT) model that trains like any module: ``.train()`` and ``.eval()`` work.

    PT2E prepares an exported ``GraphModule``, whose own ``train()``/``eval()`` raise (an export
    fixes BatchNorm/dropout behaviour in its graph); here they switch the graph with torchao's
    ``move_exported_model_to_train``/``_eval``, and enable/freeze the fake-quant observers
    (frozen in eval, so evaluating never moves the quantization ranges).

    Attributes:
        graph_module: the prepared graph (what :func:`lower` converts to int8).
    """

    def __init__(self, graph_module: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.training = True

    def forward(self, *args, **kwargs):
        return self.graph_module(*args, **kwargs)

    def train(self, mode: bool = True) -> QATModel:
        if not isinstance(mode, bool):
            raise TypeError(f"train(mode) expects a bool, got {type(mode).__name__}")
        (set_train if mode else set_eval)(self.graph_module)
        self.training = mode
        return self


def set_train(model: nn.Module) -> nn.Module:
    """Train mode for a plain or an exported/prepared model (BatchNorm and fake-quant observers)."""
    if isinstance(model, torch.fx.GraphModule):
        from torchao.quantization.pt2e import enable_observer, move_exported_model_to_train

        _patch_torchao()
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

        _patch_torchao()
        move_exported_model_to_eval(model)
        model.apply(disable_observer)
    else:
        model.eval()
    return model


def lower(prepared: nn.Module) -> nn.Module:
    """Replace fake-quant/observers by real quantize/dequantize ops (``convert_pt2e``).

    A model with no quantized layer is returned as is (in eval mode). The input is not changed.
    """
    if isinstance(prepared, QATModel):
        prepared = prepared.graph_module
    if not isinstance(prepared, torch.fx.GraphModule):
        return set_eval(prepared)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    _patch_torchao()
    gm = copy.deepcopy(prepared)
    set_eval(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_pt2e(gm)
