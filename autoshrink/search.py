"""The controller: an Optuna study asks for candidates, Ray runs them as trials.

Optuna's storage (``study.db`` in the run folder by default, any RDB URL otherwise) is the one
record of every trial: its parameters, metrics, state and failure reason. The driver drives
Optuna's ask/tell interface and keeps ``workers`` Ray tasks in flight; this costs ~0.03 s per
trial (Ray Tune would add ~1 s per trial and a second record to keep consistent).

Objectives: maximise accuracy, minimise latency; the budget is a constraint (each trial's
relative excess over each limit, ``Trial.set_constraint``), so TPE/NSGA-II learn where the
feasible region is. Under a latency budget, the sampler sees a feasible trial's latency raised
to the budget: the goal is the most accurate model within it, and a model faster than needed
is not better (the plots and ``trials.csv`` keep the measured latency). A candidate that misses
the budget is never fine-tuned; it is recorded with its measured cost and an accuracy of 0 for
the sampler (NaN in ``trials.csv``: it was not measured).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoshrink import _env
from autoshrink._files import write_text_atomic
from autoshrink.budget import Budget
from autoshrink.candidate import Candidate
from autoshrink.recover import write_study_record, write_trial_record
from autoshrink.space import SearchSpace
from autoshrink.task import Task

__all__ = ["SearchError", "baselines", "check_run_folder", "default_workers", "search"]

DEFAULT_LATENCY_TARGET = "latency_target"
INTERRUPTED = "interrupted: the driver stopped before this trial finished (re-run on resume)"
SURPLUS = "not run: the study already had its trials (another driver sharing it asked first)"
# trials that do not count towards the total: re-run on resume, or never run at all
NOT_COUNTED = (INTERRUPTED, SURPLUS)
# `trials` counts fine-tuned candidates: those the budget gate rejects (measured in seconds,
# never fine-tuned) do not count, up to this many per trial asked for (then they count, so a
# space that is nearly all over budget still ends)
SCREEN_FACTOR = 4
# a cheapest configuration this much slower than the latency budget stops the search early, if it
# is in each of LATENCY_PRECHECK_TRIES timings (on a quiet machine two compilations of one model
# time within 10 %; another tenant's burst has been seen to double one timing)
LATENCY_PRECHECK_TOLERANCE = 1.25
LATENCY_PRECHECK_TRIES = 3
SAMPLERS = ("tpe", "nsga2", "random", "grid")
METRIC_ATTRS = (
    "accuracy", "accuracy_se", "latency_ms", "latency_iqr_ms", "size_mb", "mmacs",
    "bops", "params", "meets_budget", "finetune_s", "compress_s", "measure_s", "evaluate_s",
    "error",
)


class SearchError(RuntimeError):
    """The search cannot start or go on (bad run folder, mismatched resume, ...)."""


def default_workers() -> int:
    """One worker per two cores (each fine-tunes with two threads), at least one."""
    return max(1, (os.cpu_count() or 2) // 2)


def baselines(space: SearchSpace, candidate_defaults: Candidate | None = None,
              edge: float | None = None) -> list[Candidate]:
    """The obvious configurations, tried first so a search never ends worse than them:
    all-int8, and int8 with uniform pruning at 25 % and 50 %.

    With ``edge`` (the smallest uniform int8 pruning ratio found to meet the budget, see
    :func:`budget_edge`), the ratios below it are known to miss the budget and are replaced by
    the edge itself, which is what an engineer would pick by hand: ``edge`` then the fixed ratios
    above it (at least two baselines: the next step up is a margin for timing noise).
    """
    base = candidate_defaults or Candidate()
    ratios = [0.0, 0.25, 0.5]
    if edge is not None:
        ratios = [edge] + [r for r in ratios if r > edge + 1e-9]
        if len(ratios) == 1:
            ratios.append(min(1.0, edge + 0.125))
    return [
        Candidate.uniform(
            bits=8, prune=ratio, temperature=base.kd_temperature, alpha=base.kd_alpha,
            steps=base.finetune_steps, lr=base.lr, batch_size=base.batch_size, round_to=base.round_to,
        )
        for ratio in ratios
    ]


def budget_edge(task: Task, space: SearchSpace, budget: Budget, settings: _Settings,
                base: Candidate | None = None) -> dict | None:
    """The smallest uniform pruning ratio at which the all-int8 model meets ``budget``, by
    bisection over the space's pruning steps on exact size/MACs and *measured* latency (no
    fine-tuning: each probe costs one compress-lower-compile-time, a few seconds).

    It turns the fixed baselines into budget-aware ones (the hand-tuned config is tried first)
    and keeps the search from spending trials on uniform ratios known to miss the budget.
    Assumes more pruning is never slower, which holds up to timing noise.

    Returns:
        ``{"prune": ratio, "probes": [[ratio, latency_ms, size_mb, mmacs, meets], ...],
        "seconds": s, "error": ""}``; ``prune`` is None when no uniform ratio meets the budget
        or a probe failed (``error`` says why): the fixed baselines are used then. None when the
        budget sets no limit.
    """
    from autoshrink.trial import evaluate

    limits = budget.constraints()
    if not limits:
        return None
    start = time.perf_counter()
    base = base or _space_defaults(space)
    ratios = _uniform_ratios(space)
    probe_budget = Budget(**{**limits, "latency_ms": 1e-9 if "latency_ms" in limits else None})
    ctx = _timing_context(settings)
    probes: list[list] = []
    seen: dict[float, bool] = {}

    def meets(i: int) -> bool:
        ratio = ratios[i]
        if ratio not in seen:
            cand = _as_sampled(space, baselines(space, base, edge=ratio)[0])
            r = evaluate(task, cand, probe_budget, ctx)
            if r.error:
                raise RuntimeError(r.error)
            metrics = {"latency_ms": r.latency_ms, "size_mb": r.size_mb, "mmacs": r.mmacs}
            ok = all(metrics[k] is not None and metrics[k] <= v for k, v in limits.items())
            seen[ratio] = ok
            probes.append([ratio, r.latency_ms, r.size_mb, r.mmacs, ok])
        return seen[ratio]

    edge: float | None = None
    error = ""
    try:
        if meets(0):
            edge = ratios[0]
        elif meets(len(ratios) - 1):
            lo, hi = 0, len(ratios) - 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if meets(mid) else (mid, hi)
            edge = ratios[hi]
    except Exception as exc:  # noqa: BLE001 - each trial records its own failure; no verdict here
        error = f"{type(exc).__name__}: {exc}"[:300]
    return {"prune": edge, "probes": probes, "seconds": round(time.perf_counter() - start, 1),
            "error": error}


def _timing_context(settings: _Settings):
    """How the driver itself measures a candidate (budget checks before the search): as a trial
    does, under the machine lock."""
    from autoshrink.measure.latency import MachineLock
    from autoshrink.trial import TrialContext

    return TrialContext(threads=settings.threads, latency_threads=settings.latency_threads,
                        latency_runs=settings.latency_runs, lock=MachineLock(settings.lock_dir))


def _uniform_ratios(space: SearchSpace) -> list[float]:
    """The uniform pruning ratios worth telling apart: every rule's pruning steps (eighths for
    a continuous range), from 0 to the highest ratio any rule allows."""
    from autoshrink.space import Range

    values: set[float] = {0.0}
    for rule in space.to_dict()["layers"]:
        knob = rule.get("prune")
        if isinstance(knob, dict):
            stepped = Range(low=knob["low"], high=knob["high"], step=knob.get("step") or 0.125)
            values.update(round(v, 6) for v in stepped.values())
            if not knob.get("step"):  # a continuous range: its top too
                values.add(round(knob["high"], 6))
        elif isinstance(knob, list):
            values.update(float(v) for v in knob)
        elif isinstance(knob, (int, float)):
            values.add(float(knob))
    return sorted(v for v in values if 0.0 <= v < 1.0)


def _as_sampled(space: SearchSpace, cand: Candidate) -> Candidate:
    """``cand`` as the search would run it once enqueued: snapped to the space's choices."""
    params = space.candidate_params(cand)
    first = _FirstChoice()

    class _Replay:
        def suggest_categorical(self, name, choices):
            return params[name] if name in params else first.suggest_categorical(name, choices)

        def suggest_float(self, name, low, high, step=None, log=False):
            return params[name] if name in params else first.suggest_float(name, low, high, step, log)

        def suggest_int(self, name, low, high, step=1):
            return params[name] if name in params else first.suggest_int(name, low, high, step)

    return space.sample(_Replay())


@dataclass
class _Settings:
    threads: int
    latency_threads: int
    latency_runs: int
    eval_every: int
    seed: int
    lock_dir: str | None


def _prepare_out(out: str | os.PathLike | None) -> Path:
    path = Path(out) if out is not None else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise SearchError(f"out folder {str(path)!r} is not writable: {exc.strerror or exc}") from None
    return path


def _make_sampler(name: str, seed: int, space: SearchSpace):
    import optuna

    name = name.lower()
    if name == "tpe":
        # constraints are read from each trial (Trial.set_constraint), no constraints_func
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=6)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return _grid_sampler(space.grid(), seed)
    raise SearchError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")


def _grid_sampler(grid: dict, seed: int):
    """Optuna's GridSampler (every point once, in a seeded random order), minus its habit of
    calling ``study.stop()`` once the grid is covered: that only works inside
    ``study.optimize``, and this driver counts its own trials."""
    import optuna

    class _GridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    sampler = _GridSampler(grid, seed=seed)
    sampler.size = math.prod(len(v) for v in grid.values())
    return sampler


def _storage(url: str):
    """An Optuna storage for ``url``. SQLite waits up to a minute for a lock held by another
    driver sharing the file (its default, 5 s, is too short on a loaded machine)."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}} if url.startswith("sqlite:") else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (IntegrityError, OperationalError, ProgrammingError):
            # two drivers creating one new store race to create its schema (PostgreSQL: its enum
            # types, then "relation already exists") and stamp its version; the loser finds the
            # schema there on a second look
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _check_study(storage, study_name: str, resume: bool, out: Path, space: SearchSpace | None,
                 join: bool, budget: Budget | None = None) -> None:
    """The checks :func:`search` makes on an existing storage, without changing it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    summaries = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    if resume and study_name not in summaries:
        raise SearchError(
            f"--resume: no study {study_name!r} in the run folder {str(out)!r}; "
            "start a new search without --resume"
        )
    if study_name not in summaries:
        return
    study = optuna.load_study(study_name=study_name, storage=storage,
                              sampler=optuna.samplers.RandomSampler())
    if not resume and not join and any(t.state.is_finished() for t in study.trials):
        raise SearchError(
            f"{str(out)!r} already holds a search ({len(study.trials)} "
            f"trial{'' if len(study.trials) == 1 else 's'}); "
            "pass --resume to continue it or choose another --out"
        )
    made_with = f"{'--resume: ' if resume else ''}the study in {str(out)!r} was made with"
    fp = study.user_attrs.get("space_fingerprint")
    if space is not None and fp is not None and fp != space.fingerprint():
        raise SearchError(f"{made_with} a different search space ({study.user_attrs.get('space_source')}, "
                          f"now {space.source}); use the same space or a new --out")
    before = study.user_attrs.get("budget")
    if budget is not None and before is not None and before != budget.constraints():
        # trials told to the sampler as (in)feasible under one budget would mislead it under another
        raise SearchError(f"{made_with} the budget {Budget(**before).describe()}, now {budget.describe()}; "
                          "use the same budget or a new --out (its trials stay: `autoshrink show` lists "
                          "them with their measured costs)")


def check_run_folder(
    out: str | os.PathLike | None,
    *,
    resume: bool = False,
    storage: str | None = None,
    study_name: str = "autoshrink",
    space: SearchSpace | None = None,
    budget: Budget | None = None,
) -> Path:
    """Check a run folder as :func:`search` will, before any model is built (a built-in task
    may train its teacher for minutes first): the folder is writable, ``resume`` finds its
    study, made with the same ``space`` and ``budget``, and a new search does not overwrite an
    old one.

    Returns:
        The run folder (created if it did not exist).

    Raises:
        SearchError: naming the folder and what to do instead.

    Example:
        >>> import tempfile
        >>> check_run_folder(tempfile.mkdtemp()).is_dir()
        True
    """
    if resume:
        if out is None:
            raise SearchError("--resume needs the run folder to continue (--out DIR)")
        if storage is None and not (Path(out) / "study.db").is_file():
            raise SearchError(
                f"--resume: {str(out)!r} holds no search (no study.db); "
                "start a new search without --resume"
            )
    path = _prepare_out(out)
    if storage is None and not (path / "study.db").is_file():
        return path  # a new run folder: nothing more to check
    url = storage or f"sqlite:///{(path / 'study.db').resolve()}"
    _check_study(_storage(url), study_name, resume, path, space, join=storage is not None, budget=budget)
    return path


def _open_study(storage: str, study_name: str, sampler, resume: bool, out: Path,
                space: SearchSpace | None, join: bool = False, budget: Budget | None = None):
    import optuna

    store = _storage(storage)
    _check_study(store, study_name, resume, out, space, join, budget)
    return optuna.create_study(
        storage=store, study_name=study_name, sampler=sampler,
        directions=["maximize", "minimize"], load_if_exists=True,
    )


def _cheapest(space: SearchSpace) -> Candidate:
    """The space's smallest, lightest configuration: every rule at its lowest bits and its
    highest pruning ratio (and no channel rounding when the space allows it)."""
    spec = space.to_dict()

    def top(knob: Any) -> float:
        if isinstance(knob, dict):  # a range
            if knob.get("step"):
                return knob["low"] + math.floor((knob["high"] - knob["low"]) / knob["step"] + 1e-9) * knob["step"]
            return knob["high"]
        return max(knob) if isinstance(knob, list) else knob

    bits, prune = {}, {}
    for rule in spec["layers"]:
        if rule.get("bits") is not None:
            b = rule["bits"]
            bits[rule["pattern"]] = min(b) if isinstance(b, list) else b
        if rule.get("prune") is not None:
            prune[rule["pattern"]] = top(rule["prune"])
    rounding = spec.get("round_to")
    if isinstance(rounding, list):
        rounding = None if None in rounding else min(rounding)
    return Candidate(bits=bits, prune=prune, default_bits=spec["defaults"]["bits"],
                     default_prune=spec["defaults"]["prune"], finetune_steps=0, round_to=rounding)


def _check_exportable(task: Task) -> None:
    """Quantization and the saved model both go through ``torch.export``: a model it cannot
    capture would fail every trial, so say so once, before any trial runs."""
    import copy

    from autoshrink.compress.quantize import export_model
    from autoshrink.task import TaskError

    quiet = logging.root.manager.disable
    logging.disable(logging.WARNING)  # torch logs and prints the partial graph; the error says it all
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            export_model(copy.deepcopy(task.model).eval(), task.example_input)
    except Exception as exc:  # the user's model: any failure here is the same finding
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise TaskError(
            f"the model cannot be captured by torch.export, which quantization and the saved model "
            f"need: {type(exc).__name__}: {first[:300]}. The usual cause is Python control flow on "
            "tensor values (`if x.sum() > 0:`); express it with torch.where or torch.cond"
        ) from exc
    finally:
        logging.disable(quiet)


def _check_reachable(task: Task, space: SearchSpace, budget: Budget, settings: _Settings,
                     latency: bool) -> None:
    """Fail early when even the cheapest configuration of the space misses the budget, naming
    the minimum achievable. Size and MACs are computed exactly (~1 s); latency, when ``latency``
    is set, is measured on the compiled cheapest model, with a tolerance for timing noise, and
    measured again (up to ``LATENCY_PRECHECK_TRIES`` times, the fastest counts) before refusing."""
    from autoshrink.compress import compress
    from autoshrink.measure.flops import model_cost
    from autoshrink.trial import evaluate

    limits = budget.constraints()
    if not limits:
        return
    cheapest = _cheapest(space)
    x = task.example_input
    try:
        comp = compress(task.model, cheapest, x)
        cost = model_cost(comp.pruned, x, comp.bits)
    except Exception:  # noqa: BLE001 - each trial will record its own failure; no verdict here
        return
    found = {"size_mb": cost.size_mb, "mmacs": cost.mmacs}
    units = {"size_mb": "MB", "mmacs": "MMACs", "latency_ms": "ms"}
    missed = {k: v for k, v in found.items() if k in limits and v > limits[k]}
    if not missed and latency and budget.latency_ms is not None:
        ctx = _timing_context(settings)
        fastest = math.inf
        for _ in range(LATENCY_PRECHECK_TRIES):
            try:  # a budget no model meets: evaluate() stops right after timing the lowered model
                r = evaluate(task, cheapest, Budget(latency_ms=1e-9), ctx)
            except Exception:  # noqa: BLE001
                return
            if r.latency_ms is None:
                return
            fastest = min(fastest, r.latency_ms)
            if fastest <= budget.latency_ms * LATENCY_PRECHECK_TOLERANCE:
                break
        else:
            missed["latency_ms"] = fastest
    if missed:
        got = ", ".join(f"{k} {v:.4g} {units[k]} > {limits[k]:g}" for k, v in missed.items())
        least = ", ".join(f"{k} {v:.4g} {units[k]}" for k, v in missed.items())
        raise SearchError(
            f"no configuration of the space {space.source} can meet the budget "
            f"({budget.describe()}): even the cheapest one (lowest bits, most pruning) has {got}. "
            f"The minimum achievable is about {least}: raise the budget or widen the space"
        )


def search(
    task: Task,
    space: SearchSpace | str | os.PathLike | None = None,
    budget: Budget | None = None,
    *,
    trials: int = 40,
    workers: int | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int = 0,
    sampler: str = "tpe",
    storage: str | None = None,
    study_name: str = "autoshrink",
    ray_address: str | None = None,
    threads_per_worker: int | None = None,
    latency_threads: int = 1,
    latency_runs: int = 60,
    early_stopping: bool = True,
    enqueue_baselines: bool = True,
    progress: bool = True,
    max_drop: float | None = None,
    latency_target: str | None = None,
    screening: bool = True,
    minutes: float | None = None,
):
    """Search for the best compression of ``task.model`` under ``budget``.

    Args:
        task: teacher, data and metric (e.g. ``autoshrink.tasks.get("digits")``).
        space: a :class:`SearchSpace`, a YAML path, or None for the bundled default.
        budget: hardware limits (default: no limits).
        trials: candidates to fine-tune in the study (a resumed study counts its finished
            trials). A candidate that misses the budget is measured (seconds), recorded and not
            fine-tuned; with ``screening`` it does not count, up to ``4 × trials`` of them.
        workers: trials in flight at once (default: :func:`default_workers`).
        out: run folder (default ``runs/<timestamp>``).
        resume: continue the study in ``out`` (interrupted trials are failed and re-run).
        seed: seeds the sampler and fine-tuning; the same seed, space and task give the same
            sequence of candidates.
        sampler: "tpe" (with constraints, default), "nsga2", "random", or "grid" (every point of
            :meth:`SearchSpace.grid` once, in a seeded order; needs a space without continuous
            ranges; ``trials`` is capped at the grid's size plus the baselines).
        storage: an Optuna storage URL (default ``sqlite:///<out>/study.db``).
        study_name: the study's name in the storage (several drivers may share one).
        ray_address: join an existing Ray cluster instead of starting a local one.
        latency_target: the custom Ray resource that marks the node to time latency on (the
            deployment hardware). None: ``"latency_target"`` if the cluster offers it, else each
            trial times in its own process. A name the cluster does not offer is an error.
        threads_per_worker: torch threads per trial (default: cores // workers).
        latency_threads: threads while timing latency.
        latency_runs: timed runs per latency measurement.
        early_stopping: stop fine-tunes that another trial clearly dominates mid-way.
        enqueue_baselines: try the uniform baselines first (new studies only).
        progress: show a progress bar.
        max_drop: accuracy-constraint mode: pick the fastest trial within this many points of
            the teacher.
        screening: do not count candidates that miss the budget towards ``trials`` (see
            there); False: every candidate counts. Off for ``sampler="grid"`` (each point once).
        minutes: start no new trial after this many minutes (the running ones finish; the
            result's ``meta["timed_out"]`` says so; ``resume=True`` continues). None: no limit.

    Returns:
        A :class:`autoshrink.result.SearchResult`.

    Raises:
        SearchError: unusable run folder, resume mismatch, unknown sampler, or a budget that
            even the space's cheapest configuration misses (the message names the minimum).
        TaskError: a model that ``torch.export`` cannot capture.
        KeyboardInterrupt: after Ctrl-C or SIGTERM, once the trials so far are recorded and the
            run folder's files written (``resume=True`` continues).
        SpaceError: a space that does not fit the model, or a continuous knob with ``sampler="grid"``.

    Example:
        >>> import autoshrink as ash
        >>> task = ash.tasks.get("digits")                                     # doctest: +SKIP
        >>> result = ash.search(task, None, ash.Budget(latency_ms=5), trials=12)  # doctest: +SKIP
        >>> result.best                                                        # doctest: +SKIP
    """
    _env.configure()

    from autoshrink.compress.quantize import quantizable_layers
    from autoshrink.result import load

    budget = budget or Budget()
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if minutes is not None and not (isinstance(minutes, (int, float)) and minutes > 0):
        raise ValueError(f"minutes must be a positive number (or None: no limit), got {minutes!r}")
    if space is None:
        space = SearchSpace.default()
    elif not isinstance(space, SearchSpace):
        space = SearchSpace.from_yaml(space)
    space = space.bind(quantizable_layers(task.model))
    out_dir = check_run_folder(out, resume=resume, storage=storage, study_name=study_name,
                               space=space, budget=budget)
    join = storage is not None  # drivers sharing an explicit storage join one study
    storage = storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    workers = workers or default_workers()
    threads = threads_per_worker or max(1, (os.cpu_count() or 2) // workers)
    sampler_obj = _make_sampler(sampler, seed, space)
    if hasattr(sampler_obj, "size"):  # grid: each point once, plus the baselines
        trials = min(trials, sampler_obj.size + (len(baselines(space)) if enqueue_baselines else 0))
    settings = _Settings(threads=threads, latency_threads=latency_threads,
                         latency_runs=latency_runs, eval_every=0, seed=seed, lock_dir=None)
    if not resume:  # a resumed study passed these checks when it began
        _check_exportable(task)
    # on a cluster, latency may be timed on a target node, not here
    time_here = not resume and ray_address is None and latency_runs > 0
    _check_reachable(task, space, budget, settings, latency=time_here)
    study = _open_study(storage, study_name, sampler_obj, resume, out_dir, space, join, budget)

    # a grid is walked point by point: every point counts, met or missed
    screen_limit = 0 if hasattr(sampler_obj, "size") or not screening else SCREEN_FACTOR * trials
    driver = _Driver(task, space, budget, study, out_dir, workers, settings,
                     ray_address, early_stopping, progress, latency_target=latency_target,
                     screen_limit=screen_limit, minutes=minutes)
    driver.record_meta(sampler=sampler, seed=seed, trials=trials, max_drop=max_drop)
    requeue = driver.fail_interrupted()
    if enqueue_baselines and not any(True for _ in study.trials if _.number >= 0) and not resume:
        edge = None
        if time_here and budget.latency_ms is not None:
            found = budget_edge(task, space, budget, settings)
            study.set_user_attr("budget_edge", found)
            edge = found and found["prune"]
            if edge is not None and progress:
                print(f"budget edge: uniform int8 pruned {edge:.1%} meets {budget.describe()} "
                      f"({len(found['probes'])} probes, {found['seconds']:.0f} s); tried first")
        for cand in baselines(space, _space_defaults(space), edge)[:trials]:
            # (more would stay WAITING in the study)
            study.enqueue_trial(space.candidate_params(cand), skip_if_exists=True)
    for number, params in requeue:
        study.enqueue_trial(params, user_attrs={"rerun_of": number})
    try:
        driver.run(trials)
    finally:
        driver.close()
    study.set_user_attr("timed_out", driver.timed_out)
    result = load(out_dir, storage=storage, study_name=study_name, max_drop=max_drop)
    result.write()
    if driver.interrupted:  # Ctrl-C / SIGTERM: what is done is recorded and written; stop here
        raise KeyboardInterrupt(
            f"interrupted; the trials so far are recorded in {out_dir} (trials.csv, pareto.png): "
            "continue with --resume (resume=True) and the same arguments"
        )
    return result


class _FirstChoice:
    """A stand-in trial that answers every suggestion with the knob's first choice (a range:
    its middle, geometric for a log range; an integer range: its low end)."""

    def suggest_categorical(self, name, choices):
        return choices[0]

    def suggest_float(self, name, low, high, step=None, log=False):
        return math.sqrt(low * high) if log else (low + high) / 2

    def suggest_int(self, name, low, high, step=1):
        return low


def _space_defaults(space: SearchSpace) -> Candidate:
    """The space's own fine-tune settings at their first choice, for the baselines."""
    return space.sample(_FirstChoice())


class _Driver:
    """Keeps ``workers`` trials in flight, records every outcome in the study."""

    def __init__(self, task, space, budget, study, out, workers, settings, ray_address,
                 early_stopping, progress, *, latency_target: str | None = None,
                 screen_limit: int = 0, minutes: float | None = None) -> None:
        self.latency_target = latency_target
        # no new trial starts after this many minutes of this call (those running finish)
        self.minutes = minutes
        self.timed_out = False
        # over-budget candidates (never fine-tuned) not counted towards the total, at most
        self.screen_limit = screen_limit
        self.task, self.space, self.budget, self.study = task, space, budget, study
        self.out, self.workers, self.settings = out, workers, settings
        self.ray_address, self.early_stopping, self.show_progress = ray_address, early_stopping, progress
        self._ray_started = False
        self._stop = False
        self.interrupted = False  # set when Ctrl-C / SIGTERM stopped the run

    # -- bookkeeping ------------------------------------------------------------------------------
    def record_meta(self, **extra: Any) -> None:
        from autoshrink.result import measure_teacher

        s = self.study
        attrs = s.user_attrs
        if self.space is not None:
            s.set_user_attr("space_fingerprint", self.space.fingerprint())
            s.set_user_attr("space_source", self.space.source)
            s.set_user_attr("space", self.space.to_dict())
        s.set_user_attr("budget", self.budget.constraints())
        s.set_user_attr("task", self.task.name)
        s.set_user_attr("task_description", self.task.description)
        for k, v in extra.items():
            s.set_user_attr(k, v)
        if "teacher" not in attrs:
            s.set_user_attr("teacher", measure_teacher(self.task, self.settings.latency_threads,
                                                      self.settings.latency_runs))

    def fail_interrupted(self) -> list[tuple[int, dict]]:
        """Trials a stopped driver left unfinished, to re-run: those a killed driver left RUNNING
        are marked FAIL (interrupted) here; those a stopped one (Ctrl-C) marked so itself.

        Returns:
            ``(number, params)`` of each interrupted trial that no later trial re-runs yet.
        """
        import optuna

        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if _driver_alive(t.user_attrs.get("driver")):
                continue  # another live driver on this storage owns it
            optuna.Trial(self.study, t._trial_id).set_user_attr("error", INTERRUPTED)
            self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        trials = self.study.get_trials(deepcopy=False)
        rerun = {t.user_attrs.get("rerun_of") for t in trials}
        requeue = []
        for t in trials:
            if (t.state != optuna.trial.TrialState.FAIL or t.user_attrs.get("error") != INTERRUPTED
                    or t.number in rerun):
                continue
            # a driver killed between ask and sampling left no params: an enqueued trial (a
            # baseline, a re-run) still has the ones it was given; a sampled one is just dropped
            params = {**t.system_attrs.get("fixed_params", {}), **t.params}
            if params:
                requeue.append((t.number, params))
        return requeue

    def _count(self, *, running: bool = True, before: int | None = None) -> int:
        """Trials that count towards the total (in storage order, below trial ``before`` if
        given): finished ones and, with ``running``, those running anywhere (several drivers
        may share the study); not the interrupted or surplus ones, nor the first
        ``screen_limit`` candidates the budget gate rejected."""
        import optuna

        states = [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                  optuna.trial.TrialState.FAIL] + ([optuna.trial.TrialState.RUNNING] if running else [])
        counted = [
            t for t in self.study.get_trials(deepcopy=False, states=tuple(states))
            if t.user_attrs.get("error") not in NOT_COUNTED and (before is None or t.number < before)
        ]
        screened = sum(1 for t in counted if _screened(t))
        return len(counted) - min(screened, self.screen_limit)

    def _committed(self) -> int:
        return self._count()

    def _surplus(self, number: int, total: int) -> bool:
        """True if trial ``number`` is beyond the total: drivers sharing a study may both see
        room for one more trial and both ask; the lower trial numbers (storage order) win."""
        return self._count(before=number) >= total

    def _finished(self) -> int:
        return self._count(running=False)

    # -- ray ----------------------------------------------------------------------------------------
    def _start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.ray_address:
            ray.init(address=self.ray_address, log_to_driver=False, logging_level="ERROR")
        else:
            with _loopback_only():
                ray.init(
                    # always a new local instance: with no address, Ray would join a cluster
                    # someone started on this machine with `ray start` (its latest one)
                    address="local",
                    num_cpus=self.workers * self.settings.threads,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    log_to_driver=False,
                    logging_level="ERROR",
                    configure_logging=False,
                )
            self._ray_started = True

    def _latency_meter(self):
        """A ``LatencyMeter`` actor on the node offering the latency-target resource, or None
        (each trial then times in its own process, under its machine's lock)."""
        import ray

        from autoshrink.measure.latency import LatencyMeter

        name = self.latency_target or DEFAULT_LATENCY_TARGET
        offered = ray.cluster_resources().get(name, 0.0)
        if not offered:
            if self.latency_target:
                raise SearchError(
                    f"latency target: the Ray cluster offers no resource {name!r}; start the "
                    f"target node with `ray start --address ... --resources '{{\"{name}\": 1}}'`"
                )
            return None
        # a sliver of the resource, so that several searches can share one target; their
        # timings still take turns under the target's machine lock
        meter = ray.remote(num_cpus=0, resources={name: 0.01})(LatencyMeter).remote()
        where = ray.get(meter.where.remote())
        self.study.set_user_attr("latency_measured_on", {"resource": name, **where})
        teacher = dict(self.study.user_attrs.get("teacher") or {})
        if teacher and "latency_ms_driver" not in teacher:  # the teacher, timed on the target too
            from autoshrink.measure.latency import program_bytes

            x = self.task.example_input[:1].contiguous()
            lat = ray.get(meter.measure.remote(program_bytes(self.task.model.eval(), x), x,
                                               self.settings.latency_runs, self.settings.latency_threads))
            teacher["latency_ms_driver"], teacher["latency_ms"] = teacher.get("latency_ms"), lat.median_ms
            self.study.set_user_attr("teacher", teacher)
        return meter

    def close(self) -> None:
        if self._ray_started:
            import ray

            ray.shutdown()

    # -- main loop ----------------------------------------------------------------------------------
    def run(self, total: int, propose=None) -> None:
        """Run trials until ``total`` count in the study, or ``minutes`` have passed (then the
        trials in flight finish, and no new one starts; the first always starts).

        Args:
            propose: ``propose(trial) -> Candidate``; default: sample the space.
        """
        started = time.monotonic()
        begun = 0
        import optuna
        import ray

        from autoshrink._progress import ProgressView
        from autoshrink._worker import Rungs, run_trial
        from autoshrink.compress.distill import teacher_logits

        if self._committed() >= total:
            return
        self._start_ray()
        _ship_user_code_by_value(self.task)
        task_ref = ray.put(self.task)
        logits = teacher_logits(self.task.model, self.task.train_data)
        logits_ref = ray.put(logits)
        remote = ray.remote(num_cpus=self.settings.threads, max_retries=1)(run_trial)
        rungs = ray.remote(num_cpus=0)(Rungs).remote() if self.early_stopping else None
        if rungs is not None:  # a resumed study's earlier fine-tunes still count as rivals
            rungs.seed.remote({
                t.number: [(step, acc, t.user_attrs.get("latency_ms"),
                            t.user_attrs.get("candidate", {}).get("finetune_steps"))
                           for step, acc in t.user_attrs["history"]]
                for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get("history")
            })
        meter = self._latency_meter()
        budget = self.budget.constraints()
        view = ProgressView(total, self._finished(), enabled=self.show_progress)
        inflight: dict[Any, tuple[optuna.trial.Trial, Candidate]] = {}
        old_handler = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_term)
        try:
            while not self._stop:
                while len(inflight) < self.workers and self._committed() < total:
                    if (self.minutes is not None and begun
                            and time.monotonic() - started > 60 * self.minutes):
                        if not self.timed_out:
                            self.timed_out = True
                            view.note(f"time limit: {self.minutes:g} min passed; finishing the "
                                      f"{len(inflight)} trial(s) running, starting no more "
                                      "(--resume continues)")
                        break
                    begun += 1
                    trial = self.study.ask()
                    trial.set_user_attr("driver", _DRIVER_ID)
                    if self._surplus(trial.number, total):
                        trial.set_user_attr("error", SURPLUS)
                        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                        break
                    cand = propose(trial) if propose is not None else self.space.sample(trial)
                    trial.set_user_attr("candidate", cand.to_dict())
                    ctx = {
                        "threads": self.settings.threads,
                        "latency_threads": self.settings.latency_threads,
                        "latency_runs": self.settings.latency_runs,
                        "eval_every": max(40, cand.finetune_steps // 3) if self.early_stopping else 0,
                        "artifact_dir": str((self.out / "trials" / f"{trial.number:04d}").resolve()),
                        "seed": self.settings.seed + trial.number,
                        "lock_dir": self.settings.lock_dir,
                        "meter": meter,
                    }
                    ref = remote.remote(task_ref, cand.to_dict(), budget, ctx, logits_ref, rungs,
                                        trial.number)
                    inflight[ref] = (trial, cand)
                    view.started(trial.number, cand)
                if not inflight:
                    break
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    trial, cand = inflight.pop(ref)
                    try:
                        metrics = ray.get(ref)
                    except Exception as exc:  # worker died (OOM killer, kill -9, node lost)
                        metrics = {"state": "FAIL", "error": _ray_reason(exc)}
                    self._tell(trial, cand, metrics)
                    view.finished(trial.number, metrics, self.budget, done=self._finished())
        except KeyboardInterrupt:
            self._stop = self.interrupted = True
            view.note("interrupted: stopping, recording what is done")
        finally:
            signal.signal(signal.SIGTERM, old_handler)
            for ref, (trial, _cand) in inflight.items():
                # best effort: Ctrl-C in a terminal also reaches Ray's own processes, and a
                # trial left RUNNING is failed and re-run by the next resume anyway
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001
                    pass
                try:
                    trial.set_user_attr("error", INTERRUPTED)
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                except Exception:  # noqa: BLE001
                    pass
            view.close()

    def _on_term(self, *_args) -> None:
        raise KeyboardInterrupt

    def _tell(self, trial, cand: Candidate, m: dict) -> None:
        import optuna

        for key in METRIC_ATTRS:
            if key in m and m[key] is not None:
                trial.set_user_attr(key, m[key])
        for key in ("history", "layers", "skipped_layers"):
            if m.get(key):
                trial.set_user_attr(key, m[key])
        state = m.get("state", "FAIL")
        violations = self.budget.violations(
            {k: m.get(k) for k in ("latency_ms", "size_mb", "mmacs") if m.get(k) is not None}
        )
        # relative excess over each limit: <= 0 is feasible (Optuna's convention)
        for key, limit in self.budget.constraints().items():
            value = m.get(key)
            trial.set_constraint(key, (value - limit) / limit if value is not None else 0.0)
        if state == "FAIL":
            trial.set_user_attr("error", m.get("error") or "failed without a reason")
            frozen = self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif state == "PRUNED":
            frozen = self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            accuracy = m.get("accuracy") if not violations else None
            latency = m.get("latency_ms")
            if latency is not None and not violations and self.budget.latency_ms is not None:
                # under a latency budget the goal is the most accurate model within it: being
                # faster than the budget is worth nothing, so the sampler is told so
                latency = max(latency, self.budget.latency_ms)
            values = [accuracy if accuracy is not None else 0.0,
                      latency if latency is not None else 1e9]
            frozen = self.study.tell(trial, values)
        if state != "COMPLETE" or violations:
            (self.out / "trials" / f"{trial.number:04d}" / "model.pt2").unlink(missing_ok=True)
        write_text_atomic(self.out / "trials" / f"{trial.number:04d}" / "candidate.json", cand.to_json())
        # a second record of the trial, and of the study, that `autoshrink recover` rebuilds study.db from
        write_trial_record(self.out, frozen, m)
        write_study_record(self.out, study_name=self.study.study_name, directions=self.study.directions,
                           user_attrs=self.study.user_attrs)


_DRIVER_ID = f"{socket.gethostname()}:{os.getpid()}"
_CLUSTER_MODE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only():
    """Keep a local Ray on 127.0.0.1. On Linux, Ray turns ``_node_ip_address="127.0.0.1"``
    into the machine's outward address, and its GCS, raylet and workers then listen on every
    interface (with no authentication: ``RAY_AUTH_MODE=disabled``). In Ray's single-machine
    mode (the Windows/macOS default, which this variable selects) they bind the loopback
    address only. The setting is inherited by the processes ``ray.init`` starts."""
    import ray._private.ray_constants as ray_constants

    saved_env, saved = os.environ.get(_CLUSTER_MODE_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_MODE_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(_CLUSTER_MODE_VAR, None)
        else:
            os.environ[_CLUSTER_MODE_VAR] = saved_env


def _driver_alive(driver: str | None) -> bool:
    """True if ``driver`` ("host:pid") is a running process on this host (other hosts: assumed
    alive, we cannot tell; their trials stay RUNNING until that driver resumes them)."""
    if not driver or ":" not in driver:
        return False
    host, _, pid = driver.rpartition(":")
    if host != socket.gethostname():
        return True
    if int(pid) == os.getpid():
        return False  # our own earlier session in this process cannot still be running
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _screened(t) -> bool:
    """A trial the budget gate rejected: measured, over budget, never fine-tuned."""
    import optuna

    a = t.user_attrs
    return (t.state == optuna.trial.TrialState.COMPLETE and a.get("meets_budget") is False
            and not a.get("finetune_s") and a.get("error") not in NOT_COUNTED)


def _ship_user_code_by_value(task) -> None:
    """Let Ray workers rebuild the user's model and data classes even when their module cannot
    be imported there (a script, a notebook, a test file): such modules are pickled by value.

    Modules of installed packages (torch, autoshrink, site-packages) stay pickled by reference.
    """
    import sys

    from ray import cloudpickle

    objects = [task.model, *task.model.modules(), task.train_data, task.val_data]
    for obj in objects:
        name = type(obj).__module__
        module = sys.modules.get(name)
        top = name.split(".")[0]
        if module is None or top in ("torch", "autoshrink", "builtins", "__main__"):
            continue
        path = getattr(module, "__file__", None) or ""
        if "site-packages" in path or "dist-packages" in path or path.startswith(sys.prefix):
            continue
        try:
            cloudpickle.register_pickle_by_value(module)
        except ValueError:  # already registered, or not a module cloudpickle accepts
            pass


def _ray_reason(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    if "OutOfMemory" in name or "memory" in first.lower():
        return f"out of memory: the worker was killed ({name})"
    if "WorkerCrashed" in name or "died" in first.lower() or "ActorDied" in name:
        return f"worker process died (killed by the OS or crashed), retried once: {name}"
    return f"{name}: {first[:300]}"
