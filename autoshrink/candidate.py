"""`Candidate`: one compression configuration, independent of any particular model.

Per-layer settings are keyed by glob patterns over module names (``"layer1.*"``, ``"fc"``) or by
exact names; the first key that matches a layer wins, in insertion order, and layers that no key
matches take ``default_bits`` / ``default_prune``. So a candidate found on one model reads as a
plan ("stage 1 at 4 bits, 25 % of channels removed") and can be applied to another of the same
family.

A candidate is immutable all the way down: ``bits`` and ``prune`` are read-only mappings
(:class:`FrozenMapping`), so candidates are hashable, can key a dict or a set, and a change means
building a new one (``dataclasses.replace(c, bits={...})``).
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["ALLOWED_BITS", "Candidate", "FrozenMapping"]

#: Weight bit-widths the lowering supports: 4 (stored packed, computed with int8 kernels),
#: 8 (int8 kernels) and 32 (left in fp32).
ALLOWED_BITS = (4, 8, 32)


class FrozenMapping(Mapping):
    """A read-only, hashable mapping that keeps insertion order (first matching key wins).

    Equal to any mapping with the same items (order aside, like ``dict``); pickles (Ray ships
    candidates to workers) and copies as itself.

    Example:
        >>> m = FrozenMapping({"fc": 8})
        >>> m["fc"], m == {"fc": 8}, hash(m) == hash(FrozenMapping({"fc": 8}))
        (8, True, True)
        >>> m["fc"] = 4
        Traceback (most recent call last):
        ...
        TypeError: 'FrozenMapping' object does not support item assignment
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_data", dict(data or {}))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __reduce__(self) -> tuple:
        return (type(self), (self._data,))

    def __repr__(self) -> str:
        return repr(self._data)


def _check_bits(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in ALLOWED_BITS:
        raise ValueError(f"{where}: {value!r} is not one of {list(ALLOWED_BITS)}")
    return value


def _check_ratio(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {value!r} is not a number in [0, 1)")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{where}: {value!r} is outside [0, 1) (a ratio of 1 would remove every channel)")
    return float(value)


@dataclass(frozen=True)
class Candidate:
    """A compression configuration: per-layer weight bits and pruning ratios, KD and fine-tune knobs.

    Args:
        bits: pattern or layer name -> weight bits (4, 8 or 32).
        prune: pattern or layer name -> fraction of output channels to remove, in [0, 1).
        default_bits: bits of layers that no ``bits`` key matches.
        default_prune: pruning ratio of layers that no ``prune`` key matches.
        kd_temperature: distillation temperature T (> 0).
        kd_alpha: weight of the distillation term, in [0, 1]; ``1 - alpha`` weighs cross-entropy.
        finetune_steps: optimiser steps of the KD fine-tune (0 skips it).
        lr: peak learning rate of the fine-tune (cosine decay).
        batch_size: fine-tune batch size.
        round_to: kept channel counts are rounded to a multiple of this (None: no rounding).

    Example:
        >>> c = Candidate.uniform(bits=8, prune=0.25)
        >>> c.bits_for("layer1.0.conv1"), c.prune_for("layer1.0.conv1")
        (8, 0.25)
        >>> Candidate.from_json(c.to_json()) == c
        True
    """

    bits: Mapping[str, int] = field(default_factory=dict)
    prune: Mapping[str, float] = field(default_factory=dict)
    default_bits: int = 32
    default_prune: float = 0.0
    kd_temperature: float = 4.0
    kd_alpha: float = 0.7
    finetune_steps: int = 300
    lr: float = 0.01
    batch_size: int = 64
    round_to: int | None = None

    def __post_init__(self) -> None:
        bits = {str(k): _check_bits(f"bits[{k!r}]", v) for k, v in dict(self.bits).items()}
        prune = {str(k): _check_ratio(f"prune[{k!r}]", v) for k, v in dict(self.prune).items()}
        object.__setattr__(self, "bits", FrozenMapping(bits))
        object.__setattr__(self, "prune", FrozenMapping(prune))
        _check_bits("default_bits", self.default_bits)
        object.__setattr__(self, "default_prune", _check_ratio("default_prune", self.default_prune))
        if not (isinstance(self.kd_temperature, (int, float)) and self.kd_temperature > 0):
            raise ValueError(f"kd_temperature: {self.kd_temperature!r} must be > 0")
        if not (isinstance(self.kd_alpha, (int, float)) and 0.0 <= self.kd_alpha <= 1.0):
            raise ValueError(f"kd_alpha: {self.kd_alpha!r} must be in [0, 1]")
        if isinstance(self.finetune_steps, bool) or not isinstance(self.finetune_steps, int) or (
            self.finetune_steps < 0
        ):
            raise ValueError(f"finetune_steps: {self.finetune_steps!r} must be an integer >= 0")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr: {self.lr!r} must be > 0")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or (
            self.batch_size < 1
        ):
            raise ValueError(f"batch_size: {self.batch_size!r} must be an integer >= 1")
        if self.round_to is not None and (
            isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1
        ):
            raise ValueError(f"round_to: {self.round_to!r} must be None or an integer >= 1")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        bits: int = 8,
        prune: float = 0.0,
        *,
        temperature: float = 4.0,
        alpha: float = 0.7,
        steps: int = 300,
        lr: float = 0.01,
        batch_size: int = 64,
        round_to: int | None = None,
    ) -> Candidate:
        """The same bits and pruning ratio for every layer.

        Example:
            >>> Candidate.uniform(bits=4, prune=0.5).default_bits
            4
        """
        return cls(
            default_bits=bits,
            default_prune=prune,
            kd_temperature=temperature,
            kd_alpha=alpha,
            finetune_steps=steps,
            lr=lr,
            batch_size=batch_size,
            round_to=round_to,
        )

    # -- per-layer resolution ---------------------------------------------------------------------
    def bits_for(self, layer: str) -> int:
        """Weight bits of the module named ``layer``."""
        return _lookup(self.bits, layer, self.default_bits)

    def prune_for(self, layer: str) -> float:
        """Pruning ratio of the module named ``layer``."""
        return _lookup(self.prune, layer, self.default_prune)

    @property
    def is_quantized(self) -> bool:
        """True if any layer could be quantized (some setting below 32 bits)."""
        return self.default_bits < 32 or any(b < 32 for b in self.bits.values())

    # -- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["bits"] = dict(self.bits)
        d["prune"] = dict(self.prune)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Candidate:
        """Build from :meth:`to_dict` output; unknown keys are an error (they are usually typos)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown candidate key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**dict(data))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Candidate:
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        """A one-line human description."""
        parts = [f"default {self.default_bits}b/{self.default_prune:.2f}"]
        keys = list(dict.fromkeys([*self.bits, *self.prune]))
        for k in keys:
            parts.append(f"{k}: {self.bits_for(k)}b/{self.prune_for(k):.2f}")
        parts.append(f"T={self.kd_temperature:g} a={self.kd_alpha:g} steps={self.finetune_steps}")
        return "; ".join(parts)


def _lookup(table: Mapping[str, Any], layer: str, default: Any) -> Any:
    if layer in table:
        return table[layer]
    for pattern, value in table.items():
        if fnmatch.fnmatchcase(layer, pattern):
            return value
    return default
