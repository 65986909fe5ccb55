"""The controller: an Optuna study asks for candidates, Ray runs them as trials.

Optuna's storage (``study.db`` in the run folder by default, any RDB URL otherwise) is the one
record of every trial: its parameters, metrics, state and failure reason (keys in
:mod:`autoshrink.record`). Objectives: maximise accuracy, minimise latency; the budget is a
constraint (each trial's relative excess over each limit, ``Trial.set_constraint``), so
TPE/NSGA-II learn where the feasible region is.

:func:`search` validates its arguments into a frozen :class:`SearchConfig` and wires the parts,
one module each: ``preflight`` (checks before any trial, the budget edge), ``baselines``,
``storage`` (run folder, study), ``samplers``, ``driver`` (ask/tell, also what ``sweep`` runs),
``ray_backend``, ``rungs`` (early stopping) and ``accounting`` (which trials count: pure
functions over ``FrozenTrial`` lists).
"""

from __future__ import annotations

import json
import os
import sys
import time

from autoshrink import _env
from autoshrink.budget import Budget
from autoshrink.record import METRIC_ATTRS, NOT_COUNTED, Proposer, Reason, StudyAttr, TrialAttr
from autoshrink.search.baselines import FirstChoice, as_sampled, baselines, space_defaults
from autoshrink.search.config import (
    DEFAULT_LATENCY_TARGET,
    LATENCY_PRECHECK_TOLERANCE,
    LATENCY_PRECHECK_TRIES,
    SCREEN_FACTOR,
    DriverConfig,
    SearchConfig,
    SearchError,
    TrialSettings,
    default_threads,
    default_workers,
    validate_counts,
)
from autoshrink.search.driver import Driver, run_trials
from autoshrink.search.finalize import add_warnings, finalize
from autoshrink.search.gpus import DevicePlan, plan_devices
from autoshrink.search.preflight import (
    budget_edge,
    cheapest,
    check_exportable,
    check_reachable,
    edge_probe,
    uniform_ratios,
)
from autoshrink.search.ray_backend import CLUSTER_MODE_VAR, check_ray_address
from autoshrink.search.samplers import SAMPLERS, grid_size, make_sampler
from autoshrink.search.storage import check_run_folder, default_storage, open_study, prepare_out
from autoshrink.space import SearchSpace
from autoshrink.task import Task

__all__ = [
    "CLUSTER_MODE_VAR",
    "DEFAULT_LATENCY_TARGET",
    "INTERRUPTED",
    "LATENCY_PRECHECK_TOLERANCE",
    "LATENCY_PRECHECK_TRIES",
    "METRIC_ATTRS",
    "NOT_COUNTED",
    "SAMPLERS",
    "SCREEN_FACTOR",
    "SURPLUS",
    "DevicePlan",
    "Driver",
    "DriverConfig",
    "FirstChoice",
    "SearchConfig",
    "SearchError",
    "TrialSettings",
    "as_sampled",
    "baselines",
    "budget_edge",
    "check_exportable",
    "check_reachable",
    "check_run_folder",
    "cheapest",
    "default_storage",
    "default_threads",
    "default_workers",
    "finalize",
    "make_sampler",
    "open_study",
    "plan_devices",
    "prepare_out",
    "run_trials",
    "search",
    "space_defaults",
    "uniform_ratios",
]

# the driver's own error texts, under their earlier names
INTERRUPTED = Reason.INTERRUPTED
SURPLUS = Reason.SURPLUS


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
    device: str = "cpu",
    gpus_per_trial: float | None = None,
    runtime: str = "inductor",
    warm_start: str | os.PathLike | None = None,
    predictor_screening: bool | None = None,
    solver: bool = True,
):
    """Search for the best compression of ``task.model`` under ``budget``.

    Args:
        task: teacher, data and metric (e.g. ``autoshrink.tasks.get("digits")``).
        space: a :class:`SearchSpace`, a YAML path, ``"auto"`` (derived from the model's graph), or
            None: the bundled ``default.yaml`` for ``resnet18_32``, ``"auto"`` for every other model.
        budget: hardware limits (default: no limits).
        trials: candidates to fine-tune in the study (a resumed study counts its finished
            trials). A candidate that misses the budget is measured (seconds), recorded and not
            fine-tuned; with ``screening`` it does not count, up to ``4 × trials`` of them.
        workers: trials in flight at once (default: ``floor(GPUs / gpus_per_trial)`` when trials
            use GPUs, else :func:`default_workers`).
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
        device: where trials fine-tune and validate (``"cpu"``, ``"cuda"``, ``"auto"``: CUDA in
            each Ray worker that Ray gave a GPU); lowering and latency timing stay on the CPU.
            Checked before anything runs (see :func:`autoshrink.search.gpus.plan_devices`).
        gpus_per_trial: GPUs Ray gives each trial (default 1 when trials use a GPU; 0.5 packs
            two fine-tunes on one GPU). ``workers`` then defaults to ``floor(GPUs / gpus_per_trial)``.
        runtime: the deployment runtime (``"inductor"``, ``"onnxruntime"``, ``"openvino"``): every
            latency (gate, teacher in fp32) is timed in it, the fine-tuned model is evaluated in it,
            and ``best/`` holds its artifact (``model.onnx``, ``model.xml``/``.bin``).
        warm_start: an earlier run folder (or storage URL) of the same teacher, space and runtime:
            its measured trials are told to the new study's sampler first, judged against this
            ``budget`` (which may differ). They do not count towards ``trials`` and are not results
            of this run (see :mod:`autoshrink.search.warm`). Not with ``resume``.
        predictor_screening: a sampled candidate that the calibrated latency predictor puts over
            the latency budget by more than three held-out median errors is recorded as over budget
            without being compiled (:mod:`autoshrink.search.screening`). None (default): only where
            the predictor meets its goal on this machine (held-out τ ≥ 0.9, median error ≤ 10 %);
            True: wherever it is calibrated; False: never. The study records whether it was on and
            why (``StudyAttr.PREDICTOR_SCREENING``) and the compilations it saved.
        solver: with a budget, in a new study, enqueue up to 3 proposals right after the
            budget-edge baseline: the choices per rule that minimise the summed no-fine-tune
            accuracy drop under the predicted budget (:mod:`autoshrink.search.solver`). Each is
            still measured for real by the gate. Only with ``enqueue_baselines``; off for
            ``sampler="grid"`` (it tries every point).

    Returns:
        A :class:`autoshrink.result.SearchResult`.

    Raises:
        DeviceError: ``device="cuda"`` without a GPU (here, or in the cluster at ``ray_address``),
            or a ``gpus_per_trial`` that does not apply or cannot be granted.
        SearchError: unusable run folder, resume mismatch, unknown sampler, a budget that even
            the space's cheapest configuration misses (the message names the minimum), or a
            ``warm_start`` source of another teacher, space or runtime (or with ``resume``).
        TaskError: a model that ``torch.export`` cannot capture.
        KeyboardInterrupt: after Ctrl-C or SIGTERM, once the trials so far are recorded and the
            run folder's files written (``resume=True`` continues).
        SpaceError: a space that does not fit the model, or a continuous knob with ``sampler="grid"``.
        ValueError: an unknown ``runtime``.
        MissingRuntimeError: ``runtime``'s optional extra is not installed (one line with the
            ``pip install`` command), before any training.

    Example:
        >>> import autoshrink as ash
        >>> task = ash.tasks.get("digits")                                     # doctest: +SKIP
        >>> result = ash.search(task, None, ash.Budget(latency_ms=5), trials=12)  # doctest: +SKIP
        >>> result.best                                                        # doctest: +SKIP
    """
    _env.configure()

    from autoshrink.plan import check_space
    from autoshrink.result import load

    budget = budget or Budget()
    validate_counts(trials, workers, minutes)
    if predictor_screening is not None and not isinstance(predictor_screening, bool):
        from autoshrink.errors import InputError

        raise InputError(f"predictor_screening must be True, False or None (auto), got {predictor_screening!r}")
    if ray_address:  # in seconds, before anything is compressed
        check_ray_address(ray_address)
    # before anything is built or timed: --device cuda without a GPU fails in seconds
    devices = plan_devices(device, gpus_per_trial, workers, ray_address)
    from autoshrink.runtimes import get as get_runtime

    get_runtime(runtime)  # unknown, or its extra missing: one line, before anything is trained
    # None: the bundled default for the model it was written for, else a space derived from the
    # model's graph; "auto"; or a YAML path. Bound and checked here, before anything is compressed.
    space = check_space(task.model, task.example_input, space)
    out_dir = check_run_folder(out, resume=resume, storage=storage, study_name=study_name,
                               space=space, budget=budget)
    from autoshrink.search.warm import check_warm_start, teacher_fingerprint

    teacher = teacher_fingerprint(task.model)
    warm = None if warm_start is None else check_warm_start(
        warm_start, space=space, runtime=runtime, resume=resume, study_name=study_name, teacher=teacher,
        latency_threads=latency_threads)
    workers = devices.workers
    sampler_obj = make_sampler(sampler, seed, space)
    size = grid_size(sampler_obj)
    if size is not None:  # grid: each point once, plus the baselines
        trials = min(trials, size + (len(baselines(space)) if enqueue_baselines else 0))
    config = SearchConfig(
        trials=trials, workers=workers, out=out_dir, storage=storage or default_storage(out_dir),
        study_name=study_name, join=storage is not None, resume=resume, seed=seed, sampler=sampler,
        ray_address=ray_address,
        settings=TrialSettings(threads=threads_per_worker or default_threads(workers),
                               latency_threads=latency_threads, latency_runs=latency_runs, seed=seed,
                               device=devices.device, gpus_per_trial=devices.gpus_per_trial,
                               runtime=runtime),
        early_stopping=early_stopping, enqueue_baselines=enqueue_baselines, progress=progress,
        max_drop=max_drop, latency_target=latency_target, screening=screening, minutes=minutes,
        predictor_screening=predictor_screening,
        solver=solver and sampler != "grid",
    )
    return _run(task, space, budget, config, sampler_obj, load, warm=warm, teacher=teacher)


def _run(task: Task, space: SearchSpace, budget: Budget, config: SearchConfig, sampler_obj, load, *,
         warm=None, teacher: str | None = None):
    """Preflight, open the study, enqueue baselines and re-runs, (warm start), drive, write the run folder."""
    from autoshrink.measure.load import load_warning, sample_load

    if not config.resume:  # a resumed study passed these checks when it began
        check_exportable(task)
    machine = sample_load()  # before any timing: a busy machine makes every latency read high
    said = [load_warning(machine)]
    probe, probe_s = _first_edge_probe(task, space, budget, config)
    said += check_reachable(task, space, budget, config.settings, latency=config.time_here, met=probe)
    for line in said:
        if line and config.progress:
            print(f"warning: {line}")
    study = open_study(config.storage, config.study_name, sampler_obj, config.resume, config.out, space,
                       config.join, budget)
    study.set_user_attr(StudyAttr.MACHINE_LOAD, machine)
    if teacher is not None and not config.resume and StudyAttr.TEACHER_FINGERPRINT not in study.user_attrs:
        study.set_user_attr(StudyAttr.TEACHER_FINGERPRINT, teacher)  # what a later warm start checks
    add_warnings(study, said)

    # a grid is walked point by point: every point counts, met or missed
    screen_limit = 0 if grid_size(sampler_obj) is not None or not config.screening else SCREEN_FACTOR * config.trials
    driver = Driver(task=task, space=space, study=study, config=config.driver(budget, screen_limit))
    driver.record_meta(**{StudyAttr.SAMPLER: config.sampler, StudyAttr.SEED: config.seed,
                          StudyAttr.TRIALS: config.trials, StudyAttr.MAX_DROP: config.max_drop,
                          StudyAttr.DEVICE: config.settings.device,
                          StudyAttr.GPUS_PER_TRIAL: config.settings.gpus_per_trial})
    requeue = driver.fail_interrupted()
    if config.enqueue_baselines and not any(True for _ in study.trials if _.number >= 0) and not config.resume:
        _enqueue_baselines(task, space, budget, config, study, [probe] if probe else [], probe_s)
    for number, params in requeue:
        study.enqueue_trial(params, user_attrs={TrialAttr.RERUN_OF: number})
    if warm is not None:  # after the baselines: they keep the first numbers (the hand baseline is trial 0)
        from autoshrink.search.warm import copy_trials, describe

        summary = copy_trials(warm, study, budget)
        if config.progress:
            print(describe(summary, budget))
    try:
        driver.run(config.trials)
        if not driver.interrupted:  # before close(): a latency target re-times on its own node
            say = print if config.progress else None
            try:
                lines = finalize(task, study, budget, config.out, latency_runs=config.settings.latency_runs,
                                 latency_threads=config.settings.latency_threads,
                                 lock_dir=config.settings.lock_dir, max_drop=config.max_drop,
                                 meter=driver.meter, say=say, runtime=config.runtime)
            except Exception as exc:  # noqa: BLE001 - the trials are done: keep them, and say what is missing
                lines = add_warnings(study, [f"the finalists were not re-timed or scored on the test split "
                                             f"({type(exc).__name__}: {exc}); figures are the trials' own"])
            for line in lines:
                print(f"warning: {line}", file=sys.stderr)
    finally:
        driver.close()
    study.set_user_attr(StudyAttr.TIMED_OUT, driver.timed_out)
    result = load(config.out, storage=config.storage, study_name=config.study_name, max_drop=config.max_drop)
    if driver.terminated:  # SIGTERM: what is done is recorded; end within seconds (plots take longer)
        from autoshrink.report import write_csv_atomic

        write_csv_atomic(result.trials, config.out / "trials.csv")
    else:
        result.write()
    if driver.interrupted:  # Ctrl-C / SIGTERM: what is done is recorded and written; stop here
        written = "study.db, trials.csv" if driver.terminated else "trials.csv, pareto.png"
        stop = KeyboardInterrupt(
            f"interrupted; the trials so far are recorded in {config.out} ({written}): "
            "continue with --resume (resume=True) and the same arguments"
        )
        stop.sigterm = driver.terminated  # the command line then ends at once
        raise stop
    return result


def _first_edge_probe(task: Task, space: SearchSpace, budget: Budget,
                      config: SearchConfig) -> tuple[list | None, float]:
    """The budget edge's first probe (all-int8, unpruned) and the seconds it took, taken before
    the reachability check when the search will look for the edge: when it meets the budget, the
    budget is reachable and the cheapest configuration need not be timed. ``(None, 0.0)`` when no
    edge is sought, or the probe failed (the check and the edge then measure as they would without
    it, and the edge records the failure)."""
    if config.resume or not config.enqueue_baselines or not config.time_here or budget.latency_ms is None:
        return None, 0.0
    start = time.perf_counter()
    try:
        return edge_probe(task, space, budget, config.settings), time.perf_counter() - start
    except Exception:  # noqa: BLE001 - no verdict from it: the check and the edge measure on their own
        return None, 0.0


def _enqueue_baselines(task: Task, space: SearchSpace, budget: Budget, config: SearchConfig, study,
                       probes: list[list] = (), probes_s: float = 0.0) -> None:
    """The uniform int8 baselines, first in a new study; under a latency budget timed here,
    starting at the budget edge (``probes``: ones already taken); the solver's proposals right
    after that first baseline."""
    edge = None
    found = None
    if config.time_here and budget.latency_ms is not None:
        found = budget_edge(task, space, budget, config.settings, probes=probes, probes_s=probes_s)
        study.set_user_attr(StudyAttr.BUDGET_EDGE, found)
        edge = found and found["prune"]
        if found and found.get("error"):  # shown, not only stored: the baselines fall back to fixed ratios
            line = (f"budget-edge probe failed ({found['error']}); the search starts from the fixed "
                    "uniform baselines instead")
            add_warnings(study, [line])
            if config.progress:
                print(f"warning: {line}")
        if edge is not None and config.progress:
            print(f"budget edge: uniform int8 pruned {edge:.1%} meets {budget.describe()} "
                  f"({len(found['probes'])} probes, {found['seconds']:.0f} s); tried first")
    first, *rest = [(cand, Proposer.BASELINE) for cand in baselines(space, space_defaults(space), edge)]
    proposed = [(cand, Proposer.SOLVER) for cand in _proposals(task, space, budget, config, study, found)]
    queue: dict[str, tuple[dict, str]] = {}  # a proposal equal to a baseline takes no slot of its own
    for cand, origin in [first, *proposed, *rest]:
        params = space.candidate_params(cand)
        queue.setdefault(json.dumps(params, sort_keys=True), (params, origin))
    # the budget edge and the solver take seconds to minutes: a second driver of a shared study may
    # have found it empty meanwhile and enqueued the same plan; only the first to get here enqueues
    if study.get_trials(deepcopy=False):
        return
    for params, origin in list(queue.values())[:config.trials]:  # (more would stay WAITING in the study)
        study.enqueue_trial(params, user_attrs={TrialAttr.PROPOSED_BY: origin}, skip_if_exists=True)


def _proposals(task: Task, space: SearchSpace, budget: Budget, config: SearchConfig, study, probed: dict | None):
    """The solver's proposals (:func:`autoshrink.search.solver.propose`), recorded and said;
    none when it is off, when the budget sets no limit, when latency is timed elsewhere, or when
    the search has a single trial (the first plan takes it)."""
    from autoshrink.search.solver import propose

    limits = budget.constraints()
    if not config.solver or not limits or (TrialAttr.LATENCY_MS in limits and not config.time_here):
        return []
    if config.trials < 2:  # the first plan takes the only trial: proposals would never run
        return []
    # the budget-edge probes were timed as trials time: they anchor the latency table's predictions
    anchors = [(as_sampled(space, baselines(space, space_defaults(space), edge=p[0])[0]), p[1])
               for p in (probed or {}).get("probes", []) if p[1]]
    anchors = sorted(anchors, key=lambda a: abs(a[1] - budget.latency_ms))[:2] if anchors else []
    found = propose(task, space, budget, latency_threads=config.settings.latency_threads,
                    runtime=config.settings.runtime, anchors=anchors)
    study.set_user_attr(StudyAttr.SOLVER, found.record())
    if found.warning:
        add_warnings(study, [found.line()])
    if config.progress:
        print(found.line() if not found.warning else f"warning: {found.line()}")
    return found.candidates
