"""Teachers trained here on first use: load the cached weights, or train, evaluate and save them.

A cache entry is ``{"model": state_dict, "accuracy": float, "train_s": float}`` written through a
temporary file and ``os.replace``, and read with ``weights_only=True`` (a crafted file cannot run
code). What to do with an entry that does not load is the caller's choice: refuse it with a
:class:`~autoshrink.task.TaskError` that names the file, or delete it and train again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from autoshrink._files import atomic_path
from autoshrink.task import TaskError

__all__ = ["cached_teacher"]


def cached_teacher(
    path: Path,
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module], float],
    *,
    retrain_damaged: bool = False,
) -> tuple[nn.Module, float]:
    """The teacher cached at ``path``, or a new one trained and cached there.

    Args:
        path: the cache file (its name should hash everything the weights depend on).
        build: makes the untrained model (called again for a fresh one after a damaged entry).
        train: trains the model in place and returns its validation accuracy in percent.
        retrain_damaged: an entry that cannot be loaded is deleted and the teacher trained again;
            by default it is refused with a :class:`TaskError`.

    Returns:
        ``(model, accuracy)``, the model in eval mode.

    Raises:
        TaskError: a damaged or tampered entry (without ``retrain_damaged``).
    """
    model = build()
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(saved["model"])
            return model.eval(), float(saved["accuracy"])
        except Exception as exc:  # never trust a damaged or tampered cache file
            if not retrain_damaged:
                raise TaskError(
                    f"the cached teacher {path} cannot be loaded safely ({type(exc).__name__}); "
                    "delete it and it will be trained again"
                ) from None
            path.unlink(missing_ok=True)
            model = build()  # the failed load may have filled part of it
    start = time.perf_counter()
    accuracy = float(train(model))
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "accuracy": accuracy, "train_s": time.perf_counter() - start}, tmp)
    return model.eval(), accuracy
