"""Process-wide settings that must be in place before torch/torchao/ray do anything.

Kept in one place so the CLI, the Ray workers and the tests agree.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["configure"]

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
