"""Ship the user's own model and data code to Ray workers, so that it imports there.

A model built from the user's files (``--model net:build`` with ``net.py`` importing
``blocks.py``, or a package of their own) must be importable in every worker: pickling its
classes by value rebuilds the objects, but not their modules, and ``torch.compile``/``export``
import a class's module by name (``ModuleNotFoundError: No module named 'blocks'`` inside Dynamo).
So the top-level modules and packages the user's code lives in are found (transitively, from the
model's, its submodules' and the datasets' classes and what their modules refer to) and handed
to Ray as ``py_modules``: Ray uploads them once per job (to a local instance or over
``--ray-address``) and puts them on every worker's ``sys.path``. Installed packages (the
interpreter's prefix, site-packages), the standard library, torch and autoshrink stay as they
are: the workers have them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["EXCLUDES", "MAX_FILE_MB", "runtime_env", "user_modules"]

#: Files never uploaded from a user's package folder (weights, data, caches, VCS).
EXCLUDES = ("__pycache__", ".git", ".ipynb_checkpoints", "*.pt", "*.pth", "*.pt2", "*.ckpt", "*.bin",
            "*.safetensors", "*.onnx", "*.npy", "*.npz", "*.zip", "*.tar", "*.tar.gz", "*.h5")
#: Any other file above this size in a shipped package folder is left behind too.
MAX_FILE_MB = 5.0

_SKIP_TOP = {"torch", "autoshrink", "builtins", "__main__"}  # (a source checkout of autoshrink: not "installed")


def _installed(path: str) -> bool:
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return ("site-packages" in path or "dist-packages" in path
            or any(p and path.startswith(p + os.sep) for p in prefixes))


def _is_user(module: ModuleType | None) -> bool:
    if module is None:
        return False
    top = module.__name__.split(".")[0]
    if top in _SKIP_TOP or top in sys.stdlib_module_names:
        return False
    path = getattr(module, "__file__", None)
    if path is None:  # a namespace package: judge by its folder
        paths = list(getattr(module, "__path__", []) or [])
        path = paths[0] if len(paths) == 1 else None
    return path is not None and not _installed(os.path.abspath(path))


def _module_of(obj: Any) -> ModuleType | None:
    if isinstance(obj, ModuleType):
        return obj
    name = getattr(obj, "__module__", None)
    if not isinstance(name, str):
        name = getattr(type(obj), "__module__", None)
    return sys.modules.get(name) if isinstance(name, str) else None


def user_modules(objects: Iterable[Any]) -> list[ModuleType]:
    """The user's modules behind ``objects`` (their classes' modules), and every user module those
    refer to through their globals (``from blocks import Block``), in discovery order."""
    found: dict[str, ModuleType] = {}
    todo = [m for m in (_module_of(o) for o in objects) if _is_user(m)]
    while todo:
        mod = todo.pop()
        if mod.__name__ in found:
            continue
        found[mod.__name__] = mod
        for value in list(vars(mod).values()):
            other = _module_of(value)
            if other is not None and other.__name__ not in found and _is_user(other):
                todo.append(other)
    return list(found.values())


def _top_path(module: ModuleType) -> Path | None:
    """The file (a top-level module) or folder (a package) to ship for ``module``."""
    top = sys.modules.get(module.__name__.split(".")[0])
    if top is None:
        return None
    paths = list(getattr(top, "__path__", []) or [])
    if paths:
        return Path(paths[0]) if len(paths) == 1 else None
    file = getattr(top, "__file__", None)
    return Path(file) if file and file.endswith(".py") else None


def _big_files(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for f in files:
            p = Path(root) / f
            try:
                if p.stat().st_size > MAX_FILE_MB * 1e6:
                    out.append("/" + p.relative_to(folder).as_posix())
            except OSError:
                continue
    return out


def runtime_env(task: Any, base: dict | None = None) -> dict | None:
    """The Ray ``runtime_env`` that makes ``task``'s user code importable on every worker.

    Args:
        task: a :class:`autoshrink.Task` (its model, the model's submodules and its datasets are
            looked at).
        base: a runtime_env to extend (its ``py_modules`` and ``excludes`` are kept).

    Returns:
        ``base`` plus ``py_modules`` (the user's top-level module files and package folders) and
        ``excludes`` (weights, data and any file over :data:`MAX_FILE_MB` MB in those folders);
        ``base`` itself (None if not given) when the code is all installed packages.

    Example:
        >>> import torch.nn as nn
        >>> class T:
        ...     model = nn.Linear(2, 2); train_data = val_data = None
        >>> runtime_env(T()) is None   # torch only: nothing to ship
        True
    """
    model = getattr(task, "model", None)
    objects = [model, *(model.modules() if model is not None else ()),
               getattr(task, "train_data", None), getattr(task, "val_data", None)]
    paths: list[Path] = []
    for mod in user_modules(o for o in objects if o is not None):
        p = _top_path(mod)
        if p is not None and p not in paths:
            paths.append(p)
    if not paths:
        return base
    env = dict(base or {})
    excludes = list(env.get("excludes", [])) + [e for e in EXCLUDES if e not in env.get("excludes", [])]
    for p in paths:
        if p.is_dir():
            excludes += [e for e in _big_files(p) if e not in excludes]
    env["py_modules"] = list(env.get("py_modules", [])) + [str(p) for p in paths]
    env["excludes"] = excludes
    return env
