"""autoshrink: find how to shrink a trained PyTorch model to a hardware budget.

Structured pruning (torch-pruning), per-layer int8/int4 weight quantization (PT2E, real x86 int8
kernels), and a short knowledge-distillation fine-tune, searched by Optuna on Ray workers; the
Pareto front of accuracy vs measured latency, and the best model that meets the budget.

Importing this package is light: torch is imported, but not ray, optuna or any model.
"""

from __future__ import annotations

from autoshrink import _env

_env.configure()

# Each of these modules keeps its heavy imports (ray, optuna, torch-pruning, torchao, fvcore)
# inside the functions that need them. The functions named like their modules (search, sweep,
# sensitivity) are bound here so that `autoshrink.search` is always the function.
from autoshrink.budget import Budget  # noqa: E402
from autoshrink.candidate import Candidate  # noqa: E402
from autoshrink.compress import apply  # noqa: E402
from autoshrink.frontier import hypervolume, pareto_front  # noqa: E402
from autoshrink.plan import plan  # noqa: E402
from autoshrink.result import load  # noqa: E402
from autoshrink.search import search  # noqa: E402
from autoshrink.sensitivity import sensitivity  # noqa: E402
from autoshrink.space import SearchSpace, SpaceError  # noqa: E402
from autoshrink.sweep import grid, sweep  # noqa: E402
from autoshrink.task import Task, TaskError  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "Candidate",
    "SearchSpace",
    "SpaceError",
    "Task",
    "TaskError",
    "__version__",
    "apply",
    "grid",
    "hypervolume",
    "load",
    "models",
    "pareto_front",
    "plan",
    "search",
    "sensitivity",
    "sweep",
    "tasks",
]


def __getattr__(name: str):
    # The model zoo and built-in tasks load on first use.
    import importlib

    if name in ("models", "tasks"):
        return importlib.import_module(f"autoshrink.{name}")
    raise AttributeError(f"module 'autoshrink' has no attribute {name!r}")
