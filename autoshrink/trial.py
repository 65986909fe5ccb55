"""`evaluate(task, candidate, budget)`: one trial, in five steps and nothing else.

1. compress: structured prune a copy of the teacher, resolve per-layer bits;
2. cheap metrics first (MACs, BOPs, params, size), then the measured latency of the lowered,
   compiled model (PTQ-calibrated: latency depends on the graph, not on the weights' values);
3. budget gate: a candidate that misses the budget is recorded with its metrics, never fine-tuned;
4. KD fine-tune with fake-quant at each layer's bits, reporting intermediate accuracy;
5. accuracy on the validation data of the lowered int8 model (what would be deployed).

Latency (step 2) and accuracy (step 5) are taken in the runtime the search deploys with
(``TrialContext.runtime``: Inductor by default, or ONNX Runtime / OpenVINO, see
:mod:`autoshrink.runtimes`); the trial's artifact is that runtime's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from autoshrink._files import atomic_path
from autoshrink.budget import Budget
from autoshrink.candidate import Candidate
from autoshrink.compress import Compressed, compress
from autoshrink.compress.distill import StopTrial, finetune
from autoshrink.compress.prune import PRUNABLE
from autoshrink.compress.quantize import Int8CompileError, compile_checked, compile_cpu, lower, prepare_ptq
from autoshrink.measure.flops import Cost, model_cost
from autoshrink.measure.latency import Latency, MachineLock, fixed_threads, measure_latency
from autoshrink.record import State, TrialAttr  # State re-exported: how a trial ended
from autoshrink.runtimes import DEFAULT as DEFAULT_RUNTIME
from autoshrink.runtimes import RuntimeLatency, fp32_in_runtime, time_runtime
from autoshrink.runtimes import get as get_runtime
from autoshrink.task import Task

__all__ = ["State", "TrialContext", "TrialResult", "evaluate", "save_deployable"]


@dataclass
class TrialContext:
    """How to run a trial (not what to run: that is the candidate).

    Args:
        threads: torch threads for fine-tuning (latency always uses ``latency_threads``).
        latency_threads: threads while timing (1 = a typical edge core).
        latency_runs: timed calls for the median.
        lock: the machine lock that isolates timing from other trials' work.
        cached_logits: the teacher's logits on the training set, or None (teacher runs online).
        report: ``report(step, accuracy)`` during fine-tune; may raise ``StopTrial``.
        eval_every: steps between intermediate reports (0: none).
        artifact_dir: where a finished trial saves its deployable model (None: not saved).
        seed: seeds fine-tuning.
        measure: ``measure(lowered, example_input, runs, threads) -> Latency`` times the lowered
            (uncompiled) model somewhere else, e.g. on the latency-target machine of a Ray
            cluster; None: compile and time it here, inside ``lock``.
        device: where the KD fine-tune runs (``"cpu"``, ``"cuda"``, ``"auto"``; see
            :func:`autoshrink.device.resolve_device`); lowering and timing stay on the CPU.
        runtime: the deployment runtime that times the gate, evaluates the fine-tuned model and
            ships its artifact (``"inductor"``, ``"onnxruntime"``, ``"openvino"``).
    """

    threads: int = 1
    latency_threads: int = 1
    latency_runs: int = 60
    lock: MachineLock | None = None
    cached_logits: torch.Tensor | None = None
    report: Callable[[int, float], None] | None = None
    eval_every: int = 0
    artifact_dir: str | None = None
    seed: int = 0
    measure: Callable[[torch.nn.Module, torch.Tensor, int, int], Latency] | None = None
    device: str = "cpu"
    runtime: str = DEFAULT_RUNTIME


@dataclass
class TrialResult:
    """Everything one trial measured. Field names are the ``trials.csv`` columns."""

    state: State = State.COMPLETE
    accuracy: float | None = None  # lowered (int8) model on the full validation set
    accuracy_se: float | None = None
    latency_ms: float | None = None
    latency_iqr_ms: float | None = None
    size_mb: float | None = None
    mmacs: float | None = None
    bops: float | None = None
    params: int | None = None
    meets_budget: bool | None = None
    finetune_s: float = 0.0
    compress_s: float = 0.0
    measure_s: float = 0.0
    evaluate_s: float = 0.0
    error: str = ""
    history: list[tuple[int, float]] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    skipped_layers: dict[str, str] = field(default_factory=dict)
    fp32_layers: dict[str, str] = field(default_factory=dict)  # asked to quantize, left fp32: why
    unpruned_groups: list[dict] = field(default_factory=list)  # [{"layers": [...], "reason": ...}]: left whole
    uncounted_ops: dict[str, int] = field(default_factory=dict)  # fvcore could not count: mmacs is "at least"
    finetune_device: str | None = None  # where the fine-tune ran: "cpu", "cuda:0 (NVIDIA H200)"
    runtime: str = ""  # the runtime that timed the gate (and evaluated the fine-tuned model)
    runtime_version: str = ""
    latency_threads: int | None = None
    # asked to quantize, and quantized, but run with a float kernel by that runtime: why
    runtime_fp32_layers: dict[str, str] = field(default_factory=dict)
    # what the timed graph is made of (autoshrink.measure.calibration.Structure), timed here: the
    # driver records it with latency_ms as a latency-predictor calibration example (not a column)
    latency_structure: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        return d


def evaluate(
    task: Task,
    candidate: Candidate,
    budget: Budget,
    context: TrialContext | None = None,
    *,
    on_latency: Callable[[dict], None] | None = None,
) -> TrialResult:
    """Run one trial. Errors inside are not caught here: the caller records them as FAIL.

    Args:
        task: teacher, data, example input, metric.
        candidate: the configuration to try.
        budget: limits; checked before any fine-tuning.
        context: threads, lock, reporting (defaults: 1 thread, no lock, no reports).
        on_latency: called with ``{"latency_ms": ...}`` once latency is measured (so that
            intermediate reports can weigh accuracy against it).

    Returns:
        A :class:`TrialResult`; ``state`` is PRUNED when a ``StopTrial`` ended the fine-tune.

    Example:
        >>> r = evaluate(task, Candidate.uniform(bits=8, prune=0.25), Budget(latency_ms=5))  # doctest: +SKIP
    """
    ctx = context or TrialContext()
    torch.set_num_threads(ctx.threads)
    result = TrialResult(runtime=ctx.runtime)
    rt = get_runtime(ctx.runtime)  # a missing extra fails here, before any work
    deployable = None  # the gate's model in a runtime other than Inductor
    x = task.example_input

    # Heavy work holds the machine lock's shared side, one piece at a time, so that no trial's
    # latency timing (which takes it exclusively) overlaps another trial's work.
    guard = ctx.lock.training if ctx.lock is not None else None
    hold = guard or contextlib.nullcontext

    # 1. compress
    t0 = time.perf_counter()
    with hold():
        comp = compress(task.model, candidate, x)
    result.compress_s = time.perf_counter() - t0
    result.skipped_layers = dict(comp.prune_report.skipped)
    result.unpruned_groups = comp.prune_report.as_dict()[TrialAttr.UNPRUNED_GROUPS]

    # 2. cheap metrics, then latency of the deployable model
    t0 = time.perf_counter()
    with hold():
        cost = _record_cost(result, comp, x)
    static_violation = Budget(size_mb=budget.size_mb, mmacs=budget.mmacs).violations(
        {"size_mb": cost.size_mb, "mmacs": cost.mmacs}
    )
    if not static_violation and ctx.latency_runs > 0:
        calib = list(task.calibration_batches())
        for attempt in range(2):
            with hold():
                ptq = prepare_ptq(comp.pruned, _bits_only(comp.bits), x, calib)
                if comp.verify(ptq):  # a layer the quantizer could not match stays fp32: re-cost
                    cost = _record_cost(result, comp, x)
                if ctx.measure is not None:
                    break
                if ctx.runtime != DEFAULT_RUNTIME:  # built (exported, converted) in that runtime
                    deployable = rt.build(lower(ptq), x, threads=ctx.latency_threads)
                    break
                try:
                    # compiled with the timing's thread count: Inductor's CPU kernels take it at
                    # compile time, and Dynamo recompiled when the timer's count differed
                    with fixed_threads(ctx.latency_threads):
                        compiled = compile_checked(lower(ptq), x)
                    break
                except Int8CompileError as exc:
                    if attempt or not exc.layers:
                        raise
                    # the int8 kernels that do not compile stay fp32, and the rest is retried
                    comp.keep_fp32(exc.layers, f"int8 kernel did not compile ({exc.reason}); left fp32")
                    cost = _record_cost(result, comp, x)
        if ctx.measure is not None:
            lat = ctx.measure(lower(ptq), x, ctx.latency_runs, ctx.latency_threads)
        elif deployable is not None:
            lat = time_runtime(deployable, x, runs=ctx.latency_runs, threads=ctx.latency_threads, lock=ctx.lock)
            with hold():
                result.runtime_fp32_layers = fp32_in_runtime(deployable, comp.bits)
            del deployable
        else:
            lat = measure_latency(
                compiled, x, runs=ctx.latency_runs, threads=ctx.latency_threads, lock=ctx.lock,
            )
        result.latency_ms, result.latency_iqr_ms = lat.median_ms, lat.p75_ms - lat.p25_ms
        # who timed it: the meter's own runtime on a latency target, else this process's
        info = lat.info if isinstance(lat, RuntimeLatency) and lat.info is not None else rt.info(lat.threads)
        result.runtime, result.runtime_version, result.latency_threads = info.runtime, info.version, info.threads
        if ctx.measure is None:  # timed on this machine: a calibration example of its table
            result.latency_structure = _latency_structure(comp, result, x, ctx)
        if on_latency is not None:
            on_latency({"latency_ms": lat.median_ms})
        del ptq
    result.measure_s = time.perf_counter() - t0

    # 3. budget gate
    violations = budget.violations(
        {"latency_ms": result.latency_ms, "size_mb": cost.size_mb, "mmacs": cost.mmacs}
    )
    result.meets_budget = not violations and (budget.latency_ms is None or result.latency_ms is not None)
    if not result.meets_budget:
        return result

    # 4. KD fine-tune with fake-quant
    with hold():
        student = comp.trainable(x, list(task.calibration_batches()))
        if comp.fp32_layers != result.fp32_layers:
            _record_cost(result, comp, x)
    history = result.history  # kept even when a report stops the fine-tune

    def report(step: int, accuracy: float) -> None:
        history.append((step, accuracy))
        ctx.report(step, accuracy)  # may raise StopTrial

    t0 = time.perf_counter()
    torch.set_num_threads(ctx.threads)
    try:
        tuned = finetune(
            student,
            task,
            candidate,
            cached_logits=ctx.cached_logits,
            report=report if ctx.report is not None else None,
            eval_every=ctx.eval_every,
            seed=ctx.seed,
            guard=guard,
            device=ctx.device,
        )
    except StopTrial:
        result.finetune_s = time.perf_counter() - t0
        result.state = State.PRUNED
        return result
    result.finetune_s = time.perf_counter() - t0
    result.finetune_device = tuned.device

    # 5. accuracy of what would be deployed
    t0 = time.perf_counter()
    with hold():
        lowered = lower(student)
        if ctx.artifact_dir:  # before compiling: Inductor's freezing rewrites the module's constants
            # (kept in every runtime: the runtime-neutral program `export`, other runtimes start from)
            save_deployable(lowered, x, Path(ctx.artifact_dir) / "model.pt2")
        if ctx.runtime != DEFAULT_RUNTIME:  # the runtime's own artifact, evaluated as shipped
            model = rt.build(lowered, x, threads=ctx.latency_threads)
            if ctx.artifact_dir:
                rt.save(model, ctx.artifact_dir)
    if ctx.runtime == DEFAULT_RUNTIME:
        # compiled, so that the int8 kernels run (uncompiled PT2E runs slow reference kernels)
        model = compile_cpu(lowered)
    result.accuracy, result.accuracy_se = task.evaluate(model, fixed_batch=True, guard=guard)
    result.evaluate_s = time.perf_counter() - t0
    return result


def _record_cost(result: TrialResult, comp: Compressed, x: torch.Tensor) -> Cost:
    """Static metrics and the per-layer plan of ``comp`` (at the bits it really gets) into ``result``."""
    cost = model_cost(comp.pruned, x, comp.bits)
    result.mmacs, result.bops, result.params, result.size_mb = (
        cost.mmacs, cost.bops, cost.params, cost.size_mb
    )
    result.fp32_layers = dict(comp.fp32_layers)
    result.uncounted_ops = dict(cost.uncounted_ops)
    result.layers = [
        {
            "layer": c.layer,
            "bits": comp.bits.get(c.layer, 32),
            "channels_before": c.before,
            "channels_after": c.after,
            "mmacs": cost.layer_macs.get(c.layer, 0.0) / 1e6,
        }
        for c in comp.prune_report.layers
    ]
    # the layers pruning leaves alone (the classifier head): in the plan too, with their bits
    listed = {c.layer for c in comp.prune_report.layers}
    for name, m in comp.pruned.named_modules():
        if name and name not in listed and isinstance(m, PRUNABLE):
            n = m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels
            result.layers.append({"layer": name, "bits": comp.bits.get(name, 32), "channels_before": n,
                                  "channels_after": n, "mmacs": cost.layer_macs.get(name, 0.0) / 1e6})
    return cost


def _latency_structure(comp: Compressed, result: TrialResult, x: torch.Tensor, ctx: TrialContext) -> dict:
    """The timed graph's :class:`~autoshrink.measure.calibration.Structure` (one batch-1 forward pass;
    the layers the runtime ran with a float kernel counted as fp32); empty if it cannot be made: a
    calibration example is a by-product, never a reason for a trial to fail."""
    from autoshrink.measure.calibration import structure
    from autoshrink.measure.predictor import machine_key

    bits = {**comp.bits, **dict.fromkeys(result.runtime_fp32_layers, 32)}
    try:
        return structure(comp.pruned, bits, x, machine_key(ctx.latency_threads, ctx.runtime)).to_dict()
    except Exception:  # noqa: BLE001
        return {}


def _bits_only(bits: dict[str, int]) -> Candidate:
    return Candidate(bits=bits, default_bits=32)


def save_deployable(lowered: torch.nn.Module, example_input: torch.Tensor, path: Path) -> Path:
    """Save the lowered model as a ``torch.export`` program (loads with torch alone:
    ``torch.export.load(path).module()``), written to a temporary name then renamed."""
    from autoshrink import _batches

    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_unused_weights_(lowered)
    batch = torch.export.Dim("batch", min=1, max=4096)
    args, kwargs, dynamic = _batches.export_args(_batches.batch_of_two(example_input), batch)
    ep = torch.export.export(lowered, args, kwargs, dynamic_shapes=dynamic, strict=False)
    with atomic_path(path) as tmp:
        torch.export.save(ep, tmp)
    return path


def _drop_unused_weights_(gm: torch.nn.Module) -> None:
    """Delete parameters and buffers no graph node reads (in place).

    After ``convert_pt2e`` the graph reads the quantized weight constants, but the original fp32
    weights stay attached to the module: exported as they are, a ResNet-18 at int8 weighed 56 MB
    instead of 11.6 MB, with identical outputs once they are gone.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        return
    gm.graph.eliminate_dead_code()
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]
    for name in names:
        if name in used or any(u.startswith(name + ".") for u in used):
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        delattr(owner, attr)
    gm.delete_all_unused_submodules()
    gm.recompile()
