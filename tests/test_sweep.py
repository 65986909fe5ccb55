"""`grid` and `sweep`: given configurations evaluated as search trials, stored as a run folder."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import ray_up  # tests/conftest.py: the suite's one local Ray

import autoshrink as ash
from autoshrink.cli import main
from autoshrink.record import State, StudyAttr, TrialAttr
from autoshrink.result import COLUMNS, EXTRA
from autoshrink.sweep import candidate_params, start_order

SEARCH_COLUMNS = ["number", "state", "accuracy", "latency_ms", "size_mb", "mmacs", "bops", "params",
                  "meets_budget", "finetune_s", "error"]


def test_grid_sizes_and_values():
    cands = ash.grid(bits=[8, 32], prune=[0, 0.25, 0.5])
    assert len(cands) == 6
    assert [(c.default_bits, c.default_prune) for c in cands] == [
        (8, 0), (8, 0.25), (8, 0.5), (32, 0), (32, 0.25), (32, 0.5)]
    assert all(isinstance(c, ash.Candidate) for c in cands)
    assert all(c.kd_temperature == 4.0 and c.kd_alpha == 0.7 and c.round_to == 8 for c in cands)
    assert len(ash.grid()) == 1
    many = ash.grid(bits=[4, 8], prune=[0.0], temperature=[2.0, 4.0], alpha=[0.5], steps=[10, 20, 30],
                    lr=[0.01], batch_size=16, round_to=None)
    assert len(many) == 2 * 2 * 3
    assert {(c.default_bits, c.kd_temperature, c.finetune_steps) for c in many} == {
        (b, t, s) for b in (4, 8) for t in (2.0, 4.0) for s in (10, 20, 30)}
    assert all(c.batch_size == 16 and c.round_to is None for c in many)
    assert ash.grid(bits=[]) == []


def test_candidate_params_describe_a_candidate():
    cand = ash.Candidate(bits={"fc": 32}, prune={"layer1.*": 0.5}, default_bits=8)
    assert candidate_params(cand) == {
        "bits": 8, "prune": 0.0, "kd_temperature": cand.kd_temperature, "kd_alpha": cand.kd_alpha,
        "finetune_steps": cand.finetune_steps, "lr": cand.lr, "bits.fc": 32, "prune.layer1.*": 0.5,
    }


def test_sweep_rejects_what_is_not_a_candidate(tiny_task, tmp_path):
    with pytest.raises(TypeError, match=r"candidates\[1\] is a dict, not an autoshrink.Candidate"):
        ash.sweep(tiny_task, [ash.Candidate(), {"bits": 8}], out=tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="no candidates to evaluate"):
        ash.sweep(tiny_task, [], out=tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def swept(tiny_task, tmp_path_factory):
    """An int8 candidate within 0.05 MB, and an fp32 one over it (measured, not fine-tuned)."""
    out = tmp_path_factory.mktemp("sweep")
    ray_up()
    df = ash.sweep(tiny_task, ash.grid(bits=[8, 32], steps=[10], batch_size=32),
                   ash.Budget(size_mb=0.05), workers=1, out=out, progress=False, latency_runs=10)
    return df, out


def test_sweep_returns_the_trials_of_a_search(swept):
    df, out = swept
    assert list(df.columns[: len(COLUMNS + EXTRA)]) == COLUMNS + EXTRA
    assert set(SEARCH_COLUMNS) <= set(df.columns)
    assert df["number"].tolist() == [0, 1] and df["candidate_index"].tolist() == [0, 1]
    assert df["state"].tolist() == [State.COMPLETE, State.COMPLETE], df["error"].tolist()
    int8, fp32 = df.iloc[0], df.iloc[1]
    assert int8["meets_budget"] and int8["size_mb"] <= 0.05
    assert 0 <= int8["accuracy"] <= 100 and int8["finetune_s"] > 0 and int8["latency_ms"] > 0
    # over the size budget: its cost is measured, it is never fine-tuned
    assert not fp32["meets_budget"] and fp32["size_mb"] > 0.05
    assert pd.isna(fp32["accuracy"]) and fp32["finetune_s"] == 0
    # where each fine-tune ran (none for the one never fine-tuned), also in trials.csv
    assert int8[TrialAttr.FINETUNE_DEVICE] == "cpu" and pd.isna(fp32[TrialAttr.FINETUNE_DEVICE])
    assert pd.read_csv(out / "trials.csv")[TrialAttr.FINETUNE_DEVICE].fillna("").tolist() == ["cpu", ""]
    assert fp32["mmacs"] > 0 and fp32["params"] == int8["params"]  # neither is pruned


def test_sweep_param_columns_describe_the_candidates(swept):
    df, _ = swept
    params = sorted(c for c in df.columns if c.startswith("param_"))
    assert params == ["param_bits", "param_finetune_steps", "param_kd_alpha", "param_kd_temperature",
                      "param_lr", "param_prune"]
    assert df["param_bits"].tolist() == [8, 32]
    assert df["param_prune"].tolist() == [0.0, 0.0]
    assert df["param_finetune_steps"].tolist() == [10, 10]
    assert df["param_kd_temperature"].tolist() == [4.0, 4.0]


def test_sweep_is_a_run_folder(swept):
    df, out = swept
    assert df.attrs["out"] == str(out)
    for name in ("study.db", "trials.csv", "pareto.png", "pareto.html", "report.md", "best/model.pt2"):
        assert (out / name).is_file(), name
    result = ash.load(df.attrs["out"])
    pd.testing.assert_frame_equal(result.trials, df, check_like=False)
    assert result.meta["kind"] == "sweep" and result.budget == ash.Budget(size_mb=0.05)
    assert (result.meta[StudyAttr.DEVICE], result.meta[StudyAttr.GPUS_PER_TRIAL]) == ("cpu", 0.0)
    assert ("Fine-tuned on cpu; latency timed on the CPU of each trial's machine (runtime inductor)."
            in (out / "report.md").read_text())
    assert result.teacher["accuracy"] > 0 and result.teacher["latency_ms"] > 0
    assert int(result.best["number"]) == 0
    assert result.candidate(1) == ash.grid(bits=[32], steps=[10], batch_size=32)[0]


def test_show_and_pareto_on_a_sweep(swept, tmp_path, capsys, monkeypatch):
    _, out = swept
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["show", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 trials: 2 complete (1 missed the budget, not fine-tuned)" in text
    assert "Chosen: trial #0" in text and "Compression plan of trial #0" in text
    assert "Fine-tuned on cpu; latency timed on the CPU of each trial's machine" in text
    assert main(["pareto", str(out), "--plot", str(tmp_path / "p.png"),
                 "--html", str(tmp_path / "p.html")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "bits = 32" in (tmp_path / "p.html").read_text()


def test_start_order_puts_the_longest_fine_tunes_first_only_with_several_workers(tiny_task):
    cands = [ash.Candidate.uniform(bits=8, prune=0.5, steps=100), ash.Candidate.uniform(bits=8, prune=0.0, steps=100),
             ash.Candidate.uniform(bits=8, prune=0.25, steps=100), ash.Candidate.uniform(bits=8, prune=0.5, steps=100)]
    assert start_order(tiny_task, cands, workers=1) == [0, 1, 2, 3]
    assert start_order(tiny_task, cands[:2], workers=2) == [0, 1]
    assert start_order(tiny_task, cands, workers=2) == [1, 2, 0, 3]  # equal work keeps its order
