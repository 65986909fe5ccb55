"""Built-in tasks, reached by name: ``autoshrink.tasks.get("digits")``.

Every built-in task uses real data that ships with an installed package (no download) and a
teacher from :mod:`autoshrink.models`, trained on first use and cached.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from autoshrink.errors import InputError
from autoshrink.task import Task

__all__ = ["blueprint", "get", "list_tasks"]

# name -> (zoo model of the teacher, one-line description)
_DIGITS = {
    "digits": "resnet18_32",
    "digits-resnet20": "resnet20",
    "digits-mobilenetv2": "mobilenetv2_32",
    "digits-vit": "vit_tiny_32",
    "digits-densenet": "densenet_tiny_32",
}


def list_tasks() -> list[str]:
    """Names accepted by :func:`get`."""
    return sorted(_DIGITS)


def get(name: str = "digits", **kwargs) -> Task:
    """Build a built-in task by name.

    Args:
        name: one of :func:`list_tasks`.
        **kwargs: passed to the task's builder (e.g. ``progress=False``, ``epochs=3``).

    ``"cifar10"`` is accepted too, with ``data="cifar10:DIR"`` (your copy of the CIFAR-10 python
    batches; a teacher is trained on first use).

    Raises:
        ValueError: for an unknown name, listing the known ones.

    Example:
        >>> task = get("digits")   # doctest: +SKIP
    """
    builder = _builder(name)
    return builder(**kwargs)


def blueprint(name: str = "digits"):
    """An untrained teacher of the built-in task's architecture and an example input.

    Enough to plan a search (``autoshrink plan``, ``autoshrink space``): the layers, groups, MACs
    and latency depend on the architecture, not on the weights, so nothing is trained or read.

    Raises:
        ValueError: for an unknown name, listing the known ones.

    Example:
        >>> model, x = blueprint("digits-resnet20")
        >>> model.default_cfg["architecture"], tuple(x.shape)
        ('resnet20', (1, 1, 32, 32))
    """
    import torch

    from autoshrink import models

    if name == "cifar10":
        from autoshrink.tasks.custom import CIFAR10_TEACHER

        arch, chans = CIFAR10_TEACHER, 3
    else:
        _builder(name)  # the unknown-name error
        arch, chans = _DIGITS[name], 1
    torch.manual_seed(0)
    model = models.create(arch, num_classes=10, in_chans=chans).eval()
    return model, torch.zeros(1, chans, 32, 32)


def _builder(name: str) -> Callable[..., Task]:
    if name == "cifar10":  # needs your copy of the data, so it is not listed with the others
        return _cifar10
    if name in _DIGITS:
        from autoshrink.tasks.digits import digits_task

        model = _DIGITS[name]
        return lambda **kw: digits_task(model, **kw)
    close = difflib.get_close_matches(name, [*list_tasks(), "cifar10"], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise InputError(f"unknown task {name!r}; built-in tasks: {list_tasks()}.{hint}")


def _cifar10(data: str | None = None, **kwargs) -> Task:
    """``get("cifar10", data="cifar10:DIR")``: see :func:`autoshrink.tasks.custom.cifar10_task`."""
    from autoshrink.task import TaskError
    from autoshrink.tasks.custom import cifar10_task

    if data is None:
        raise TaskError("task 'cifar10' needs its data: --data cifar10:DIR (the CIFAR-10 python "
                        "batches; nothing is downloaded)")
    return cifar10_task(data.removeprefix("cifar10:"), **kwargs)
