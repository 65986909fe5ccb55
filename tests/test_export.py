"""Exporting a trial's model and using it: a real tiny run, exported, loaded back with torch alone
(in another process), compiled as the search runs it, converted to ONNX; and the CLI's export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ray_up  # tests/conftest.py: the suite's one local Ray

import autoshrink as ash
from autoshrink.cli import main
from autoshrink.export import ExportError, agreement, load_deployable, load_program, to_onnx

INT8, FP32 = 0, 1  # trial numbers in the run below

# Loads model.pt2 with torch alone (no autoshrink import) and writes the logits on the inputs.
TORCH_ALONE = """
import sys, torch
import torch.ao.quantization.fx._decomposed  # registers the int8 quantize/dequantize ops
model = torch.export.load(sys.argv[1]).module()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])), sys.argv[3])
"""


@pytest.fixture(scope="module")
def run(tiny_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-run")
    ray_up()
    ash.sweep(
        tiny_task,
        [ash.Candidate.uniform(bits=8, prune=0.25, steps=20, batch_size=32),
         ash.Candidate.uniform(bits=32, steps=20, batch_size=32)],
        ash.Budget(latency_ms=100), workers=1, out=out, progress=False, latency_runs=10,
    )
    return out


@pytest.fixture(scope="module")
def val_inputs(tiny_task):
    return torch.cat([x for x, _ in tiny_task.loader("val", 256, shuffle=False)])


def test_export_writes_the_folder(run, tmp_path):
    result = ash.load(run)
    dest = result.export(INT8, tmp_path / "int8")
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "candidate.json", "metrics.json",
                                                     "model.pt2"]
    cand = ash.Candidate.from_json((dest / "candidate.json").read_text())
    assert cand == result.candidate(INT8) and cand.default_bits == 8 and cand.default_prune == 0.25
    metrics = json.loads((dest / "metrics.json").read_text())
    assert metrics["trial"]["number"] == INT8
    assert metrics["trial"]["accuracy"] == pytest.approx(result.trials.loc[INT8, "accuracy"])
    assert metrics["budget"] == {"latency_ms": 100.0}
    assert {"layer", "bits", "channels_before", "channels_after"} <= set(metrics["layers"][0])
    readme = (dest / "README.md").read_text()
    assert "torch.ao.quantization.fx._decomposed" in readme and "load_deployable" in readme


@pytest.mark.parametrize("number", [INT8, FP32])
def test_exported_model_predicts_as_the_run_measured(run, tiny_task, val_inputs, number, tmp_path):
    """Loaded with torch alone in a fresh process, the exported model predicts as the run's
    lowered model does, and its accuracy is the one the run recorded."""
    result = ash.load(run)
    dest = result.export(number, tmp_path / "model")
    torch.save(val_inputs, tmp_path / "x.pt")
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_ALONE, str(dest / "model.pt2"), str(tmp_path / "x.pt"),
         str(tmp_path / "logits.pt")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    eager = torch.load(tmp_path / "logits.pt")
    assert eager.shape == (len(val_inputs), 10)

    # the run's own lowered model (the trial's artifact), compiled as the run evaluated it
    original = load_deployable(run / "trials" / f"{number:04d}" / "model.pt2")
    with torch.no_grad():
        reference = original(val_inputs)
    agree = (eager.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agree >= 0.99

    recorded = result.trials.loc[number, "accuracy"]
    accuracy, _ = tiny_task.evaluate(load_deployable(dest / "model.pt2"), fixed_batch=True)
    assert accuracy == pytest.approx(recorded, abs=0.5)
    targets = torch.cat([y for _, y in tiny_task.loader("val", 256, shuffle=False)])
    eager_accuracy = 100.0 * (eager.argmax(1) == targets).float().mean().item()
    assert eager_accuracy == pytest.approx(recorded, abs=0.5)


@pytest.mark.parametrize("number", [INT8, FP32])
def test_onnx_export(run, val_inputs, number, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    dest = ash.load(run).export(number, tmp_path / "model", onnx=True)
    model = onnx.load(str(dest / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    ops = {node.op_type for node in model.graph.node}
    assert "Conv" in ops and "Gemm" in ops
    if number == INT8:  # QDQ: the int8 program as QuantizeLinear / DequantizeLinear
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        weights = [init for init in model.graph.initializer if init.data_type == onnx.TensorProto.INT8]
        assert weights, "int8 weights are stored as int8 initializers"
    else:
        assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # the batch dimension stays dynamic
    assert "model.onnx" in (dest / "README.md").read_text()

    # the ONNX graph computes what the PT2 program does (onnxruntime if present, else onnx.reference)
    x = val_inputs[:32]
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(dest / "model.onnx"))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        got = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = load_program(dest / "model.pt2").module()(x)
    # int8 kernels round at quantize steps unlike the reference ops: a near tie may flip (agreement)
    assert agreement(expected.numpy(), got) >= 0.99


def test_to_onnx_compares_on_an_example_input(run, val_inputs, tmp_path):
    pytest.importorskip("onnx")
    path = to_onnx(run / "trials" / f"{INT8:04d}" / "model.pt2", tmp_path / "m.onnx", val_inputs[:16])
    assert path.is_file() and not list(tmp_path.glob(".*tmp*"))


def test_cli_export(run, tmp_path, capsys):
    assert main(["export", str(run), "--trial", str(INT8), "-o", str(tmp_path / "a"), "--onnx"]) == 0
    assert (tmp_path / "a" / "model.pt2").is_file() and (tmp_path / "a" / "model.onnx").is_file()
    assert "model.onnx" in capsys.readouterr().out
    # without --trial: the best trial
    assert main(["export", str(run), "-o", str(tmp_path / "b")]) == 0
    best = int(ash.load(run).best["number"])
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["trial"]["number"] == best


def test_export_errors(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("best"))
    (copy / "trials" / f"{FP32:04d}" / "model.pt2").unlink()
    result = ash.load(copy)
    with pytest.raises(ValueError, match=r"trial 1 has no saved model \(state COMPLETE\)"):
        result.export(FP32, tmp_path / "x")
    with pytest.raises(ValueError, match="no trial 99 in"):
        result.export(99, tmp_path / "x")
    assert main(["export", str(copy), "--trial", str(FP32), "-o", str(tmp_path / "x")]) == 2
    assert "trial 1 has no saved model" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no study.db here"):
        ash.load(tmp_path / "missing")
    assert main(["export", str(tmp_path / "missing"), "-o", str(tmp_path / "x")]) == 2
    assert "no study.db here; is this an autoshrink run folder?" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model file"):
        load_deployable(tmp_path / "model.pt2")
    (tmp_path / "bad.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(ExportError, match="not a loadable torch.export program"):
        load_program(tmp_path / "bad.pt2")


class _NarrowActivations(torch.nn.Module):
    """Quantizes activations to [-8, 7] in int8: ONNX QuantizeLinear cannot clamp there."""

    def forward(self, x):
        ops = torch.ops.quantized_decomposed
        q = ops.quantize_per_tensor.default(x, 0.1, 0, -8, 7, torch.int8)
        return ops.dequantize_per_tensor.default(q, 0.1, 0, -8, 7, torch.int8)


def test_to_onnx_refuses_what_onnx_cannot_express(tmp_path):
    pytest.importorskip("onnx")
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    ep = torch.export.export(_NarrowActivations(), (torch.randn(2, 4),))
    torch.export.save(ep, tmp_path / "narrow.pt2")
    with pytest.raises(ExportError, match=r"quantizes activations to \[-8, 7\].*full torch.int8 range"):
        to_onnx(tmp_path / "narrow.pt2", tmp_path / "narrow.onnx")
    assert not (tmp_path / "narrow.onnx").exists()


def test_a_near_tie_flipped_by_rounding_agrees_and_a_different_model_does_not():
    import numpy as np

    expected = np.array([[5.0, 1.0, 0.0], [2.00, 2.01, -3.0], [0.0, 4.0, 1.0]])
    rounded = expected + np.array([[0.01, 0.0, 0.0], [0.02, -0.01, 0.0], [0.0, 0.0, 0.01]])
    assert rounded[1].argmax() != expected[1].argmax() and agreement(expected, rounded) == 1.0
    other = expected[:, ::-1].copy()  # another model: far apart, not a tie
    assert agreement(expected, other) < 0.99
    close_but_wrong = expected.copy()
    close_but_wrong[0] = [1.0, 5.0, 0.0]  # one clear flip, the rest identical
    assert agreement(expected, close_but_wrong) == 2 / 3
