"""The one schema of what a run stores: attribute keys, trial states, objectives.

Optuna's storage is the record of a run. What autoshrink puts there beyond Optuna's own fields
lives in free-form ``user_attrs``, on the study (:class:`StudyAttr`) and on each trial
(:class:`TrialAttr`); a key spelled differently by the writer and the reader would be lost
silently, so every module names them from here (Optuna does the same with its own keys). Trial
states are Optuna's names (:class:`State`), and the objectives, in the order their values are told
to the study, with their directions (:data:`OBJECTIVES`).

Importing this module is light: it imports neither Optuna nor torch.

Example:
    >>> from autoshrink.record import OBJECTIVES, State, TrialAttr
    >>> State.COMPLETE == "COMPLETE", TrialAttr.LATENCY_MS, list(OBJECTIVES)
    (True, 'latency_ms', ['accuracy', 'latency_ms'])
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "COUNTED_STATES",
    "FINISHED_STATES",
    "FIXED_PARAMS",
    "KIND_SWEEP",
    "METRIC_ATTRS",
    "NOT_COUNTED",
    "OBJECTIVES",
    "RECORD_ATTRS",
    "STUDY_DIRECTIONS",
    "TEACHER_LATENCY_MS_DRIVER",
    "Direction",
    "Proposer",
    "Reason",
    "State",
    "StudyAttr",
    "TrialAttr",
]


class State(str, enum.Enum):
    """How a trial stands: Optuna's ``TrialState`` names, which are also the ``state`` column."""

    RUNNING = "RUNNING"
    WAITING = "WAITING"  # enqueued (a baseline, a re-run), not asked for yet
    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"  # stopped early: could not reach the front
    FAIL = "FAIL"

    # the value, not "State.COMPLETE", in f-strings and str() (as a StrEnum would; Python 3.10 has none)
    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def of(cls, trial: Any) -> State:
        """The state of an Optuna trial (``FrozenTrial`` or anything with ``state.name``)."""
        return cls(trial.state.name)

    @property
    def optuna(self):
        """The matching ``optuna.trial.TrialState`` (imports Optuna)."""
        import optuna

        return optuna.trial.TrialState[self.value]

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES


FINISHED_STATES = frozenset({State.COMPLETE, State.PRUNED, State.FAIL})
#: states of trials that may count towards a search's total (see ``autoshrink.search.accounting``)
COUNTED_STATES = (State.COMPLETE, State.PRUNED, State.FAIL, State.RUNNING)


class Direction(str, enum.Enum):
    """Whether an objective is maximised or minimised."""

    MAX = "max"
    MIN = "min"

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def parse(cls, value: str | Direction, *, column: str = "") -> Direction:
        """Turn ``"max"``/``"min"`` (any case; ``"maximize"``/``"minimize"`` too) into a Direction.

        Raises:
            ValueError: if ``value`` is not a known direction.

        Example:
            >>> Direction.parse("Maximize")
            <Direction.MAX: 'max'>
        """
        if isinstance(value, Direction):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            key = _ALIASES.get(key, key)
            for member in cls:
                if member.value == key:
                    return member
        where = f" for objective {column!r}" if column else ""
        raise ValueError(
            f"direction{where} must be one of {[m.value for m in cls]}, but got {value!r}"
        )

    @property
    def study(self) -> str:
        """Optuna's name for it (``optuna.create_study(directions=[...])``)."""
        return _STUDY_NAMES[self]


_ALIASES = {"maximize": "max", "minimize": "min"}
_STUDY_NAMES = {Direction.MAX: "maximize", Direction.MIN: "minimize"}


class StudyAttr:
    """Keys of the study's ``user_attrs``: what the run was made with, and run-level findings."""

    SPACE_FINGERPRINT = "space_fingerprint"  # SearchSpace.fingerprint(): resume needs the same space
    SPACE_SOURCE = "space_source"  # where the space came from (a YAML path, "auto", ...)
    SPACE = "space"  # SearchSpace.to_dict()
    BUDGET = "budget"  # Budget.constraints(): resume needs the same budget
    TASK = "task"
    TASK_DESCRIPTION = "task_description"
    TEACHER = "teacher"  # the teacher's measured figures (accuracy, latency_ms, ...)
    KIND = "kind"  # "sweep" for a sweep; absent for a search
    SAMPLER = "sampler"
    SEED = "seed"
    TRIALS = "trials"  # the total asked for
    MAX_DROP = "max_drop"
    BUDGET_EDGE = "budget_edge"  # see autoshrink.search.budget_edge
    TIMED_OUT = "timed_out"  # the `minutes` limit stopped new trials
    LATENCY_MEASURED_ON = "latency_measured_on"  # the Ray node that timed latency, if not each worker
    DEVICE = "device"  # where trials fine-tune, as asked (cpu / cuda / auto); each trial's finetune_device says where
    GPUS_PER_TRIAL = "gpus_per_trial"  # Ray's num_gpus per trial
    RUNTIME = "runtime"  # the deployment runtime every latency and accuracy was taken in
    # after the trials (Optuna refuses user attrs on finished trials, so these are study-level, by trial number)
    DEPLOYED = "deployed"  # {number: Spread.columns()}: finalists re-timed from their shipped artifacts
    TEST_SCORES = "test_scores"  # {number: {test_accuracy, test_accuracy_se}}: the test split, scored once
    WARNINGS = "warnings"  # [line, ...]: degradations a user must hear (summary, report)
    MACHINE_LOAD = "machine_load"  # autoshrink.measure.load.sample_load() at the search's start
    TEACHER_FINGERPRINT = "teacher_fingerprint"  # hash of the teacher's state_dict: a warm start needs the same
    WARM_START = "warm_start"  # {from, copied, infeasible, left_out}: the earlier study's trials told to the sampler
    # the latency predictor's screening: {"on", "why", "machine", "tau", "median_error", "examples"}
    PREDICTOR_SCREENING = "predictor_screening"
    COMPILATIONS_SAVED = "compilations_saved"  # candidates the predictor screened: never compiled nor timed
    SOLVER = "solver"  # autoshrink.search.solver.Proposals.record(): the proposals, their predictions, seconds

    ALL = (SPACE_FINGERPRINT, SPACE_SOURCE, SPACE, BUDGET, TASK, TASK_DESCRIPTION, TEACHER, KIND,
           SAMPLER, SEED, TRIALS, MAX_DROP, BUDGET_EDGE, TIMED_OUT, LATENCY_MEASURED_ON, DEVICE,
           GPUS_PER_TRIAL, RUNTIME, DEPLOYED, TEST_SCORES, WARNINGS, MACHINE_LOAD, TEACHER_FINGERPRINT,
           WARM_START, PREDICTOR_SCREENING, COMPILATIONS_SAVED, SOLVER)


#: ``StudyAttr.KIND`` of a sweep
KIND_SWEEP = "sweep"
#: key inside ``StudyAttr.TEACHER``: the teacher's latency as timed by the driver, when a
#: latency-target node re-timed it (then ``latency_ms`` is the target's figure)
TEACHER_LATENCY_MS_DRIVER = "latency_ms_driver"


class TrialAttr:
    """Keys of each trial's ``user_attrs``. The metric keys are also ``trials.csv`` columns."""

    # metrics (TrialResult fields)
    ACCURACY = "accuracy"
    ACCURACY_SE = "accuracy_se"
    LATENCY_MS = "latency_ms"
    LATENCY_IQR_MS = "latency_iqr_ms"
    SIZE_MB = "size_mb"
    MMACS = "mmacs"
    BOPS = "bops"
    PARAMS = "params"  # the parameter count (a metric), not Optuna's sampled params
    MEETS_BUDGET = "meets_budget"
    FINETUNE_S = "finetune_s"
    COMPRESS_S = "compress_s"
    MEASURE_S = "measure_s"
    EVALUATE_S = "evaluate_s"
    ERROR = "error"  # why a trial failed (or a Reason for one that does not count)
    # per-trial records
    HISTORY = "history"  # [(step, accuracy), ...] during the fine-tune
    LAYERS = "layers"  # per-layer plan: bits, channels before -> after, MACs
    SKIPPED_LAYERS = "skipped_layers"  # layer -> why it was not compressed
    CANDIDATE = "candidate"  # Candidate.to_dict()
    # bookkeeping
    DRIVER = "driver"  # "host:pid" of the driver that asked for it
    RERUN_OF = "rerun_of"  # the interrupted trial this one re-runs
    PROPOSED_BY = "proposed_by"  # an enqueued trial's origin: Proposer.SOLVER or Proposer.BASELINE
    # sweeps: the given candidate (flat) and its position in the list given
    CANDIDATE_PARAMS = "candidate_params"
    CANDIDATE_INDEX = "candidate_index"
    FINETUNE_DEVICE = "finetune_device"  # where the fine-tune ran: "cpu", "cuda:0 (NVIDIA H200)"
    # the runtime that timed the trial (metrics, trials.csv columns) and its float layers (a record)
    RUNTIME = "runtime"
    RUNTIME_VERSION = "runtime_version"
    LATENCY_THREADS = "latency_threads"
    RUNTIME_FP32_LAYERS = "runtime_fp32_layers"  # layer -> why that runtime runs it with a float kernel
    # what compression left alone, and why
    FP32_LAYERS = "fp32_layers"  # layer -> why it stayed fp32 though int8 was asked (its kernel did not compile)
    UNPRUNED_GROUPS = "unpruned_groups"  # [{"layers": [...], "reason": "left unpruned: ..."}, ...]
    UNCOUNTED_OPS = "uncounted_ops"  # operator -> calls fvcore did not count: mmacs is "at least"
    # quantization caveats of the worker (autoshrink.compress.quantize): torchao patches it could not
    # install, 7-bit int8 weights on a CPU without VNNI
    PATCH_WARNINGS = "patch_warnings"
    WARM_FROM = "warm_from"  # {run, trial}: copied from an earlier study (sampler only; not counted, not a result)
    # the latency predictor: a screened candidate's predicted latency (its latency_ms stays empty: never
    # measured), and what a measured one's graph is made of (worker -> driver, a calibration example)
    PREDICTED_LATENCY_MS = "predicted_latency_ms"
    LATENCY_STRUCTURE = "latency_structure"

    ALL = (ACCURACY, ACCURACY_SE, LATENCY_MS, LATENCY_IQR_MS, SIZE_MB, MMACS, BOPS, PARAMS,
           MEETS_BUDGET, FINETUNE_S, COMPRESS_S, MEASURE_S, EVALUATE_S, ERROR, HISTORY, LAYERS,
           SKIPPED_LAYERS, CANDIDATE, DRIVER, RERUN_OF, PROPOSED_BY, CANDIDATE_PARAMS, CANDIDATE_INDEX,
           FINETUNE_DEVICE, RUNTIME, RUNTIME_VERSION, LATENCY_THREADS, RUNTIME_FP32_LAYERS, FP32_LAYERS,
           UNPRUNED_GROUPS, UNCOUNTED_OPS, PATCH_WARNINGS, WARM_FROM, PREDICTED_LATENCY_MS, LATENCY_STRUCTURE)


class Proposer:
    """``TrialAttr.PROPOSED_BY`` values: who enqueued a trial before the sampler's first one."""

    SOLVER = "solver"  # autoshrink.search.solver
    BASELINE = "baseline"  # autoshrink.search.baselines


#: the metrics a finished trial stores, in ``TrialResult.metrics()`` terms
METRIC_ATTRS = (
    TrialAttr.ACCURACY, TrialAttr.ACCURACY_SE, TrialAttr.LATENCY_MS, TrialAttr.LATENCY_IQR_MS,
    TrialAttr.SIZE_MB, TrialAttr.MMACS, TrialAttr.BOPS, TrialAttr.PARAMS, TrialAttr.MEETS_BUDGET,
    TrialAttr.FINETUNE_S, TrialAttr.COMPRESS_S, TrialAttr.MEASURE_S, TrialAttr.EVALUATE_S,
    TrialAttr.ERROR, TrialAttr.FINETUNE_DEVICE, TrialAttr.RUNTIME, TrialAttr.RUNTIME_VERSION, TrialAttr.LATENCY_THREADS,
)
#: the per-trial records stored beside the metrics, when not empty
RECORD_ATTRS = (TrialAttr.HISTORY, TrialAttr.LAYERS, TrialAttr.SKIPPED_LAYERS, TrialAttr.RUNTIME_FP32_LAYERS,
                TrialAttr.FP32_LAYERS, TrialAttr.UNPRUNED_GROUPS, TrialAttr.UNCOUNTED_OPS)
#: Optuna's system attribute holding an enqueued trial's given params
FIXED_PARAMS = "fixed_params"


class Reason:
    """``TrialAttr.ERROR`` texts the driver writes itself, for trials that do not count."""

    INTERRUPTED = "interrupted: the driver stopped before this trial finished (re-run on resume)"
    SURPLUS = "not run: the study already had its trials (another driver sharing it asked first)"
    NO_REASON = "failed without a reason"
    NOT_RECOVERED = ("not recovered: trials/ holds no record of this trial (it had not finished, or its "
                     "record was lost)")
    NO_ACCURACY = ("finished without an accuracy (the evaluation gave None or NaN: a diverged fine-tune, "
                   "or a metric that returned no number)")
    PREDICTED_OVER_BUDGET = ("screened: the calibrated latency predictor puts it over the budget by more than "
                             "three held-out median errors (never compiled; predicted_latency_ms)")


#: trials that do not count towards the total: re-run on resume, or never run at all
NOT_COUNTED = (Reason.INTERRUPTED, Reason.SURPLUS, Reason.NOT_RECOVERED)

#: the objectives, in the order their values are told to the study, and their directions
OBJECTIVES: dict[str, Direction] = {TrialAttr.ACCURACY: Direction.MAX, TrialAttr.LATENCY_MS: Direction.MIN}
#: ``optuna.create_study(directions=STUDY_DIRECTIONS)``
STUDY_DIRECTIONS = [d.study for d in OBJECTIVES.values()]
