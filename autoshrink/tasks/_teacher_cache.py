"""Teachers trained here on first use: load the cached weights, or train, evaluate and save them.

A cache entry is ``{"model": state_dict, "accuracy": float, "tag": str | None, "train_s": float}`` written through a
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
    tag: str | None = None,
    rescore: Callable[[nn.Module], float] | None = None,
) -> tuple[nn.Module, float]:
    """The teacher cached at ``path``, or a new one trained and cached there.

    Args:
        path: the cache file (its name should hash everything the weights depend on).
        build: makes the untrained model (called again for a fresh one after a damaged entry).
        train: trains the model in place and returns its validation accuracy in percent.
        retrain_damaged: an entry that cannot be loaded is deleted and the teacher trained again;
            by default it is refused with a :class:`TaskError`.
        tag: what the stored accuracy was measured on (e.g. a validation-split version); an entry
            with another tag keeps its weights (they depend on the training data only) and has
            its accuracy taken again with ``rescore``, then stored with this tag.
        rescore: measures a loaded teacher's validation accuracy (for ``tag``).

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
            accuracy = float(saved["accuracy"])
        except Exception as exc:  # never trust a damaged or tampered cache file
            if not retrain_damaged:
                raise TaskError(
                    f"the cached teacher {path} cannot be loaded safely ({type(exc).__name__}); "
                    "delete it and it will be trained again"
                ) from None
            path.unlink(missing_ok=True)
            model = build()  # the failed load may have filled part of it
        else:
            if rescore is not None and saved.get("tag") != tag:
                accuracy = float(rescore(model.eval()))
                with atomic_path(path) as tmp:
                    torch.save({**saved, "accuracy": accuracy, "tag": tag}, tmp)
            return model.eval(), accuracy
    start = time.perf_counter()
    accuracy = float(train(model))
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "accuracy": accuracy, "tag": tag,
                    "train_s": time.perf_counter() - start}, tmp)
    return model.eval(), accuracy
