"""Process-wide settings that must be in place before torch/torchao/ray do anything.

Kept in one place so the CLI, the Ray workers and the tests agree.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["configure", "quiet"]

# Third-party messages a user of autoshrink cannot act on (they concern the libraries' own code,
# not the user's model or inputs): (category, message regex, module regex) for warnings, and
# the loggers whose warnings are such notices. ``autoshrink --debug`` shows them all.
NOISE_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", ""),
    (UserWarning, r"To copy construct from a tensor", r"torch\._inductor"),
    (UserWarning, r".*torchvision", ""),
    (DeprecationWarning, r".*", r"(torchao|torch_pruning|ray|optuna|pydantic|google|pkg_resources)"),
    (FutureWarning, r".*", r"(torchao|torch_pruning|ray|optuna)"),
    (UserWarning, r".*(TypedStorage|_register_pytree_node|torch\.ao\.quantization).*", ""),
    (UserWarning, r".*", r"torchao"),
)
NOISE_LOGGERS = ("torchao", "torch.utils._pytree", "torch._dynamo", "torch._inductor", "torch.export",
                 "torch.fx.experimental.symbolic_shapes", "ray", "optuna",
                 # the ONNX exporter (ONNX Runtime / OpenVINO builds), on every export: "torchvision is
                 # not installed. Skipping torchvision::nms" and the like
                 "torch.onnx._internal.exporter._registration")

_DONE = False


def configure() -> None:
    """Set quiet, offline, local defaults (only where the user has not set them).

    - torchao tries to load CUDA extension libraries at import; on CPU that only prints warnings.
    - Inductor writes ~150 MB of headers under ``$TMPDIR``; keep them in one cache folder we own.
    - Ray 2.60 writes an auth token under the home folder unless auth is disabled; we run it
      local-only on 127.0.0.1.
    """
    global _DONE
    if _DONE:
        return
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    cache = Path(os.environ.get("AUTOSHRINK_CACHE") or _default_cache())
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    _DONE = True


def quiet() -> None:
    """Filter the third-party notices in :data:`NOISE_WARNINGS` / :data:`NOISE_LOGGERS` (a
    logger keeps its errors), so that what autoshrink says is what is on the screen. Called
    by the command line unless ``--debug``; the Python API leaves the caller's filters alone."""
    import logging
    import warnings

    for category, message, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _default_cache() -> str:
    try:
        import platformdirs

        return platformdirs.user_cache_dir("autoshrink")
    except Exception:  # pragma: no cover - platformdirs is a dependency; be safe anyway
        return os.path.join(tempfile.gettempdir(), "autoshrink-cache")


def cache_dir() -> Path:
    """The folder for trained teachers and the inductor cache (``AUTOSHRINK_CACHE`` overrides)."""
    path = Path(os.environ.get("AUTOSHRINK_CACHE") or _default_cache())
    path.mkdir(parents=True, exist_ok=True)
    return path
