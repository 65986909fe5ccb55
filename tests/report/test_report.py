from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autoshrink.frontier import near_ties, nearest_feasible, pareto_front, select_best
from autoshrink.report import (
    ParetoPlotData,
    front_table,
    pareto_plot_data,
    plan_table,
    plot_pareto,
    plot_pareto_html,
    trials_table,
    write_csv_atomic,
    write_report_md,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BUDGET = {"latency_ms": 5.0, "size_mb": 2.0}
TEACHER = {"accuracy": 98.0, "latency_ms": 12.0, "size_mb": 8.0, "mmacs": 300.0}
OBJ = {"accuracy": "max", "latency_ms": "min"}


def _trials(seed: int = 0, n: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    bits = rng.choice([4, 8, 32], n)
    prune = rng.choice([0.0, 0.25, 0.5], n)
    latency = 12.0 * (bits / 32.0) ** 0.5 * (1.0 - prune) + rng.uniform(0.2, 0.8, n)
    size = 8.0 * bits / 32.0 * (1.0 - prune) ** 2
    acc = 98.0 - 2.0 * (bits == 4) - 4.0 * prune ** 2 + rng.normal(0, 0.4, n)
    state = np.array(["COMPLETE"] * n, dtype=object)
    state[[3, 11]] = "FAIL"
    state[7] = "PRUNED"
    meets = (latency <= BUDGET["latency_ms"]) & (size <= BUDGET["size_mb"])
    acc = np.where(meets & (state == "COMPLETE"), acc, np.nan)  # missed budget: not fine-tuned
    df = pd.DataFrame(
        {
            "number": np.arange(n),
            "state": state,
            "accuracy": acc,
            "accuracy_se": np.where(np.isnan(acc), np.nan, 0.2),
            "latency_ms": latency,
            "size_mb": size,
            "mmacs": 300.0 * (1 - prune) ** 2,
            "bops": 300e6 * (1 - prune) ** 2 * bits * 8,
            "params": 2e6 * (1 - prune) ** 2,
            "meets_budget": meets,
            "finetune_s": np.where(np.isnan(acc), 0.0, 20.0),
            "error": "",
            "param_bits.layer1": bits,
            "param_prune.layer1": prune,
            "param_kd_temperature": 4.0,
            "param_kd_alpha": 0.7,
        }
    )
    df.loc[3, ["latency_ms", "size_mb", "mmacs", "bops", "params"]] = np.nan
    df["meets_budget"] = df["meets_budget"].astype(object)
    df.loc[3, "meets_budget"] = np.nan  # failed before it was measured
    df.loc[3, "error"] = "RuntimeError: shapes do not match | after pruning"
    df.loc[11, "error"] = "CUDA out of memory"
    return df


def test_pareto_plot_data_categories() -> None:
    df = _trials()
    data = pareto_plot_data(df, constraints=BUDGET, chosen=select_best(df, BUDGET))
    assert isinstance(data, ParetoPlotData)
    assert len(data.failed) == 3
    assert len(data.feasible) + len(data.infeasible) == 17
    assert data.feasible["meets_budget"].all() and not data.infeasible["meets_budget"].any()
    assert data.x_limit == 5.0 and data.y_limit is None
    assert data.front_is_curve
    assert data.front["latency_ms"].is_monotonic_increasing


def test_pareto_plot_data_unknown_axis() -> None:
    with pytest.raises(ValueError, match=r"cannot plot 'latency': it is not a column"):
        pareto_plot_data(_trials(), x="latency")


def test_plot_pareto_writes_png(tmp_path: Path) -> None:
    df = _trials()
    out = plot_pareto(df, tmp_path / "pareto.png", constraints=BUDGET,
                      chosen=select_best(df, BUDGET), teacher=TEACHER)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert out.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["pareto.png"]  # no temporary left behind


def test_plot_pareto_other_axes_and_three_objectives(tmp_path: Path) -> None:
    df = _trials(seed=1)
    out = plot_pareto(df, tmp_path / "size.png", x="size_mb", y="accuracy", constraints=BUDGET,
                      objectives={"accuracy": "max", "latency_ms": "min", "size_mb": "min"},
                      chosen=int(df.loc[df["accuracy"].idxmax(), "number"]))
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("states", [["FAIL"] * 4, ["FAIL", "PRUNED", "RUNNING", "WAITING"]])
def test_plot_pareto_all_failed_draws_empty_plot(tmp_path: Path, states: list[str]) -> None:
    df = pd.DataFrame({"number": range(4), "state": states, "accuracy": np.nan,
                       "latency_ms": np.nan, "error": "boom"})
    out = plot_pareto(df, tmp_path / "empty.png", constraints={"latency_ms": 5.0})
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_pareto_empty_dataframe(tmp_path: Path) -> None:
    df = pd.DataFrame(columns=["number", "state", "accuracy", "latency_ms"])
    assert plot_pareto(df, tmp_path / "none.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_pareto_html(tmp_path: Path) -> None:
    df = _trials()
    out = plot_pareto_html(df, tmp_path / "pareto.html", constraints=BUDGET,
                           chosen=select_best(df, BUDGET), teacher=TEACHER)
    html = out.read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<html") or "<!doctype" in html[:200].lower()
    # plotly's JSON escapes "/", "<", ">" and non-ASCII as \\uXXXX; undo that to read the text.
    html = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), html)
    for name in ("meets budget", "misses budget", "failed / pruned", "Pareto front", "teacher"):
        assert name in html
    assert "bits.layer1 = 4<br>" in html or "bits.layer1 = 8<br>" in html
    assert "kd_alpha = 0.7" in html
    assert "accuracy: 9" in html and "± 0.20%" in html
    assert "chosen #" in html
    assert "updatemenus" in html and "Model size (MB)" in html and "MACs (millions)" in html
    assert "shapes[0].x0" in html  # the budget line follows the x axis menu
    # plotly.js is inline (several MB), not loaded from a CDN: the file works offline.
    assert '<script src="http' not in html and len(html) > 1_000_000


def test_trials_table() -> None:
    from rich.console import Console

    table = trials_table(_trials())
    assert table.row_count == 20
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    text = console.file.getvalue()
    assert "FAIL" in text and "CUDA out of memory" in text and "± 0.20" in text


def test_front_table() -> None:
    df = _trials()
    table = front_table(df, OBJ)
    assert table.row_count == len(pareto_front(df, OBJ))
    assert "bits.layer1" not in [str(c.header) for c in table.columns]  # narrow by default
    wide = front_table(df, OBJ, params=True)
    assert "bits.layer1" in [str(c.header) for c in wide.columns]


def test_plan_table() -> None:
    layers = [
        {"layer": "conv1", "bits": 8, "channels_before": 64, "channels_after": 48,
         "macs_share": 0.4},
        {"layer": "fc", "bits": 32, "channels_before": 10, "channels_after": 10,
         "macs_share": None},
    ]
    assert plan_table(layers).row_count == 2
    with pytest.raises(ValueError, match=r"layers\[0\] has no 'bits'"):
        plan_table([{"layer": "x"}])


def test_write_report_md_chosen(tmp_path: Path) -> None:
    df = _trials()
    chosen = select_best(df, BUDGET)
    out = write_report_md(tmp_path / "report.md", teacher=TEACHER, chosen=chosen,
                          front=pareto_front(df, OBJ), constraints=BUDGET)
    text = out.read_text(encoding="utf-8")
    number = int(chosen["number"])
    assert f"## Chosen model: trial #{number}" in text
    speedup = TEACHER["latency_ms"] / chosen["latency_ms"]
    drop = TEACHER["accuracy"] - chosen["accuracy"]
    assert f"{speedup:.2f}× speed-up" in text
    assert f"{TEACHER['size_mb'] / chosen['size_mb']:.2f}× smaller" in text
    assert f"accuracy drop {drop:.2f} points" in text
    assert "| kd_temperature | 4 |" in text
    assert "![Pareto front" in text and "(pareto.png)" in text
    assert "No trial meets the budget" not in text
    # Every line of the front table has the same number of cells.
    front_lines = text.split("## Pareto front")[1].strip().splitlines()
    table = [line for line in front_lines if line.startswith("|")]
    assert len(table) == 2 + len(pareto_front(df, OBJ))
    assert len({line.count(" | ") for line in table}) == 1


def test_write_report_md_nothing_meets_the_budget(tmp_path: Path) -> None:
    df = _trials()
    tight = {"latency_ms": 0.5}
    assert select_best(df, tight) is None
    near = nearest_feasible(df, tight, k=3)
    out = write_report_md(tmp_path / "report.md", teacher=TEACHER, chosen=None,
                          front=pareto_front(df, OBJ), constraints=tight, nearest=near)
    text = out.read_text(encoding="utf-8")
    assert "## No trial meets the budget" in text
    first = near.iloc[0]
    cut = 100 * (1 - 0.5 / first["latency_ms"])
    assert f"needs {cut:.0f}% lower latency_ms" in text
    assert f"To accept trial #{int(first['number'])}, relax the budget" in text
    assert "## Chosen model" not in text


def test_write_report_md_nothing_measured(tmp_path: Path) -> None:
    out = write_report_md(tmp_path / "r.md", teacher={}, chosen=None, front=pd.DataFrame(),
                          constraints={"latency_ms": 1.0}, nearest=None)
    text = out.read_text(encoding="utf-8")
    assert "No trial meets the budget" in text and "nothing to compare" in text


def test_write_csv_atomic(tmp_path: Path) -> None:
    df = _trials()
    path = tmp_path / "sub" / "trials.csv"
    write_csv_atomic(df, path)
    write_csv_atomic(df.head(3), path)  # replaces the previous file
    back = pd.read_csv(path)
    assert len(back) == 3 and list(back.columns) == list(df.columns)
    assert [p.name for p in path.parent.iterdir()] == ["trials.csv"]


def test_write_csv_atomic_leaves_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "trials.csv"
    write_csv_atomic(pd.DataFrame({"a": [1]}), path)

    class Broken(pd.DataFrame):
        def to_csv(self, *args, **kwargs):  # noqa: ANN002, ANN003
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_csv_atomic(Broken({"a": [2]}), path)
    assert pd.read_csv(path)["a"].tolist() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["trials.csv"]


def test_write_report_md_points_at_a_near_tie(tmp_path: Path) -> None:
    df = pd.DataFrame({"number": [0, 1], "state": ["COMPLETE"] * 2, "accuracy": [95.42, 95.40],
                       "accuracy_se": [0.31, 0.31], "latency_ms": [2.25, 1.63], "size_mb": [11.2, 3.66]})
    chosen = select_best(df, {"latency_ms": 5.0})
    ties = near_ties(df, {"latency_ms": 5.0}, chosen)
    text = write_report_md(tmp_path / "report.md", teacher=TEACHER, chosen=chosen,
                           front=pareto_front(df, OBJ), constraints={"latency_ms": 5.0}, ties=ties).read_text()
    assert "Within one standard error (±0.31 points) of its accuracy and cheaper to run: trial #1 (95.40%, " in text
    assert f"`autoshrink export {tmp_path} --trial 1 -o OUT`" in text


def test_the_report_shows_test_accuracy_both_latencies_warnings_and_macs_at_least(tmp_path: Path) -> None:
    from autoshrink.finalists import effective_front, merge_deployed, merge_test_scores, with_effective_latency

    df = _trials()
    chosen_n = int(select_best(df, BUDGET)["number"])
    df["uncounted_ops"] = ""
    df.loc[df["number"] == chosen_n, "uncounted_ops"] = "aten::scaled_dot_product_attention x2"
    df = merge_deployed(df, {chosen_n: {"latency_ms_deployed": 4.2, "latency_deployed_p25_ms": 4.1,
                                        "latency_deployed_p75_ms": 4.3, "latency_deployed_p90_ms": 4.5}})
    scores = {chosen_n: {"test_accuracy": 93.25, "test_accuracy_se": 0.4}}
    df = with_effective_latency(merge_test_scores(df, scores), BUDGET)
    chosen = df[df["number"] == chosen_n].iloc[0]
    out = write_report_md(tmp_path / "report.md", teacher=TEACHER, chosen=chosen, front=effective_front(df, BUDGET),
                          constraints=BUDGET, warnings=["noisy machine: load average 3.00 on 2 cores"],
                          noise_note="within the noise: the budget 5 ms lies inside ...")
    text = out.read_text(encoding="utf-8")
    assert "test accuracy (the test split, never used to choose): **93.25 ± 0.40%**" in text
    assert "re-timed in a fresh process: **4.200 ms** (p25-p75 4.100-4.300 ms, p90 4.500 ms)" in text
    assert f"its gate timing before the fine-tune: {float(chosen['latency_ms']):.3f} ms" in text
    assert "- MACs at least" in text and "aten::scaled_dot_product_attention x2" in text
    assert "## Warnings\n\n- noisy machine: load average 3.00 on 2 cores" in text
    assert "**within the noise: the budget 5 ms" in text
    front = text.split("## Pareto front")[1]
    assert "test accuracy %" in front and "93.25 ± 0.40" in front and "deployed ms" in front and "4.200" in front
    assert "at least" in front  # the MMACs cell of the chosen trial


def test_the_plot_marks_the_gate_timing_of_re_timed_trials(tmp_path: Path) -> None:
    from autoshrink.finalists import EFFECTIVE, OBJECTIVES_EFFECTIVE, effective_constraints, with_effective_latency

    df = _trials()
    n = int(select_best(df, BUDGET)["number"])
    df["latency_ms_deployed"] = np.nan
    df.loc[df["number"] == n, "latency_ms_deployed"] = 4.4
    df = with_effective_latency(df, BUDGET)
    captured = {}
    import matplotlib.axes

    original = matplotlib.axes.Axes.scatter

    def spy(self, *args, **kwargs):
        captured.setdefault(kwargs.get("label"), args)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.axes.Axes, "scatter", spy)
        plot_pareto(df, tmp_path / "p.png", x=EFFECTIVE, constraints=effective_constraints(BUDGET),
                    objectives=OBJECTIVES_EFFECTIVE)
    gate = captured["gate timing of re-timed trials (1)"]
    assert list(gate[0]) == [pytest.approx(float(df.loc[df["number"] == n, "latency_ms"].iloc[0]))]
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


def test_the_budget_line_is_named_as_the_user_set_it_not_by_its_column():
    from autoshrink.report.formatting import limit_text
    from autoshrink.report.records import pareto_plot_data

    assert limit_text("latency_ms_effective", 5.0) == "Latency ≤ 5 ms"  # was 'latency_ms_effective ≤ 5'
    assert limit_text("latency_ms", 0.5) == "Latency ≤ 0.5 ms"
    assert limit_text("size_mb", 2.5) == "Model size ≤ 2.5 MB"
    df = pd.DataFrame({"number": [0], "state": ["COMPLETE"], "accuracy": [90.0], "latency_ms": [2.0],
                       "latency_ms_effective": [1.9]})
    data = pareto_plot_data(df, x="latency_ms_effective", constraints={"latency_ms_effective": 5.0})
    assert data.budget_text == "Latency ≤ 5 ms"  # the interactive plot's subtitle
