"""One knob of a search space, and what can be done with one: suggest, snap, enumerate.

A knob's ``spec`` is what the YAML gave: a fixed value, a list of choices, or a :class:`Range`.
:meth:`autoshrink.space.SearchSpace.knobs` walks a space's knobs in one fixed order; sampling,
grids, baselines and parameter names all go through that walk and these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from autoshrink.space.schema import Range

__all__ = ["Knob", "finite_values", "is_choice", "lowest", "probe_name", "snap", "suggest", "top"]


@dataclass(frozen=True)
class Knob:
    """One knob of a space, where it lands in a :class:`~autoshrink.candidate.Candidate`.

    Attributes:
        name: the Optuna parameter name (``"bits.stage1"``, ``"prune.layer1.0.conv1"``, ``"kd_alpha"``).
        spec: the value, list of choices or :class:`Range` the space gives.
        where: the key path in the YAML (``"layers[0].bits"``, ``"distill.alpha"``), for errors.
        field: the candidate field it sets: ``"bits"`` or ``"prune"`` (a per-layer table, keyed by
            ``key``) or a scalar field (``"kd_alpha"``, ``"finetune_steps"``, ...).
        key: the candidate's table key (a rule's pattern, or a layer name for ``per_layer`` rules);
            None for scalar fields.
        probe: a concrete layer name ``key`` matches, to read a candidate's value back; None for
            scalar fields.
    """

    name: str
    spec: Any
    where: str
    field: str
    key: str | None = None
    probe: str | None = None

    @property
    def sampled(self) -> bool:
        """True when the knob has more than one value (fixed knobs are not Optuna parameters)."""
        return is_choice(self.spec)

    def value_in(self, candidate: Any) -> Any:
        """The value ``candidate`` has for this knob (before snapping to the space)."""
        if self.field == "bits":
            return candidate.bits_for(self.probe)
        if self.field == "prune":
            return candidate.prune_for(self.probe)
        return getattr(candidate, self.field)


def probe_name(pattern: str) -> str:
    """A concrete name ``pattern`` matches, to look a uniform candidate's value up."""
    return pattern.replace("*", "x").replace("?", "x")


def is_choice(spec: Any) -> bool:
    """True for a range or a list of two or more choices."""
    return isinstance(spec, Range) or (isinstance(spec, list) and len(spec) > 1)


def _integral(spec: Range, values: list[float]) -> bool:
    return all(float(v).is_integer() for v in values) and float(spec.step).is_integer()


def finite_values(spec: Any) -> list[Any]:
    """The values :func:`suggest` can return for a discrete knob, with the same types."""
    if isinstance(spec, Range):
        values = spec.values() or []
        return [int(v) for v in values] if _integral(spec, values) else values
    return list(spec)


def suggest(trial: Any, name: str, spec: Any) -> Any:
    """Ask ``trial`` (anything with Optuna's ``suggest_*`` methods) for a value of the knob;
    a fixed knob (one value) is returned without asking."""
    if isinstance(spec, Range):
        values = spec.values()
        if values is not None:
            if _integral(spec, values):
                return trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step))
            return trial.suggest_float(name, spec.low, spec.high, step=spec.step)
        return trial.suggest_float(name, spec.low, spec.high, log=spec.log)
    if isinstance(spec, list):
        if len(spec) == 1:
            return spec[0]
        return trial.suggest_categorical(name, list(spec))
    return spec


def snap(spec: Any, value: Any) -> Any:
    """``value`` moved onto the knob: the nearest choice or step, or clipped to a range."""
    if isinstance(spec, Range):
        values = spec.values()
        if values is not None:
            best = min(values, key=lambda v: abs(v - value))
            return int(best) if float(spec.step).is_integer() and float(best).is_integer() else best
        return min(max(value, spec.low), spec.high)
    if value in spec:
        return value
    numeric = [v for v in spec if isinstance(v, (int, float))]
    if value is None or not numeric:
        return spec[0]
    return min(numeric, key=lambda v: abs(v - value))


def lowest(spec: Any) -> Any:
    """The smallest value the knob allows (a list's minimum, a range's ``low``)."""
    if isinstance(spec, Range):
        return spec.low
    return min(spec) if isinstance(spec, list) else spec


def top(spec: Any) -> Any:
    """The largest value the knob allows: a list's maximum, a range's ``high``, or its highest
    step at or below ``high``."""
    if isinstance(spec, Range):
        if spec.step:
            return spec.low + math.floor((spec.high - spec.low) / spec.step + 1e-9) * spec.step
        return spec.high
    return max(spec) if isinstance(spec, list) else spec
