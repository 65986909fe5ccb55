"""`SearchResult`: a finished or interrupted run, reopened from its storage; writing its files.

Everything here reads the Optuna study (the one record of the run) and the run folder; nothing
needs Ray, and only :meth:`SearchResult.export` touches model files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from autoshrink._files import atomic_path, write_text_atomic
from autoshrink.budget import Budget
from autoshrink.errors import InputError, RunNotFoundError
from autoshrink.record import Reason, State, StudyAttr, TrialAttr

__all__ = ["FINALIST_COLUMNS", "SearchResult", "finalist_frame", "load", "measure_teacher", "trials_frame"]

COLUMNS = [
    "number", "state", "accuracy", "accuracy_se", "latency_ms", "size_mb", "mmacs", "bops",
    "params", "meets_budget", "finetune_s", "error",
]
EXTRA = ["latency_iqr_ms", "compress_s", "measure_s", "evaluate_s", TrialAttr.PREDICTED_LATENCY_MS]
#: text columns beyond those (never read as numbers)
TEXT_EXTRA = [TrialAttr.FINETUNE_DEVICE]
#: which runtime timed each trial (text, text, integer), after the other columns
RUNTIME_COLUMNS = [TrialAttr.RUNTIME, TrialAttr.RUNTIME_VERSION, TrialAttr.LATENCY_THREADS]
#: a trial's artifact files in a runtime other than Inductor (model.pt2 is always there)
RUNTIME_ARTIFACTS = ("model.onnx", "model.xml", "model.bin")
#: after the trials (finalists, merged from study attributes by :func:`load`): the shipped artifact
#: re-timed, the figure that decides, and the test split
FINALIST_COLUMNS = [
    "latency_ms_deployed", "latency_deployed_p25_ms", "latency_deployed_p75_ms", "latency_deployed_p90_ms",
    "latency_deployed_ci_low_ms", "latency_deployed_ci_high_ms", "latency_ms_effective", "latency_source",
    "meets_budget_gate", "test_accuracy", "test_accuracy_se", TrialAttr.UNCOUNTED_OPS,
]


def measure_teacher(task, latency_threads: int = 1, latency_runs: int = 60, *, runtime: str = "inductor") -> dict:
    """The teacher's figures: see :func:`autoshrink.measure.teacher.measure_teacher` (measuring lives there)."""
    from autoshrink.measure.teacher import measure_teacher as measure

    return measure(task, latency_threads, latency_runs, runtime=runtime)


def trials_frame(study) -> pd.DataFrame:
    """One row per trial with the DESIGN.md columns, extra timings, and ``param_*`` columns.

    Trials a warm start copied from an earlier study (``TrialAttr.WARM_FROM``) are left out: they
    informed the sampler only, and their models live in the earlier run (``StudyAttr.WARM_START``
    says how many there were)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if TrialAttr.WARM_FROM in a:
            continue
        row: dict[str, Any] = {"number": t.number, "state": State.of(t).value}
        for key in COLUMNS[2:] + EXTRA + TEXT_EXTRA + RUNTIME_COLUMNS:
            row[key] = a.get(key)
        if row["state"] == State.FAIL and not row["error"]:
            row["error"] = Reason.NO_REASON
        if row["finetune_s"] is None and t.state.is_finished():
            row["finetune_s"] = 0.0
        # a search samples Optuna params; a sweep records its given candidates' values
        for name, value in (t.params or a.get(TrialAttr.CANDIDATE_PARAMS, {})).items():
            row[f"param_{name}"] = value
        uncounted = a.get(TrialAttr.UNCOUNTED_OPS) or {}
        # operator -> calls fvcore did not count (mmacs is then a lower bound); "" when none
        row[TrialAttr.UNCOUNTED_OPS] = "; ".join(f"{op} x{n}" for op, n in sorted(uncounted.items()))
        if TrialAttr.CANDIDATE_INDEX in a:  # a sweep's trial: the position of its candidate in the list given
            row[TrialAttr.CANDIDATE_INDEX] = a[TrialAttr.CANDIDATE_INDEX]
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else COLUMNS)
    for col in COLUMNS + EXTRA + TEXT_EXTRA:
        if col not in df:
            df[col] = None
    num = [c for c in COLUMNS + EXTRA if c not in ("state", "error", "meets_budget", "number")]
    df[num] = df[num].apply(pd.to_numeric, errors="coerce")
    df["error"] = df["error"].fillna("").astype(str)
    for col in RUNTIME_COLUMNS:
        if col not in df:
            df[col] = None
    if TrialAttr.UNCOUNTED_OPS not in df:
        df[TrialAttr.UNCOUNTED_OPS] = ""
    ordered = (COLUMNS + EXTRA + TEXT_EXTRA + RUNTIME_COLUMNS + [TrialAttr.UNCOUNTED_OPS]
               + sorted(c for c in df.columns if c.startswith("param_")))
    ordered += [TrialAttr.CANDIDATE_INDEX] if TrialAttr.CANDIDATE_INDEX in df.columns else []
    return df[ordered].sort_values("number").reset_index(drop=True)


def finalist_frame(df: pd.DataFrame, attrs: dict, budget: Budget) -> pd.DataFrame:
    """``df`` with the finalists' figures stored on the study merged in: the deployed latency and
    its spread, the effective latency and its source, ``meets_budget`` on it (the trial's own
    verdict kept as ``meets_budget_gate``), and the test-split scores (see :mod:`autoshrink.finalists`)."""
    from autoshrink.finalists import merge_deployed, merge_test_scores, with_effective_latency

    known = set(pd.to_numeric(df["number"], errors="coerce").dropna().astype(int))
    # a figure for a trial not in this frame (a partly recovered study) is dropped, not fatal
    deployed = {k: v for k, v in (attrs.get(StudyAttr.DEPLOYED) or {}).items() if int(k) in known}
    scores = {k: v for k, v in (attrs.get(StudyAttr.TEST_SCORES) or {}).items() if int(k) in known}
    out = merge_test_scores(merge_deployed(df, deployed), scores)
    out = with_effective_latency(out, budget.constraints())
    return out[[c for c in out.columns if c not in FINALIST_COLUMNS] + [c for c in FINALIST_COLUMNS if c in out]]


@dataclass
class SearchResult:
    """A run: its trials, the Pareto front, the chosen trial, and how to plot and export them.

    Attributes:
        out: the run folder.
        trials: one row per trial (``number, state, accuracy, latency_ms, ...``).
        teacher: the teacher's figures (``accuracy``, ``latency_ms`` compiled fp32, ...).
        budget: the limits the search ran under.
        max_drop: accuracy-constraint mode (points below the teacher), or None.
    """

    out: Path
    trials: pd.DataFrame
    teacher: dict = field(default_factory=dict)
    budget: Budget = field(default_factory=Budget)
    max_drop: float | None = None
    meta: dict = field(default_factory=dict)
    _study: Any = None

    @property
    def frontier(self) -> pd.DataFrame:
        """The Pareto-optimal trials (accuracy up, latency down) among those fine-tuned, on the
        effective latency (``latency_ms_deployed`` where re-timed as shipped, else ``latency_ms``)."""
        from autoshrink.finalists import effective_front

        done = self.trials[self.trials["state"] == State.COMPLETE]
        return effective_front(done, self.budget.constraints())

    @property
    def best(self) -> pd.Series | None:
        """The most accurate trial that meets the budget (with ``max_drop``: the fastest one
        within that many points of the teacher), judged on the effective latency; None if no
        trial qualifies."""
        from autoshrink.finalists import choose

        return choose(
            self.trials, self.budget.constraints(), max_drop=self.max_drop,
            reference_accuracy=self.teacher.get("accuracy"),
        )

    @property
    def warnings(self) -> list[str]:
        """Degradations a user must hear (the study's ``WARNINGS``: a check that could not run, a
        finalist that could not be re-timed, a noisy machine, ...), in the order they arose."""
        return list(self.meta.get(StudyAttr.WARNINGS) or [])

    def noise_note(self) -> str | None:
        """"within the noise" when the latency budget lies inside the chosen model's re-timed
        spread (see :func:`autoshrink.finalists.noise_note`), else None."""
        from autoshrink.finalists import noise_note

        return noise_note(self.best, self.budget.latency_ms)

    def hypervolume(self, reference: dict[str, float]) -> float:
        """Hypervolume of the trials on accuracy and the effective latency (``reference`` names
        ``accuracy`` and ``latency_ms``)."""
        from autoshrink.finalists import effective_hypervolume

        done = self.trials[self.trials["state"] == State.COMPLETE]
        return effective_hypervolume(done, reference, self.budget.constraints())

    @property
    def baseline(self) -> tuple[pd.Series, str] | None:
        """The hand baseline and how it was made: uniform int8 at the smallest uniform pruning
        ratio found to meet the budget before the search (``budget_edge``), tried as trial 0.
        None when no such trial exists or it did not complete within the budget."""
        edge = (self.meta.get(StudyAttr.BUDGET_EDGE) or {}).get("prune")
        if edge is None or self.trials.empty:
            return None
        rows = self.trials[self.trials["number"] == 0]
        if rows.empty:
            return None
        row = rows.iloc[0]
        if row.get("state") != State.COMPLETE or not row.get("meets_budget") == True or pd.isna(row.get("accuracy")):  # noqa: E712
            return None
        how = "unpruned" if edge == 0 else f"pruned {edge:.1%}"
        return row, f"uniform int8, {how}: the least uniform pruning that meets the budget"

    def near_ties(self, k: int = 3) -> pd.DataFrame:
        """Trials within one standard error of the chosen model's accuracy that are no slower and
        no larger, and faster or smaller (see :func:`autoshrink.frontier.near_ties`); none with
        ``max_drop``, whose choice is already the fastest."""
        from autoshrink.finalists import effective_near_ties

        best = self.best
        if best is None or self.max_drop is not None:
            return self.trials.iloc[:0]
        return effective_near_ties(self.trials, self.budget.constraints(), best, k=k)

    def nearest(self, k: int = 3) -> pd.DataFrame:
        """When nothing meets the budget: the trials closest to it."""
        from autoshrink.frontier import nearest_feasible

        return nearest_feasible(self.trials, self.budget.constraints(), k=k)

    def candidate(self, number: int):
        """The :class:`~autoshrink.candidate.Candidate` of trial ``number``."""
        from autoshrink.candidate import Candidate

        path = self.out / "trials" / f"{int(number):04d}" / "candidate.json"
        if path.is_file():
            return Candidate.from_json(path.read_text())
        if self._study is not None:
            for t in self._study.get_trials(deepcopy=False):
                if t.number == int(number) and TrialAttr.CANDIDATE in t.user_attrs:
                    return Candidate.from_dict(t.user_attrs[TrialAttr.CANDIDATE])
        raise KeyError(f"no candidate recorded for trial {number} in {self.out}")

    def layer_plan(self, number: int) -> list[dict]:
        """Per-layer plan of a trial: layer, bits, channels before -> after, ``macs_share`` (its
        fraction of the compressed model's MACs; a proxy for where time goes, not a timing)."""
        if self._study is None:
            return []
        for t in self._study.get_trials(deepcopy=False):
            if t.number == int(number):
                layers = t.user_attrs.get(TrialAttr.LAYERS, [])
                total = sum(layer.get("mmacs", 0.0) for layer in layers) or 1.0
                return [dict(layer, macs_share=layer.get("mmacs", 0.0) / total) for layer in layers]
        return []

    def left_alone(self, number: int) -> dict:
        """What a trial's compression left alone, and why: ``unpruned_groups`` (``[{"layers": [...],
        "reason": ...}]``), ``fp32_layers`` (layer -> reason) and ``skipped_layers`` (layer -> reason)."""
        keys = (TrialAttr.UNPRUNED_GROUPS, TrialAttr.FP32_LAYERS, TrialAttr.SKIPPED_LAYERS)
        if self._study is not None:
            for t in self._study.get_trials(deepcopy=False):
                if t.number == int(number):
                    return {k: t.user_attrs.get(k) or ([] if k == TrialAttr.UNPRUNED_GROUPS else {}) for k in keys}
        return {TrialAttr.UNPRUNED_GROUPS: [], TrialAttr.FP32_LAYERS: {}, TrialAttr.SKIPPED_LAYERS: {}}

    # -- outputs --------------------------------------------------------------------------------
    def plot(self, path: str | os.PathLike, *, html: str | os.PathLike | None = None) -> Path:
        """Draw the Pareto plot (PNG), and the interactive one if ``html`` is given."""
        from autoshrink.finalists import EFFECTIVE, OBJECTIVES_EFFECTIVE, effective_constraints
        from autoshrink.report import plot_pareto, plot_pareto_html

        best = self.best
        chosen = None if best is None else int(best["number"])
        teacher = ({"accuracy": self.teacher.get("accuracy"), EFFECTIVE: self.teacher.get("latency_ms")}
                   if self.teacher else None)
        # re-timed trials sit at their deployed figure; their gate figure is drawn hollow, linked to it
        limits = effective_constraints(self.budget.constraints())
        plot_pareto(self.trials, path, x=EFFECTIVE, constraints=limits, chosen=chosen,
                    teacher=teacher, objectives=OBJECTIVES_EFFECTIVE)
        if html is not None:
            plot_pareto_html(self.trials, html, x=EFFECTIVE, constraints=limits,
                             chosen=chosen, teacher=teacher, objectives=OBJECTIVES_EFFECTIVE)
        return Path(path)

    def export(self, row: pd.Series | int | None, path: str | os.PathLike, *, onnx: bool = False) -> Path:
        """Write a trial's deployable model to folder ``path``.

        Writes ``model.pt2`` (the lowered int8 program; load it with
        :func:`autoshrink.export.load_deployable`), ``candidate.json``, ``metrics.json``,
        ``README.md`` (how to load it with torch alone), and with ``onnx=True`` ``model.onnx``
        (QDQ, :func:`autoshrink.export.to_onnx`). A trial timed in ONNX Runtime or OpenVINO also
        ships that runtime's artifact (``model.onnx``, ``model.xml``/``model.bin``), and the README
        shows how to run it with that runtime alone, as it was timed.

        Raises:
            ValueError: no trial given and none meets the budget, or the trial has no saved model.
            autoshrink.export.ExportError: ``onnx=True`` and the program cannot be converted.
            ImportError: ``onnx=True`` without the ``onnx`` extra installed.
        """
        if row is None:
            row = self.best
            if row is None:
                raise InputError("no trial meets the budget; pass a trial number to export one anyway")
        number = int(row["number"]) if isinstance(row, pd.Series) else int(row)
        match = self.trials[self.trials["number"] == number]
        if match.empty:
            raise InputError(f"no trial {number} in {self.out}")
        src = self.out / "trials" / f"{number:04d}" / "model.pt2"
        if not src.is_file():
            state = match.iloc[0]["state"]
            raise InputError(
                f"trial {number} has no saved model (state {state}"
                f"{', missed the budget' if match.iloc[0]['meets_budget'] is False else ''}); "
                "only fine-tuned trials that met the budget are saved"
            )
        dest = Path(path)
        with atomic_path(dest / "model.pt2") as tmp:
            shutil.copyfile(src, tmp)
        for name in RUNTIME_ARTIFACTS:  # the runtime's own artifact, as timed and evaluated
            if (src.parent / name).is_file():
                with atomic_path(dest / name) as tmp:
                    shutil.copyfile(src.parent / name, tmp)
        write_text_atomic(dest / "candidate.json", self.candidate(number).to_json())
        metrics = {k: _plain(v) for k, v in match.iloc[0].to_dict().items()}
        chosen = self.best
        note = self.noise_note() if chosen is not None and int(chosen["number"]) == number else None
        write_text_atomic(dest / "metrics.json", json.dumps(
            {"trial": metrics, "teacher": self.teacher, "budget": self.budget.constraints(),
             "layers": self.layer_plan(number), "noise_note": note, StudyAttr.WARNINGS: self.warnings,
             StudyAttr.MACHINE_LOAD: self.meta.get(StudyAttr.MACHINE_LOAD)}, indent=2, default=str))
        if onnx:  # before the README, which then names model.onnx only if it was written
            from autoshrink.export import to_onnx

            to_onnx(dest / "model.pt2", dest / "model.onnx")
        readme = _export_readme(number, metrics, self.teacher, onnx=onnx)
        write_text_atomic(dest / "README.md", readme + _runtime_readme(metrics, dest))
        return dest

    def write(self) -> dict[str, Path]:
        """Write ``trials.csv``, ``pareto.png``, ``pareto.html``, ``report.md`` and ``best/``."""
        from autoshrink.report import where_text, write_csv_atomic, write_report_md

        files = {}
        files["trials"] = self.out / "trials.csv"
        write_csv_atomic(self.trials, files["trials"])
        files["plot"] = self.plot(self.out / "pareto.png", html=self.out / "pareto.html")
        best = self.best
        if best is not None:
            try:
                files["best"] = self.export(best, self.out / "best")
            except (ValueError, KeyError) as exc:  # its model.pt2 or candidate.json is gone: said, and kept
                line = f"best/ not written: trial {int(best['number'])} was chosen but cannot be exported ({exc})"
                print(f"warning: {line}", file=sys.stderr)
                self._warn(line)
        files["report"] = self.out / "report.md"
        write_report_md(
            files["report"], teacher=self.teacher, chosen=best, front=self.frontier,
            constraints=self.budget.constraints(), plot_name="pareto.png",
            nearest=self.nearest() if best is None else None, baseline=self.baseline,
            ties=self.near_ties() if best is not None else None,
            where=where_text(self.trials, self.meta),
            left_alone=self.left_alone(int(best["number"])) if best is not None else None,
            warnings=self.warnings, noise_note=self.noise_note(),
        )
        return files

    def _warn(self, line: str) -> None:
        """Keep ``line`` with the run's warnings (in ``meta`` and, when open, the study)."""
        have = self.warnings
        if line in have:
            return
        self.meta[StudyAttr.WARNINGS] = have + [line]
        if self._study is not None:
            self._study.set_user_attr(StudyAttr.WARNINGS, have + [line])


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _runtime_readme(m: dict, dest: Path) -> str:
    """The README section for a trial timed in ONNX Runtime or OpenVINO: how to run its artifact
    with that runtime alone, set up as it was timed (empty for Inductor: the section above)."""
    from autoshrink.runtimes import MissingRuntimeError, usage_snippet

    runtime = m.get(TrialAttr.RUNTIME)
    if not runtime or runtime == "inductor" or not any((dest / n).is_file() for n in RUNTIME_ARTIFACTS):
        return ""
    threads = int(m.get(TrialAttr.LATENCY_THREADS) or 1)
    head = (f"\n## In {runtime}\n\nThe search timed and evaluated this model in {runtime} "
            f"{m.get(TrialAttr.RUNTIME_VERSION) or ''} ({threads} thread(s), batch 1); run it with {runtime} alone:\n")
    try:
        code = usage_snippet(runtime, ".", threads)
    except (MissingRuntimeError, ValueError) as exc:
        return head + f"\n({exc})\n"
    return head + f"\n```python\n{code}```\n"


def _export_readme(number: int, m: dict, teacher: dict, onnx: bool = False) -> str:
    def num(d: dict, key: str, fmt: str) -> str:
        v = d.get(key)
        return "?" if v is None else format(v, fmt)

    onnx_text = """
`model.onnx` is the same int8 program as a QDQ ONNX graph (QuantizeLinear / DequantizeLinear around
Conv / Gemm, dynamic batch), for ONNX Runtime or TensorRT.
""" if onnx else ""
    return f"""# autoshrink export: trial {number}

| | this model | teacher |
| --- | ---: | ---: |
| accuracy (%) | {num(m, 'accuracy', '.2f')} ± {num(m, 'accuracy_se', '.2f')} | {num(teacher, 'accuracy', '.2f')} |
| latency, batch 1 (ms) | {num(m, 'latency_ms', '.3f')} | {num(teacher, 'latency_ms', '.3f')} (fp32, compiled) |
| size (MB) | {num(m, 'size_mb', '.3f')} | {num(teacher, 'size_mb', '.3f')} |

`model.pt2` is the lowered int8 program (a `torch.export` archive). Load and run it with torch
alone; the int8 kernels need `torch.compile` with Inductor freezing on (uncompiled, the program
runs slow reference kernels):

```python
import torch
import torch.ao.quantization.fx._decomposed  # registers the int8 quantize/dequantize ops
torch._inductor.config.freezing = True
model = torch.compile(torch.export.load("model.pt2").module())
with torch.no_grad():
    logits = model(x)   # x: a batch shaped like the training inputs
```

or, with autoshrink installed, `model = autoshrink.export.load_deployable("model.pt2")` (the same).
{onnx_text}
`candidate.json` is the configuration (`autoshrink.Candidate.from_json`); apply it to your own
copy of the model with `autoshrink.apply(model, candidate, example_input)`. `metrics.json` holds
the trial's measurements, the teacher's, the budget and the per-layer plan.
"""


def load(
    out: str | os.PathLike,
    *,
    storage: str | None = None,
    study_name: str = "autoshrink",
    max_drop: float | None = None,
) -> SearchResult:
    """Reopen a run folder (finished or interrupted) as a :class:`SearchResult`.

    Raises:
        FileNotFoundError: no ``study.db`` in the folder and no storage given.
        ValueError: the storage holds no such study.

    Example:
        >>> result = load("runs/demo")   # doctest: +SKIP
        >>> result.best                  # doctest: +SKIP
    """
    import optuna

    from autoshrink.store import check_store

    out = Path(out)
    check_store(out, storage)  # a damaged study.db or a bad URL: one line saying what to do
    if storage is None:
        db = out / "study.db"
        if not db.is_file():
            raise RunNotFoundError(f"{out}: no study.db here; is this an autoshrink run folder?")
        storage = f"sqlite:///{db.resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise InputError(f"{storage}: no study named {study_name!r}") from None
    attrs = study.user_attrs
    if max_drop is None:
        max_drop = attrs.get(StudyAttr.MAX_DROP)
    budget = Budget(**attrs.get(StudyAttr.BUDGET, {}))
    return SearchResult(
        out=out,
        trials=finalist_frame(trials_frame(study), attrs, budget),
        teacher=attrs.get(StudyAttr.TEACHER, {}),
        budget=budget,
        max_drop=max_drop,
        meta=dict(attrs),
        _study=study,
    )
