"""torchao's PT2E rewrite patterns, exported once per process and kept on disk between processes.

PT2E rewrites graphs by matching small pattern functions (conv-BN for QAT, its folded form at
convert, BatchNorm/dropout train<->eval), and torchao ``torch.export``\\ s every pattern afresh
each time it rewrites (``torchao.quantization.pt2e.utils._get_aten_graph_module_for_pattern``).
A pattern depends only on its code, the values its closure captured (bools, a conv function)
and its example inputs' shapes, so :class:`PatternCache` keeps each exported graph under those:

- **in memory**, for the process: a second :func:`~autoshrink.compress.quantize.lower` exports
  nothing; each caller gets a deep copy (the rewriter reads the pattern, never keeps it);
- **on disk**, for the next process: every Ray worker, driver and fresh re-timing process starts
  cold, and one ``prepare_qat`` + ``lower`` of a small CNN exports 34 patterns (~4 s) where
  loading them back with ``torch.export.load`` takes a fraction of that
  (``experiments/bench_pattern_cache.py`` prints both). The folder is keyed by the torch,
  torchao and Python versions (``AUTOSHRINK_CACHE/pt2e_patterns/<versions>/``), and each file by a
  hash of the pattern's bytecode, its closure and its inputs, so an upgrade or an edited pattern
  never reads a stale graph.

torchao's own post-processing of the exported program (dead code, unused ``copy_`` nodes) runs
unchanged on a loaded program: the cache stands in for the single ``torch.export.export`` call
inside torchao's function, nothing else. A pattern whose closure holds something without a stable
name across processes (a tensor's values, a lambda, a ``functools.partial``) is cached in memory
only; one that cannot be keyed at all is exported as before. A file that cannot be read is
exported again and rewritten; one that cannot be written costs only the saving.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import tempfile
import threading
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["PatternCache", "default_folder", "disk_key", "memory_key"]


class _NoDiskKey(Exception):
    """A value that has no name stable across processes: the pattern stays in memory only."""


def default_folder() -> Path:
    """``AUTOSHRINK_CACHE/pt2e_patterns/torch-<v>-torchao-<v>-py<x.y>``: one folder per versions."""
    import importlib.metadata

    from autoshrink._env import cache_dir

    try:
        torchao = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        torchao = "none"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return cache_dir() / "pt2e_patterns" / f"torch-{torch.__version__}-torchao-{torchao}-py{py}".replace(os.sep, "_")


def _function(pattern):
    return getattr(pattern, "fn", pattern) if isinstance(pattern, nn.Module) else pattern


def memory_key(pattern, example_inputs, is_cuda, kwargs) -> tuple | None:
    """The in-process key: the pattern's code object, its closure's and defaults' values and the
    inputs' shapes; ``None`` when something in them is neither a scalar, a tensor nor callable."""
    fn = _function(pattern)
    code = getattr(fn, "__code__", None)
    if code is None:
        return None

    def sig(v):
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), v.dtype, v.device.type)
        if v is None or isinstance(v, (bool, int, float, str)) or callable(v):
            return v
        raise TypeError

    try:
        cells = tuple(sig(c.cell_contents) for c in fn.__closure__ or ())
        key = (code, cells, tuple(sig(d) for d in fn.__defaults__ or ()),
               tuple(sig(x) for x in example_inputs), bool(is_cuda),
               tuple(sorted((k, sig(v)) for k, v in kwargs.items())))
        hash(key)
    except (TypeError, ValueError):
        return None
    return key


def _code_fingerprint(code: types.CodeType) -> list:
    """What a code object computes, in values that print the same in every process (``repr`` of a
    nested code object holds its address; its fingerprint does not)."""
    return [code.co_qualname, code.co_code.hex(), [_const(c) for c in code.co_consts], list(code.co_names),
            list(code.co_varnames), list(code.co_freevars), code.co_argcount, code.co_kwonlyargcount,
            code.co_flags]


def _const(c):
    if isinstance(c, types.CodeType):
        return _code_fingerprint(c)
    if isinstance(c, tuple):
        return [_const(x) for x in c]
    if isinstance(c, frozenset):  # its order follows the string hash, which differs per process
        return sorted(repr(_const(x)) for x in c)
    return f"{type(c).__name__}:{c!r}"


def _stable(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"T{tuple(v.shape)}:{v.dtype}:{v.device.type}"
    if v is None or isinstance(v, (bool, int, float, str)):
        return f"{type(v).__name__}:{v!r}"
    module = getattr(v, "__module__", None)
    name = getattr(v, "__qualname__", None) or getattr(v, "__name__", None)
    if isinstance(v, (types.FunctionType, types.BuiltinFunctionType, type)) and module and name \
            and "<" not in name:  # a lambda or a function defined in a function has no stable name
        if isinstance(v, types.FunctionType) and v.__closure__:
            raise _NoDiskKey  # what it captured is not in its name
        return f"fn:{module}.{name}"
    raise _NoDiskKey


def disk_key(pattern, example_inputs, is_cuda, kwargs) -> str | None:
    """A file name stable across processes for this pattern, or ``None`` (memory only)."""
    fn = _function(pattern)
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    try:
        parts = [_code_fingerprint(code),
                 [_stable(c.cell_contents) for c in fn.__closure__ or ()],
                 [_stable(d) for d in fn.__defaults__ or ()],
                 [_stable(x) for x in example_inputs], bool(is_cuda),
                 sorted((k, _stable(v)) for k, v in kwargs.items())]
    except (_NoDiskKey, ValueError):  # ValueError: an empty closure cell
        return None
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:32]
    return f"{code.co_name}-{digest}.pt2"


class PatternCache:
    """Stands in for ``_get_aten_graph_module_for_pattern`` (``original``), same arguments, same
    result: the graph torchao would build, from memory, from ``folder`` or exported anew.

    ``folder=None`` resolves :func:`default_folder` at first use; ``disk=False`` keeps it in
    memory only (the behaviour before the disk cache). ``exports`` and ``loads`` count what this
    process paid, for the benchmark and the tests.
    """

    def __init__(self, original: Callable, folder: Path | None = None, disk: bool = True) -> None:
        self.original = original
        self.folder = folder
        self.disk = disk and os.environ.get("AUTOSHRINK_PATTERN_CACHE", "1") != "0"
        self.memory: dict[tuple, torch.fx.GraphModule] = {}
        self.exports = 0
        self.loads = 0
        self._lock = threading.Lock()

    def __call__(self, pattern, example_inputs, is_cuda=False, **kwargs):
        key = memory_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            self.exports += 1
            return self.original(pattern, example_inputs, is_cuda, **kwargs)
        if key not in self.memory:
            name = disk_key(pattern, example_inputs, is_cuda, kwargs) if self.disk else None
            if name is None:
                self.exports += 1
                self.memory[key] = self.original(pattern, example_inputs, is_cuda, **kwargs)
            else:
                self.memory[key] = self._through_disk(name, pattern, example_inputs, is_cuda, kwargs)
        return copy.deepcopy(self.memory[key])

    def _through_disk(self, name, pattern, example_inputs, is_cuda, kwargs):
        if self.folder is None:
            self.folder = default_folder()
        path = self.folder / name
        real_export = torch.export.export
        me = threading.get_ident()

        def export_or_load(*args, **kw):
            if threading.get_ident() != me:  # another thread's export is not ours to answer
                return real_export(*args, **kw)
            if path.is_file():
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        program = torch.export.load(path)
                    self.loads += 1
                    return program
                except Exception:  # noqa: BLE001 - a torn or foreign file: export again, rewrite it
                    pass
            program = real_export(*args, **kw)
            self.exports += 1
            _save(program, path)
            return program

        # torchao calls ``torch.export.export`` by attribute, once; everything else it does to the
        # program (dead code, copy_ nodes, recompile) runs as it would on a fresh export
        with self._lock:
            torch.export.export = export_or_load
            try:
                return self.original(pattern, example_inputs, is_cuda, **kwargs)
            finally:
                torch.export.export = real_export


def _save(program, path: Path) -> None:
    """Write atomically (another process may be reading the same file); a failure to write is
    not an error: the next process exports the pattern again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}.", suffix=".tmp.pt2")
        os.close(fd)
        try:
            torch.export.save(program, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except Exception:  # noqa: BLE001 - a read-only cache, a full disk, an unpicklable constant
        pass
