"""The YAML schema of a search space (pydantic models) and its error messages.

Every model is frozen and forbids unknown keys; :func:`format_errors` turns pydantic's errors
into one line per key path, naming the file: ``x.yaml: layers[2].bits: 3 is not one of [4, 8, 32]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autoshrink._yaml import excerpt
from autoshrink.candidate import ALLOWED_BITS
from autoshrink.errors import AutoshrinkError

__all__ = ["Defaults", "Distill", "Finetune", "LayerRule", "Range", "SpaceError", "SpaceModel", "format_errors"]


class SpaceError(AutoshrinkError, ValueError):
    """A search space that cannot be used; the message names the file, key path and value."""


def _show(v: Any) -> str:
    """A value as the user wrote it, bounded: a range reads ``0.3..2.0``, ``true`` as in YAML."""
    if isinstance(v, Range):
        return f"{v.low}..{v.high}" + (f" (step {v.step})" if v.step is not None else "")
    if isinstance(v, bool):
        return "true" if v else "false"
    return excerpt(v)


def _no_bool(v: Any) -> Any:
    """YAML's ``true`` is not the number 1 here: refuse it before pydantic coerces it."""
    for b in v if isinstance(v, list) else [v]:
        if isinstance(b, bool):
            raise ValueError(f"{_show(b)} is not one of {list(ALLOWED_BITS)}")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    """A numeric range; ``step`` makes it discrete, ``log`` samples log-uniformly."""

    low: float
    high: float
    step: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> Range:
        if not self.low <= self.high:
            raise ValueError(f"`low <= high` must hold, but got (low={self.low}, high={self.high})")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be > 0, got {self.step}")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log ranges need low > 0 and no step")
        if self.step is not None and self.high > self.low and self.step > self.high - self.low + 1e-12:
            raise ValueError(f"step {self.step} is wider than the range {self.low}..{self.high}, so only "
                             f"{self.low} could be drawn: use a step <= {self.high - self.low:g}, or one value")
        return self

    def values(self) -> list[float] | None:
        """The finite set of values when ``step`` is set, else None."""
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 10) for i in range(n + 1)]


class LayerRule(_Strict):
    name: str | None = None
    pattern: str = Field(min_length=1)
    bits: list[int] | int | None = None
    prune: Range | list[float] | float | None = None
    per_layer: bool = False  # one sampled value per matched layer instead of one for the rule

    _bits_not_bool = field_validator("bits", mode="before")(_no_bool)

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: Any) -> Any:
        values = v if isinstance(v, list) else [v] if v is not None else []
        if isinstance(v, list) and not v:
            raise ValueError("needs at least one choice")
        for b in values:
            if b not in ALLOWED_BITS:
                raise ValueError(f"{_show(b)} is not one of {list(ALLOWED_BITS)}")
        return v

    @field_validator("prune")
    @classmethod
    def _prune(cls, v: Any) -> Any:
        if isinstance(v, Range):
            if not (0 <= v.low and v.high < 1):
                raise ValueError(f"range [{v.low}, {v.high}] must lie within [0, 1)")
            return v
        values = v if isinstance(v, list) else [v] if v is not None else []
        if isinstance(v, list) and not v:
            raise ValueError("needs at least one choice")
        for r in values:
            if not 0 <= r < 1:
                raise ValueError(f"{_show(r)} is outside [0, 1)")
        return v

    @property
    def label(self) -> str:
        return self.name or self.pattern


class Defaults(_Strict):
    bits: int = 32
    prune: float = 0.0

    _bits_not_bool = field_validator("bits", mode="before")(_no_bool)

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in ALLOWED_BITS:
            raise ValueError(f"{_show(v)} is not one of {list(ALLOWED_BITS)}")
        return v

    @field_validator("prune")
    @classmethod
    def _prune(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"{_show(v)} is outside [0, 1)")
        return v


class Distill(_Strict):
    temperature: Range | list[float] | float = 4.0
    alpha: Range | list[float] | float = 0.7

    @field_validator("temperature")
    @classmethod
    def _t(cls, v: Any) -> Any:
        lo = v.low if isinstance(v, Range) else min(v) if isinstance(v, list) else v
        if isinstance(v, list) and not v:
            raise ValueError("needs at least one choice")
        if lo <= 0:
            raise ValueError(f"temperature must be > 0, got {_show(v)}")
        return v

    @field_validator("alpha")
    @classmethod
    def _a(cls, v: Any) -> Any:
        vals = [v.low, v.high] if isinstance(v, Range) else v if isinstance(v, list) else [v]
        if not vals:
            raise ValueError("needs at least one choice")
        if any(not 0 <= a <= 1 for a in vals):
            raise ValueError(f"alpha must lie in [0, 1], got {_show(v)}")
        return v


class Finetune(_Strict):
    steps: Range | list[int] | int = 300
    lr: Range | list[float] | float = 0.01
    batch_size: list[int] | int = 64

    @field_validator("steps", "batch_size")
    @classmethod
    def _nonneg(cls, v: Any, info) -> Any:
        vals = [v.low, v.high] if isinstance(v, Range) else v if isinstance(v, list) else [v]
        if not vals:
            raise ValueError("needs at least one choice")
        least = 1 if info.field_name == "batch_size" else 0  # a batch of 0 samples trains nothing
        if any(s < least for s in vals):
            raise ValueError(f"must be >= {least}, got {_show(v)}")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: Any) -> Any:
        vals = [v.low, v.high] if isinstance(v, Range) else v if isinstance(v, list) else [v]
        if not vals:
            raise ValueError("needs at least one choice")
        if any(x <= 0 for x in vals):
            raise ValueError(f"must be > 0, got {_show(v)}")
        return v


class SpaceModel(_Strict):
    name: str = "space"
    description: str = ""
    layers: list[LayerRule] = Field(default_factory=list)
    defaults: Defaults = Defaults()
    distill: Distill = Distill()
    finetune: Finetune = Finetune()
    round_to: list[int | None] | int | None = None

    @field_validator("round_to")
    @classmethod
    def _round(cls, v: Any) -> Any:
        vals = v if isinstance(v, list) else [v]
        if any(r is not None and r < 1 for r in vals):
            raise ValueError(f"must be null or an integer >= 1, got {_show(v)}")
        return v


def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"list[float]", "list[int]", "list[any]", "float", "int", "Range", "none",
                      "list[union[int,none]]", "bool"} or "[" in str(part) or part in (
                          "constrained-int", "constrained-float"):
            continue  # pydantic's union-branch labels are noise to a user
        else:
            out += f".{part}" if out else str(part)
    return out


def format_errors(source: str, err: ValidationError) -> str:
    """One line per key path. A union (value, list or range) reports one error per branch: keep
    our own value errors when there are any, else say which forms are accepted."""
    by_path: dict[str, list[dict]] = {}
    for e in err.errors():
        by_path.setdefault(_loc(e["loc"]), []).append(e)
    lines = []
    for path, errors in by_path.items():
        own = [e for e in errors if e["type"] == "value_error"]
        if own:
            lines.append(f"{source}: {path}: {own[0]['msg'].removeprefix('Value error, ')[:300]}")
            continue
        e = errors[0]
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: {path}: unknown key")
            continue
        if e["type"] == "missing":
            lines.append(f"{source}: {path}: required key is missing")
            continue
        value = e.get("input")
        if len(errors) > 1:
            msg = "expected a value, a list of choices or a {low, high} range"
        else:
            msg = e["msg"]
        lines.append(f"{source}: {path}: {msg} (got {_show(value)})")
    return "\n".join(lines[:5])
