"""`Budget`: the hardware limits a compressed model must meet."""

from __future__ import annotations

import math
from dataclasses import dataclass

from autoshrink.errors import InputError

__all__ = ["Budget"]


@dataclass(frozen=True)
class Budget:
    """Upper limits on the deployed model; ``None`` means unconstrained.

    Args:
        latency_ms: median batch-1 latency of the lowered model, in milliseconds.
        size_mb: stored size at true bit-widths, in MB (10^6 bytes).
        mmacs: millions of multiply-accumulates per sample.

    Raises:
        ValueError: for a limit that is not a positive finite number.

    Example:
        >>> Budget(latency_ms=5.0).constraints()
        {'latency_ms': 5.0}
    """

    latency_ms: float | None = None
    size_mb: float | None = None
    mmacs: float | None = None

    def __post_init__(self) -> None:
        for name in ("latency_ms", "size_mb", "mmacs"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"budget {name}: {value!r} is not a number")
            if not math.isfinite(value) or value <= 0:
                raise InputError(f"budget {name}: {value!r} must be a positive number")
            object.__setattr__(self, name, float(value))

    def constraints(self) -> dict[str, float]:
        """``{column: limit}`` for the set limits (column <= limit must hold)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def violations(self, metrics: dict[str, float]) -> dict[str, float]:
        """Relative excess per violated limit, e.g. ``{"latency_ms": 0.2}`` for 20 % over."""
        out = {}
        for name, limit in self.constraints().items():
            value = metrics.get(name)
            if value is not None and value > limit:
                out[name] = value / limit - 1.0
        return out

    def describe(self) -> str:
        units = {"latency_ms": "ms", "size_mb": "MB", "mmacs": "MMACs"}
        parts = [f"{k.split('_')[0]} <= {v:g} {units[k]}" for k, v in self.constraints().items()]
        return ", ".join(parts) if parts else "no budget"
