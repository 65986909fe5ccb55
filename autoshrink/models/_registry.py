"""A registry of plain model factory functions, reached by name (after ``timm``'s).

A factory is an ordinary function ``fn(num_classes=10, in_chans=1, **kwargs) -> nn.Module``
decorated with :func:`register_model`; its name is the function's name and its description is the
first line of its docstring. Every model built through a registered factory carries a
``default_cfg`` dict (architecture, description, input size, number of classes).
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["create", "list_models", "register_model"]

#: Spatial size every built-in model is designed for (height, width).
INPUT_HW: tuple[int, int] = (32, 32)

_model_fns: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name.

    The returned factory is ``fn`` wrapped so that the model it builds gets a ``default_cfg`` dict
    attribute: ``architecture`` (the registered name), ``description`` (first docstring line),
    ``input_size`` (``(in_chans, 32, 32)``), ``num_classes`` and ``classifier`` (the name of the
    final layer, which structured pruning must leave alone), read from the model's own
    ``in_chans`` / ``num_classes`` / ``classifier_name`` attributes when it has them.

    Args:
        fn: a function returning an ``nn.Module``.

    Returns:
        The wrapped factory, so the decorated name stays callable directly.

    Raises:
        ValueError: if a model with the same name is already registered.

    Example:
        >>> from torch import nn
        >>> @register_model
        ... def tiny_mlp_example(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
        ...     '''A linear classifier on raw pixels.'''
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 32 * 32, num_classes))
        >>> create("tiny_mlp_example").default_cfg["description"]
        'A linear classifier on raw pixels.'
    """
    name = fn.__name__
    if name in _model_fns:
        raise ValueError(
            f"A model named {name!r} is already registered (by "
            f"{_model_fns[name].__module__}); rename the factory function."
        )
    description = next(iter((fn.__doc__ or "").strip().splitlines()), "")

    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> nn.Module:
        model = fn(*args, **kwargs)
        model.default_cfg = {
            "architecture": name,
            "description": description,
            "input_size": (getattr(model, "in_chans", 1), *INPUT_HW),
            "num_classes": getattr(model, "num_classes", None),
            "classifier": getattr(model, "classifier_name", None),
        }
        return model

    _model_fns[name] = factory
    return factory


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching a shell-style pattern, sorted.

    Args:
        pattern: an ``fnmatch`` pattern such as ``"resnet*"``; ``"*"`` lists all.

    Returns:
        The sorted matching names (empty if none match).

    Example:
        >>> list_models("resnet*")
        ['resnet18_32', 'resnet20']
    """
    return sorted(name for name in _model_fns if fnmatch.fnmatchcase(name, pattern))


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name.

    Args:
        name: a name from :func:`list_models`.
        **kwargs: passed to the factory, e.g. ``num_classes=100, in_chans=3``.

    Returns:
        A freshly initialised model in training mode, with a ``default_cfg`` dict attribute.

    Raises:
        ValueError: if no model of that name is registered; the message names the closest match
            and the available models.

    Example:
        >>> model = create("resnet20", num_classes=10, in_chans=1)
        >>> model.default_cfg["input_size"]
        (1, 32, 32)
    """
    fn = _model_fns.get(name)
    if fn is None:
        available = list_models()
        close = difflib.get_close_matches(str(name), available, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown model {name!r}.{hint} Available models: {', '.join(available)}. "
            "Register your own with @autoshrink.models.register_model."
        )
    return fn(**kwargs)
