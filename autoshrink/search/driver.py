"""The ask/tell driver: keeps ``workers`` Ray tasks in flight and records every outcome in the
study.

Optuna's ask/tell interface costs ~0.03 s per trial (Ray Tune would add ~1 s per trial and a
second record to keep consistent). Under a latency budget, the sampler sees a feasible trial's
latency raised to the budget: the goal is the most accurate model within it, and a model faster
than needed is not better (``trials.csv`` keeps the measured latency). A candidate that misses
the budget is never fine-tuned; it is recorded with its measured cost and an accuracy of 0 for
the sampler (NaN in ``trials.csv``: it was not measured).

:func:`run_trials` is the entry point for callers outside the search (``sweep``);
:func:`autoshrink.search` drives a :class:`Driver` itself, to enqueue its baselines in between.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from autoshrink._files import write_text_atomic
from autoshrink.candidate import Candidate
from autoshrink.record import (
    METRIC_ATTRS,
    RECORD_ATTRS,
    Reason,
    State,
    StudyAttr,
    TrialAttr,
)
from autoshrink.recover import write_study_record, write_trial_record
from autoshrink.search import accounting
from autoshrink.search.config import DriverConfig, SearchError
from autoshrink.search.ray_backend import latency_meter, ray_reason, ship_user_code_by_value, start_ray
from autoshrink.space import SearchSpace
from autoshrink.task import Task

__all__ = ["DRIVER_ID", "Driver", "driver_alive", "run_trials"]

#: who asked for a trial: ``"host:pid"`` of this process
DRIVER_ID = f"{socket.gethostname()}:{os.getpid()}"

#: a driver names itself on a trial one write after Optuna's ``ask``; a RUNNING trial with no name
#: younger than this may be a live driver's between the two writes, and is waited for, not failed
OWNERLESS_GRACE_S = 30.0


def run_trials(task: Task, study, total: int, config: DriverConfig, *, space: SearchSpace | None = None,
               propose: Callable[[Any], Candidate] | None = None, meta: dict | None = None) -> Driver:
    """Record the run's metadata in ``study``, then run trials until ``total`` count.

    Args:
        task: teacher, data, metric.
        study: the Optuna study to record into (see :func:`autoshrink.search.open_study`).
        total: trials that count towards the end (see :mod:`autoshrink.search.accounting`).
        config: workers, budget, run folder, ...
        space: the search space trials are sampled from (None: ``propose`` gives each candidate).
        propose: ``propose(trial) -> Candidate``; default: sample ``space``.
        meta: further study attributes to record (``StudyAttr`` keys).

    Returns:
        The finished driver: its ``timed_out`` and ``interrupted`` say how the run ended.
    """
    driver = Driver(task=task, space=space, study=study, config=config)
    driver.record_meta(**(meta or {}))
    try:
        driver.run(total, propose)
    finally:
        driver.close()
    return driver


class Driver:
    """Keeps ``config.workers`` trials in flight, records every outcome in the study.

    Args:
        task: teacher, data, metric (None for a driver that only tells and counts).
        space: the search space (None when candidates are proposed, as in a sweep).
        study: the Optuna study.
        config: the rest (see :class:`~autoshrink.search.config.DriverConfig`).
    """

    def __init__(self, *, task: Task | None, space: SearchSpace | None, study, config: DriverConfig) -> None:
        self.task, self.space, self.study, self.config = task, space, study, config
        self.budget = config.budget
        self.out = config.out
        self.timed_out = False  # the `minutes` limit stopped new trials
        self.interrupted = False  # set when Ctrl-C / SIGTERM stopped the run
        self.terminated = False  # set when SIGTERM did
        self._ray_started = False
        self._code_shipped = False
        self._stop = False
        self.meter = None  # the latency target's LatencyMeter actor, once run() has looked for one

    # -- bookkeeping ------------------------------------------------------------------------------
    def record_meta(self, **extra: Any) -> None:
        """Record what the run is made with (space, budget, task, ``extra``) and, once, the
        teacher's measured figures."""
        from autoshrink.measure.teacher import measure_teacher

        s = self.study
        attrs = s.user_attrs
        runtime = self.config.settings.runtime
        if attrs.get(StudyAttr.RUNTIME, runtime) != runtime:  # its latencies were timed elsewhere
            raise SearchError(
                f"the study in {self.out} was timed in {attrs[StudyAttr.RUNTIME]}, not {runtime}: resume it "
                f"with runtime={attrs[StudyAttr.RUNTIME]!r} (--runtime {attrs[StudyAttr.RUNTIME]}), or start a new run"
            )
        if self.space is not None:
            s.set_user_attr(StudyAttr.SPACE_FINGERPRINT, self.space.fingerprint())
            s.set_user_attr(StudyAttr.SPACE_SOURCE, self.space.source)
            s.set_user_attr(StudyAttr.SPACE, self.space.to_dict())
        s.set_user_attr(StudyAttr.BUDGET, self.budget.constraints())
        s.set_user_attr(StudyAttr.TASK, self.task.name)
        s.set_user_attr(StudyAttr.TASK_DESCRIPTION, self.task.description)
        for k, v in extra.items():
            s.set_user_attr(k, v)
        if StudyAttr.TEACHER not in attrs:
            settings = self.config.settings
            s.set_user_attr(StudyAttr.TEACHER, measure_teacher(self.task, settings.latency_threads,
                                                                settings.latency_runs, runtime=settings.runtime))
        s.set_user_attr(StudyAttr.RUNTIME, runtime)

    def fail_interrupted(self) -> list[tuple[int, dict]]:
        """Trials a stopped driver left unfinished, to re-run: those a killed driver left RUNNING
        are marked FAIL (interrupted) here; those a stopped one (Ctrl-C) marked so itself.

        Returns:
            ``(number, params)`` of each interrupted trial that no later trial re-runs yet.
        """
        import optuna

        for t in self.study.get_trials(deepcopy=False, states=(State.RUNNING.optuna,)):
            t = self._owned(t)
            if t is None or driver_alive(t.user_attrs.get(TrialAttr.DRIVER)):
                continue  # another live driver on this storage owns it (or has finished it)
            optuna.Trial(self.study, t._trial_id).set_user_attr(TrialAttr.ERROR, Reason.INTERRUPTED)
            self.study.tell(t.number, state=State.FAIL.optuna)
        return accounting.reruns(self.study.get_trials(deepcopy=False))

    def _owned(self, t, poll_s: float = 0.5):
        """``t`` as it stands once it names its driver, or once ``grace_s`` has passed since it
        started without a name (then it was killed between ask and naming); None if it finished
        meanwhile. Another driver starting at the same moment asks between our two writes."""
        import datetime as dt

        grace_s = OWNERLESS_GRACE_S
        while TrialAttr.DRIVER not in t.user_attrs and t.datetime_start is not None:
            age = (dt.datetime.now() - t.datetime_start).total_seconds()
            if age >= grace_s:
                break
            time.sleep(min(poll_s, grace_s - age))
            t = next(x for x in self.study.get_trials(deepcopy=False) if x.number == t.number)
            if t.state.is_finished():
                return None
        return t

    def committed(self) -> int:
        """Trials that count, running ones included (see :func:`accounting.committed`)."""
        return accounting.committed(self.study.get_trials(deepcopy=False), self.config.screen_limit)

    def finished(self) -> int:
        return accounting.finished(self.study.get_trials(deepcopy=False), self.config.screen_limit)

    def surplus(self, number: int, total: int) -> bool:
        """True if trial ``number`` is beyond the total (see :func:`accounting.is_surplus`)."""
        return accounting.is_surplus(self.study.get_trials(deepcopy=False), number, total,
                                     self.config.screen_limit)

    # -- ray ----------------------------------------------------------------------------------------
    def start_ray(self) -> None:
        """Join the configured cluster, or start a local Ray (shut down by :meth:`close`)."""
        import ray

        from autoshrink._usercode import runtime_env

        if ray.is_initialized():  # a Ray the caller started: no runtime_env of ours
            return
        env = runtime_env(self.task)  # the user's own modules, importable on every worker
        self._code_shipped = env is not None
        started = start_ray(self.config.ray_address, self.config.workers * self.config.settings.threads,
                            runtime_env=env)
        self._ray_started = self._ray_started or started

    def latency_meter(self):
        """A ``LatencyMeter`` actor on the latency-target node, or None (see
        :func:`autoshrink.search.ray_backend.latency_meter`)."""
        settings = self.config.settings
        return latency_meter(self.study, self.task, self.config.latency_target, settings.latency_runs,
                             settings.latency_threads, runtime=settings.runtime)

    def close(self) -> None:
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False

    # -- main loop ----------------------------------------------------------------------------------
    def run(self, total: int, propose: Callable[[Any], Candidate] | None = None) -> None:
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
        from autoshrink._worker import run_trial
        from autoshrink.compress.distill import teacher_logits
        from autoshrink.search.rungs import Rungs

        cfg, settings = self.config, self.config.settings
        if self.committed() >= total:
            return
        self.start_ray()
        if not self._code_shipped:
            ship_user_code_by_value(self.task)
        task_ref = ray.put(self.task)
        # on the driver's own GPU if it has one (with a cluster, the driver may have none)
        logits = teacher_logits(self.task.model, self.task.train_data,
                                device="cpu" if settings.device == "cpu" else "auto")
        logits_ref = ray.put(logits)
        remote = ray.remote(num_cpus=settings.threads, num_gpus=settings.gpus_per_trial,
                            max_retries=1)(run_trial)
        rungs = ray.remote(num_cpus=0)(Rungs).remote() if cfg.early_stopping else None
        if rungs is not None:  # a resumed study's earlier fine-tunes still count as rivals
            rungs.seed.remote({
                t.number: [(step, acc, t.user_attrs.get(TrialAttr.LATENCY_MS),
                            t.user_attrs.get(TrialAttr.CANDIDATE, {}).get("finetune_steps"))
                           for step, acc in t.user_attrs[TrialAttr.HISTORY]]
                for t in self.study.get_trials(deepcopy=False)
                if t.user_attrs.get(TrialAttr.HISTORY) and not accounting.is_warm(t)  # a warm one is no result
            })
        meter = self.meter = self.latency_meter()
        screener = self.start_screening()
        budget = self.budget.constraints()
        view = ProgressView(total, self.finished(), enabled=cfg.progress)
        inflight: dict[Any, tuple[optuna.trial.Trial, Candidate]] = {}
        old_handler = signal.getsignal(signal.SIGTERM)  # Ray's own, after start_ray: not chained
        signal.signal(signal.SIGTERM, self._on_term)
        try:
            while not self._stop:
                while len(inflight) < cfg.workers and self.committed() < total:
                    if (cfg.minutes is not None and begun
                            and time.monotonic() - started > 60 * cfg.minutes):
                        if not self.timed_out:
                            self.timed_out = True
                            view.note(f"time limit: {cfg.minutes:g} min passed; finishing the "
                                      f"{len(inflight)} trial(s) running, starting no more "
                                      "(--resume continues)")
                        break
                    begun += 1
                    trial = self.study.ask()
                    trial.set_user_attr(TrialAttr.DRIVER, DRIVER_ID)
                    if self.surplus(trial.number, total):
                        trial.set_user_attr(TrialAttr.ERROR, Reason.SURPLUS)
                        self.study.tell(trial, state=State.FAIL.optuna)
                        break
                    cand = propose(trial) if propose is not None else self.space.sample(trial)
                    trial.set_user_attr(TrialAttr.CANDIDATE, cand.to_dict())
                    if screener is not None and self.screen(trial, cand, screener, view):
                        continue  # told in milliseconds: never compiled
                    ctx = {
                        "threads": settings.threads,
                        "latency_threads": settings.latency_threads,
                        "latency_runs": settings.latency_runs,
                        "eval_every": max(40, cand.finetune_steps // 3) if cfg.early_stopping else 0,
                        "artifact_dir": str((self.out / "trials" / f"{trial.number:04d}").resolve()),
                        "seed": settings.seed + trial.number,
                        "lock_dir": settings.lock_dir,
                        "meter": meter,
                        "device": settings.device,  # "auto" is resolved in the worker, on its GPUs
                        "runtime": settings.runtime,
                    }
                    ref = remote.remote(task_ref, cand.to_dict(), budget, ctx, logits_ref, rungs,
                                        trial.number)
                    inflight[ref] = (trial, cand)
                    view.started(trial.number, cand)
                if not inflight:
                    break
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                view.tick()  # without a terminal: a plain line at least every 30 s, even while trials run
                for ref in ready:
                    trial, cand = inflight.pop(ref)
                    try:
                        metrics = ray.get(ref)
                    except Exception as exc:  # worker died (OOM killer, kill -9, node lost)
                        metrics = {"state": State.FAIL.value, TrialAttr.ERROR: ray_reason(exc)}
                    self.tell(trial, cand, metrics)
                    view.finished(trial.number, metrics, self.budget, done=self.finished())
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
                    trial.set_user_attr(TrialAttr.ERROR, Reason.INTERRUPTED)
                    self.study.tell(trial, state=State.FAIL.optuna)
                except Exception:  # noqa: BLE001
                    pass
            view.close()

    def start_screening(self):
        """The latency predictor's :class:`~autoshrink.search.screening.Screener` if screening is on
        (refitted on this machine's recorded examples first), else None; the decision and its reason
        are recorded on the study either way."""
        from autoshrink.measure.predictor import LatencyPredictor
        from autoshrink.search.screening import Decision, Screener, decide

        settings = self.config.settings
        pred, calibration, machine = None, None, ""
        try:
            pred = LatencyPredictor.for_machine(settings.latency_threads, runtime=settings.runtime)
            machine = pred.machine
            calibration = pred.calibrate() or pred.calibration
            decision = decide(self.config.predictor_screening, calibration, budget_ms=self.budget.latency_ms,
                              timed_elsewhere=self.meter is not None, latency_runs=settings.latency_runs)
        except Exception as exc:  # noqa: BLE001 - screening is an optimisation: without it, the gate decides
            decision = Decision(False, f"the latency predictor could not be loaded ({type(exc).__name__}: {exc})")
        self.study.set_user_attr(StudyAttr.PREDICTOR_SCREENING, decision.record(calibration, machine))
        if StudyAttr.COMPILATIONS_SAVED not in self.study.user_attrs:
            self.study.set_user_attr(StudyAttr.COMPILATIONS_SAVED, 0)
        return Screener(pred, self.task, self.budget.latency_ms) if decision.on else None

    def screen(self, trial, cand: Candidate, screener, view=None) -> bool:
        """Tell ``trial`` as over budget if ``screener`` screens ``cand`` (True), else leave it to
        the gate (False; also when the prediction itself fails)."""
        try:
            m = screener.check(cand)
        except Exception:  # noqa: BLE001 - a candidate the predictor cannot see: the gate measures it
            return False
        if m is None:
            return False
        self.tell(trial, cand, m)
        self.study.set_user_attr(StudyAttr.COMPILATIONS_SAVED,
                                 int(self.study.user_attrs.get(StudyAttr.COMPILATIONS_SAVED) or 0) + 1)
        if view is not None:
            view.finished(trial.number, {**m, TrialAttr.LATENCY_MS: m[TrialAttr.PREDICTED_LATENCY_MS]},
                          self.budget, done=self.finished())
        return True

    def _on_term(self, *_args) -> None:
        self.terminated = True  # the caller may end the process at once once all is recorded
        raise KeyboardInterrupt

    def tell(self, trial, cand: Candidate, m: dict) -> None:
        """Record a trial's outcome ``m`` (``TrialResult.metrics()``) and tell the study; its
        files go to ``out/trials/NNNN`` (the model only for a fine-tuned trial within budget)."""
        for key in METRIC_ATTRS:
            if key in m and m[key] is not None:
                trial.set_user_attr(key, m[key])
        for key in RECORD_ATTRS:
            if m.get(key):
                trial.set_user_attr(key, m[key])
        if m.get(TrialAttr.PREDICTED_LATENCY_MS) is not None:  # screened by the predictor (not a worker's metric)
            trial.set_user_attr(TrialAttr.PREDICTED_LATENCY_MS, m[TrialAttr.PREDICTED_LATENCY_MS])
        state = State(m.get("state", State.FAIL))
        if m.get(TrialAttr.PATCH_WARNINGS):  # torchao patches the worker could not install: the run hears it
            from autoshrink.search.finalize import add_warnings

            add_warnings(self.study, m[TrialAttr.PATCH_WARNINGS])
        if m.get(TrialAttr.LATENCY_STRUCTURE) and m.get(TrialAttr.LATENCY_MS) and self.meter is None:
            self._record_example(m[TrialAttr.LATENCY_STRUCTURE], m[TrialAttr.LATENCY_MS])
        # a screened candidate was never timed: its prediction stands in for the gate's figure
        seen = dict(m)
        if seen.get(TrialAttr.LATENCY_MS) is None and seen.get(TrialAttr.PREDICTED_LATENCY_MS) is not None:
            seen[TrialAttr.LATENCY_MS] = seen[TrialAttr.PREDICTED_LATENCY_MS]
        limited = (TrialAttr.LATENCY_MS, TrialAttr.SIZE_MB, TrialAttr.MMACS)
        violations = self.budget.violations({k: seen.get(k) for k in limited if seen.get(k) is not None})
        # relative excess over each limit: <= 0 is feasible (Optuna's convention)
        for key, limit in self.budget.constraints().items():
            value = seen.get(key)
            trial.set_constraint(key, (value - limit) / limit if value is not None else 0.0)
        acc = m.get(TrialAttr.ACCURACY)
        if state is State.COMPLETE and not violations and (acc is None or acc != acc):
            # fine-tuned within the budget but no number: told as 0 it would teach the sampler a lie
            state, m = State.FAIL, {**m, TrialAttr.ERROR: Reason.NO_ACCURACY}
        if state is State.FAIL:
            trial.set_user_attr(TrialAttr.ERROR, m.get(TrialAttr.ERROR) or Reason.NO_REASON)
            frozen = self.study.tell(trial, state=State.FAIL.optuna)
        elif state is State.PRUNED:
            frozen = self.study.tell(trial, state=State.PRUNED.optuna)
        else:
            accuracy = m.get(TrialAttr.ACCURACY) if not violations else None
            latency = seen.get(TrialAttr.LATENCY_MS)
            if latency is not None and not violations and self.budget.latency_ms is not None:
                # under a latency budget the goal is the most accurate model within it: being
                # faster than the budget is worth nothing, so the sampler is told so
                latency = max(latency, self.budget.latency_ms)
            values = [accuracy if accuracy is not None else 0.0,
                      latency if latency is not None else 1e9]
            frozen = self.study.tell(trial, values)
        if state is not State.COMPLETE or violations:
            (self.out / "trials" / f"{trial.number:04d}" / "model.pt2").unlink(missing_ok=True)
            for name in ("model.onnx", "model.xml", "model.bin"):  # another runtime's artifact
                (self.out / "trials" / f"{trial.number:04d}" / name).unlink(missing_ok=True)
        write_text_atomic(self.out / "trials" / f"{trial.number:04d}" / "candidate.json", cand.to_json())
        # a second record of the trial, and of the study, that `autoshrink recover` rebuilds study.db from
        write_trial_record(self.out, frozen, m)
        write_study_record(self.out, study_name=self.study.study_name, directions=self.study.directions,
                           user_attrs=self.study.user_attrs)

    @staticmethod
    def _record_example(structure: dict, latency_ms: float) -> None:
        """A measured candidate: one more calibration example of its machine's latency table."""
        from autoshrink.measure.predictor import record_example

        try:
            record_example(structure, latency_ms)
        except (OSError, ValueError, KeyError, TypeError):  # a cache that cannot be written: the search goes on
            pass


def driver_alive(driver: str | None) -> bool:
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
