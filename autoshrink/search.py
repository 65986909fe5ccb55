"""The controller: an Optuna study asks for candidates, Ray runs them as trials.

Optuna's storage (``study.db`` in the run folder by default, any RDB URL otherwise) is the one
record of every trial: its parameters, metrics, state and failure reason. The driver drives
Optuna's ask/tell interface and keeps ``workers`` Ray tasks in flight; this costs ~0.03 s per
trial (Ray Tune would add ~1 s per trial and a second record to keep consistent).

Objectives: maximise accuracy, minimise latency; the budget is a constraint (Optuna's
``constraints_func``), so TPE/NSGA-II learn where the feasible region is. A candidate that misses
the budget is never fine-tuned; it is recorded with its measured cost and an accuracy of 0 for
the sampler (NaN in ``trials.csv``: it was not measured).
"""

from __future__ import annotations

import math
import os
import socket
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoshrink import _env
from autoshrink.budget import Budget
from autoshrink.candidate import Candidate
from autoshrink.space import SearchSpace
from autoshrink.task import Task

__all__ = ["SearchError", "baselines", "default_workers", "search"]

INTERRUPTED = "interrupted: the driver stopped before this trial finished (re-run on resume)"
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


def baselines(space: SearchSpace, candidate_defaults: Candidate | None = None) -> list[Candidate]:
    """The obvious configurations, tried first so a search never ends worse than them:
    all-int8, and int8 with uniform pruning at 25 % and 50 %."""
    base = candidate_defaults or Candidate()
    out = []
    for ratio in (0.0, 0.25, 0.5):
        out.append(
            Candidate.uniform(
                bits=8, prune=ratio, temperature=base.kd_temperature, alpha=base.kd_alpha,
                steps=base.finetune_steps, lr=base.lr, batch_size=base.batch_size,
                round_to=base.round_to,
            )
        )
    return out


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
    raise SearchError(f"unknown sampler {name!r}; choose one of ['tpe', 'nsga2', 'random']")


def _open_study(storage: str, study_name: str, sampler, resume: bool, out: Path,
                space: SearchSpace | None, join: bool = False):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if resume and study_name not in existing:
        raise SearchError(
            f"--resume: no study {study_name!r} in {storage} (run folder {str(out)!r}); "
            "start a new search without --resume"
        )
    if not resume and not join and study_name in existing:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
        if any(t.state.is_finished() for t in study.trials):
            raise SearchError(
                f"{str(out)!r} already holds a search ({len(study.trials)} trials); "
                "pass --resume to continue it or choose another --out"
            )
    study = optuna.create_study(
        storage=storage, study_name=study_name, sampler=sampler,
        directions=["maximize", "minimize"], load_if_exists=True,
    )
    fp = study.user_attrs.get("space_fingerprint")
    if space is not None and fp is not None and fp != space.fingerprint():
        raise SearchError(
            f"--resume: the study in {str(out)!r} was made with a different search space "
            f"({study.user_attrs.get('space_source')}); resume with the same space or use a new --out"
        )
    return study


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
):
    """Search for the best compression of ``task.model`` under ``budget``.

    Args:
        task: teacher, data and metric (e.g. ``autoshrink.tasks.get("digits")``).
        space: a :class:`SearchSpace`, a YAML path, or None for the bundled default.
        budget: hardware limits (default: no limits).
        trials: total trials in the study (a resumed study counts its finished trials).
        workers: trials in flight at once (default: :func:`default_workers`).
        out: run folder (default ``runs/<timestamp>``).
        resume: continue the study in ``out`` (interrupted trials are failed and re-run).
        seed: seeds the sampler and fine-tuning; the same seed, space and task give the same
            sequence of candidates.
        sampler: "tpe" (with constraints, default), "nsga2" or "random".
        storage: an Optuna storage URL (default ``sqlite:///<out>/study.db``).
        study_name: the study's name in the storage (several drivers may share one).
        ray_address: join an existing Ray cluster instead of starting a local one.
        threads_per_worker: torch threads per trial (default: cores // workers).
        latency_threads: threads while timing latency.
        latency_runs: timed runs per latency measurement.
        early_stopping: stop fine-tunes that another trial clearly dominates mid-way.
        enqueue_baselines: try the uniform baselines first (new studies only).
        progress: show a progress bar.
        max_drop: accuracy-constraint mode: pick the fastest trial within this many points of
            the teacher.

    Returns:
        A :class:`autoshrink.result.SearchResult`.

    Raises:
        SearchError: unusable run folder, resume mismatch, unknown sampler.
        SpaceError: a space that does not fit the model.

    Example:
        >>> import autoshrink as ash                                          # doctest: +SKIP
        >>> result = ash.search(ash.tasks.get("digits"), None, ash.Budget(latency_ms=5), trials=12)
        >>> result.best                                                        # doctest: +SKIP
    """
    _env.configure()
    import optuna

    from autoshrink.compress.quantize import quantizable_layers
    from autoshrink.result import SearchResult, load

    budget = budget or Budget()
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if space is None:
        space = SearchSpace.default()
    elif not isinstance(space, SearchSpace):
        space = SearchSpace.from_yaml(space)
    space = space.bind(quantizable_layers(task.model))
    out_dir = _prepare_out(out)
    join = storage is not None  # drivers sharing an explicit storage join one study
    storage = storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    workers = workers or default_workers()
    threads = threads_per_worker or max(1, (os.cpu_count() or 2) // workers)
    study = _open_study(storage, study_name, _make_sampler(sampler, seed, space), resume, out_dir,
                        space, join)

    driver = _Driver(task, space, budget, study, out_dir, workers, _Settings(
        threads=threads, latency_threads=latency_threads, latency_runs=latency_runs,
        eval_every=0, seed=seed, lock_dir=None,
    ), ray_address, early_stopping, progress)
    driver.record_meta(sampler=sampler, seed=seed, trials=trials, max_drop=max_drop)
    requeue = driver.fail_interrupted()
    if enqueue_baselines and not any(True for _ in study.trials if _.number >= 0) and not resume:
        for cand in baselines(space, _space_defaults(space)):
            study.enqueue_trial(space.candidate_params(cand), skip_if_exists=True)
    for params in requeue:
        study.enqueue_trial(params)
    try:
        driver.run(trials)
    finally:
        driver.close()
    result = load(out_dir, storage=storage, study_name=study_name, max_drop=max_drop)
    result.write()
    return result


def _space_defaults(space: SearchSpace) -> Candidate:
    # the space's own fine-tune settings at their first choice / low end, for the baselines
    class _First:
        def suggest_categorical(self, name, choices):
            return choices[0]

        def suggest_float(self, name, low, high, step=None, log=False):
            return math.sqrt(low * high) if log else (low + high) / 2

        def suggest_int(self, name, low, high, step=1):
            return low

    return space.sample(_First())


class _Driver:
    """Keeps ``workers`` trials in flight, records every outcome in the study."""

    def __init__(self, task, space, budget, study, out, workers, settings, ray_address,
                 early_stopping, progress) -> None:
        self.task, self.space, self.budget, self.study = task, space, budget, study
        self.out, self.workers, self.settings = out, workers, settings
        self.ray_address, self.early_stopping, self.show_progress = ray_address, early_stopping, progress
        self._ray_started = False
        self._stop = False

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

    def fail_interrupted(self) -> list[dict]:
        """Trials left RUNNING by a killed driver: mark them FAIL and return their params."""
        import optuna

        requeue = []
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if _driver_alive(t.user_attrs.get("driver")):
                continue  # another live driver on this storage owns it
            optuna.Trial(self.study, t._trial_id).set_user_attr("error", INTERRUPTED)
            self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            requeue.append(dict(t.params))
        return requeue

    def _committed(self) -> int:
        """Trials that count towards the total: finished ones and those running anywhere
        (several drivers may share the study), but not the interrupted ones."""
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                  optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING)
        return sum(
            1 for t in self.study.get_trials(deepcopy=False, states=states)
            if t.user_attrs.get("error") != INTERRUPTED
        )

    def _finished(self) -> int:
        import optuna

        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                optuna.trial.TrialState.FAIL)
        return sum(
            1 for t in self.study.get_trials(deepcopy=False, states=done)
            if t.user_attrs.get("error") != INTERRUPTED
        )

    # -- ray ----------------------------------------------------------------------------------------
    def _start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.ray_address:
            ray.init(address=self.ray_address, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(
                num_cpus=self.workers * self.settings.threads,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                logging_level="ERROR",
                configure_logging=False,
            )
            self._ray_started = True

    def close(self) -> None:
        if self._ray_started:
            import ray

            ray.shutdown()

    # -- main loop ----------------------------------------------------------------------------------
    def run(self, total: int, propose=None) -> None:
        """Run trials until ``total`` count in the study.

        Args:
            propose: ``propose(trial) -> Candidate``; default: sample the space.
        """
        import optuna
        import ray

        from autoshrink._worker import Rungs, run_trial
        from autoshrink.compress.distill import teacher_logits
        from autoshrink._progress import ProgressView

        if self._committed() >= total:
            return
        self._start_ray()
        task_ref = ray.put(self.task)
        logits = teacher_logits(self.task.model, self.task.train_data)
        logits_ref = ray.put(logits)
        remote = ray.remote(num_cpus=self.settings.threads, max_retries=1)(run_trial)
        rungs = ray.remote(num_cpus=0)(Rungs).remote() if self.early_stopping else None
        budget = self.budget.constraints()
        view = ProgressView(total, self._finished(), enabled=self.show_progress)
        inflight: dict[Any, tuple[optuna.trial.Trial, Candidate]] = {}
        old_handler = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_term)
        try:
            while not self._stop:
                while len(inflight) < self.workers and self._committed() < total:
                    trial = self.study.ask()
                    trial.set_user_attr("driver", _DRIVER_ID)
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
                    view.finished(trial.number, metrics, self.budget)
        except KeyboardInterrupt:
            self._stop = True
            view.note("interrupted: stopping, recording what is done")
        finally:
            signal.signal(signal.SIGTERM, old_handler)
            for ref, (trial, _cand) in inflight.items():
                ray.cancel(ref, force=True)
                trial.set_user_attr("error", INTERRUPTED)
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
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
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif state == "PRUNED":
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            accuracy = m.get("accuracy") if not violations else None
            latency = m.get("latency_ms")
            values = [accuracy if accuracy is not None else 0.0,
                      latency if latency is not None else float(1e9)]
            self.study.tell(trial, values)
        if state != "COMPLETE" or violations:
            (self.out / "trials" / f"{trial.number:04d}" / "model.pt2").unlink(missing_ok=True)
        cand_path = self.out / "trials" / f"{trial.number:04d}" / "candidate.json"
        cand_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(cand_path, cand.to_json())


_DRIVER_ID = f"{socket.gethostname()}:{os.getpid()}"


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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ray_reason(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    if "OutOfMemory" in name or "memory" in first.lower():
        return f"out of memory: the worker was killed ({name})"
    if "WorkerCrashed" in name or "died" in first.lower() or "ActorDied" in name:
        return f"worker process died (killed by the OS or crashed), retried once: {name}"
    return f"{name}: {first[:300]}"
