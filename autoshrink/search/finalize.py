"""After the trials: the finalists re-timed as shipped, the test split scored once, warnings kept.

Each trial's gate latency is taken before its fine-tune, on another graph than the one that
ships. Here the front's feasible members and the chosen trial are re-timed from their saved
``trials/NNNN/model.pt2`` in one fresh process, interleaved
(:class:`autoshrink.measure.remeasure.TrialRetimer`), and the choice is made again on those
figures (:func:`autoshrink.finalists.rechoose`); then the front and the chosen trial are scored
once on the task's test split, which nothing was chosen on. Optuna refuses user attributes on
finished trials, so everything is stored on the study, by trial number (:class:`StudyAttr`
``DEPLOYED``, ``TEST_SCORES``, ``WARNINGS``); :func:`autoshrink.result.load` merges it back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from autoshrink.budget import Budget
from autoshrink.record import StudyAttr
from autoshrink.task import Task

__all__ = ["NO_TEST_SPLIT", "add_warnings", "artifact_path", "finalize"]

#: the note for a task without ``test_data``
NO_TEST_SPLIT = ("accuracy was also the selection criterion (no test split): the chosen model's figure is "
                 "the best of several noisy estimates and reads high; give the task test_data= for an "
                 "unbiased one")
#: rounds of re-timing without a latency budget: the figure is reported, it decides nothing
_ROUNDS_NO_LATENCY_BUDGET = 1
_ROUNDS_LATENCY_BUDGET = 3


def artifact_path(out: str | Path, number: int) -> Path:
    """Where trial ``number`` saved its deployable model (``out/trials/NNNN/model.pt2``)."""
    return Path(out) / "trials" / f"{int(number):04d}" / "model.pt2"


def add_warnings(study, lines: Iterable[str | None]) -> list[str]:
    """Append ``lines`` (skipping None and repeats) to the study's ``WARNINGS``; returns the new ones."""
    have = list(study.user_attrs.get(StudyAttr.WARNINGS) or [])
    new = [line for line in dict.fromkeys(lines) if line and line not in have]
    if new:
        study.set_user_attr(StudyAttr.WARNINGS, have + new)
    return new


def finalize(
    task: Task,
    study,
    budget: Budget,
    out: str | Path,
    *,
    latency_runs: int = 60,
    latency_threads: int = 1,
    lock_dir: str | None = None,
    max_drop: float | None = None,
    meter=None,
    retimer: Callable[[list[int]], Mapping[int, Mapping[str, float] | str]] | None = None,
    say: Callable[[str], None] | None = None,
    runtime: str = "inductor",
) -> list[str]:
    """Re-time the finalists, choose again on the deployed figure, score the test split.

    Args:
        task: the task (its example input times; its ``test_data``, when set, scores).
        study: the finished study (what is found is stored on it).
        budget: the search's limits.
        out: the run folder (``trials/NNNN/model.pt2``).
        latency_runs: 0 turns the re-timing off (as it turns off the trials' own timing).
        latency_threads, lock_dir: as each trial's timing.
        max_drop: accuracy-constraint mode (points below the teacher).
        meter: a ``LatencyMeter`` actor on the latency target, or None (re-time here).
        retimer: trial numbers -> deployed figures (default: a :class:`TrialRetimer`; tests fake it).
        say: prints a line (None: silent).
        runtime: the runtime the trials were timed and evaluated in: the finalists are re-timed,
            and the test split scored, from that runtime's artifact beside each ``model.pt2``.

    Returns:
        The warnings added to the study's ``WARNINGS``.
    """
    from autoshrink.finalists import Rechosen, choose, rechoose, score_test_split, with_effective_latency
    from autoshrink.measure.remeasure import RemeasureError, TrialRetimer
    from autoshrink.result import trials_frame

    say = say or (lambda _line: None)
    df = trials_frame(study)
    constraints = budget.constraints()
    teacher = (study.user_attrs.get(StudyAttr.TEACHER) or {}).get("accuracy")
    sel = dict(max_drop=max_drop, reference_accuracy=teacher)  # noqa: C408 - keywords, not stored keys
    lines: list[str] = []
    deployed: dict[str, dict[str, float]] = {}
    if latency_runs > 0:
        if retimer is None:
            retimer = TrialRetimer(lambda n: artifact_path(out, n), task.example_input, meter=meter,
                                   threads=latency_threads, lock_dir=lock_dir, runtime=runtime)

        def measure(numbers: list[int]) -> Mapping[int, Mapping[str, float] | str]:
            say(f"re-timing {len(numbers)} finalist(s) as shipped (trials {', '.join(map(str, numbers))}), "
                "interleaved, in a fresh process")
            try:
                got = retimer(numbers)
            except RemeasureError as exc:
                return {n: f"the re-timing process failed: {str(exc).splitlines()[0]}" for n in numbers}
            deployed.update({str(n): dict(v) for n, v in got.items() if not isinstance(v, str)})
            return got

        rounds = _ROUNDS_LATENCY_BUDGET if budget.latency_ms is not None else _ROUNDS_NO_LATENCY_BUDGET
        chosen = rechoose(df, constraints, measure, max_rounds=rounds, **sel)
        lines += chosen.notes
        lines += list(getattr(retimer, "warnings", []) or [])
    else:
        view = with_effective_latency(df, constraints)
        chosen = Rechosen(trials=view, chosen=choose(view, constraints, **sel))
    if deployed:
        study.set_user_attr(StudyAttr.DEPLOYED, deployed)
    if task.test_data is not None and len(chosen.trials):
        def score(number: int) -> tuple[float, float | None]:
            return task.evaluate(_shipped(runtime, artifact_path(out, number), latency_threads),
                                 fixed_batch=True, split="test")

        scores, notes = score_test_split(chosen, score, constraints)
        if scores:
            say(f"scored {len(scores)} trial(s) once on the test split")
            study.set_user_attr(StudyAttr.TEST_SCORES, {str(n): v for n, v in scores.items()})
        lines += notes
    else:
        lines.append(NO_TEST_SPLIT)
    return add_warnings(study, lines)


def _shipped(runtime: str, path: Path, threads: int):
    """Trial's shipped model, opened as its runtime runs it (Inductor: ``model.pt2`` compiled;
    another runtime: its own artifact beside it, as the trial evaluated it)."""
    if runtime == "inductor":
        from autoshrink.export import load_deployable

        return load_deployable(path)
    from autoshrink.runtimes import get as get_runtime

    return get_runtime(runtime).load(path.parent, threads=threads)
