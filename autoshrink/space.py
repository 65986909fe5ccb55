"""Search spaces declared in YAML: parse, validate (pydantic), resolve layer patterns, sample.

A space is a list of layer rules plus distillation and fine-tune knobs. Each knob is a fixed
value, a list of choices, or a range ``{low, high, step?, log?}``::

    layers:                       # first rule whose pattern matches a layer wins
      - name: stage1
        pattern: "layer1.*"       # fnmatch glob over module names
        bits: [4, 8, 32]
        prune: {low: 0.0, high: 0.5, step: 0.125}
      - pattern: "fc"
        bits: [8, 32]
    defaults: {bits: 8, prune: 0.0}   # layers no rule matches
    distill:
      temperature: {low: 1.0, high: 8.0}
      alpha: {low: 0.3, high: 0.95}
    finetune:
      steps: [150, 300]
      lr: {low: 0.002, high: 0.03, log: true}

Errors name the file, the key path and the value:
``search_spaces/x.yaml: layers[2].bits[0]: 3 is not one of [4, 8, 32]``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autoshrink.candidate import ALLOWED_BITS, Candidate

__all__ = ["SearchSpace", "SpaceError", "default_space_path"]


class SpaceError(ValueError):
    """A search space that cannot be used; the message names the file, key path and value."""


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

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: Any) -> Any:
        values = v if isinstance(v, list) else [v] if v is not None else []
        if isinstance(v, list) and not v:
            raise ValueError("needs at least one choice")
        for b in values:
            if b not in ALLOWED_BITS:
                raise ValueError(f"{b!r} is not one of {list(ALLOWED_BITS)}")
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
                raise ValueError(f"{r!r} is outside [0, 1)")
        return v

    @property
    def label(self) -> str:
        return self.name or self.pattern


class Defaults(_Strict):
    bits: int = 32
    prune: float = 0.0

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in ALLOWED_BITS:
            raise ValueError(f"{v!r} is not one of {list(ALLOWED_BITS)}")
        return v

    @field_validator("prune")
    @classmethod
    def _prune(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"{v!r} is outside [0, 1)")
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
            raise ValueError(f"temperature must be > 0, got {lo!r}")
        return v

    @field_validator("alpha")
    @classmethod
    def _a(cls, v: Any) -> Any:
        vals = [v.low, v.high] if isinstance(v, Range) else v if isinstance(v, list) else [v]
        if not vals:
            raise ValueError("needs at least one choice")
        if any(not 0 <= a <= 1 for a in vals):
            raise ValueError(f"alpha must lie in [0, 1], got {v!r}")
        return v


class Finetune(_Strict):
    steps: Range | list[int] | int = 300
    lr: Range | list[float] | float = 0.01
    batch_size: list[int] | int = 64

    @field_validator("steps", "batch_size")
    @classmethod
    def _nonneg(cls, v: Any) -> Any:
        vals = [v.low, v.high] if isinstance(v, Range) else v if isinstance(v, list) else [v]
        if not vals:
            raise ValueError("needs at least one choice")
        if any(s < 0 for s in vals):
            raise ValueError(f"must be >= 0, got {v!r}")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: Any) -> Any:
        vals = [v.low, v.high] if isinstance(v, Range) else v if isinstance(v, list) else [v]
        if not vals:
            raise ValueError("needs at least one choice")
        if any(x <= 0 for x in vals):
            raise ValueError(f"must be > 0, got {v!r}")
        return v


class _SpaceModel(_Strict):
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
            raise ValueError(f"must be null or an integer >= 1, got {v!r}")
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


def _format_errors(source: str, err: ValidationError) -> str:
    """One line per key path. A union (value, list or range) reports one error per branch: keep
    our own value errors when there are any, else say which forms are accepted."""
    by_path: dict[str, list[dict]] = {}
    for e in err.errors():
        by_path.setdefault(_loc(e["loc"]), []).append(e)
    lines = []
    for path, errors in by_path.items():
        own = [e for e in errors if e["type"] == "value_error"]
        if own:
            lines.append(f"{source}: {path}: {own[0]['msg'].removeprefix('Value error, ')}")
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
        lines.append(f"{source}: {path}: {msg} (got {value!r})")
    return "\n".join(lines[:5])


def default_space_path() -> Path:
    """The bundled ``default.yaml``."""
    return Path(__file__).parent / "search_spaces" / "default.yaml"


class SearchSpace:
    """A validated search space.

    Build with :meth:`from_yaml` or :meth:`from_dict`; :meth:`bind` resolves the layer patterns
    against a model; :meth:`sample` draws a :class:`Candidate` from an Optuna trial.

    Example:
        >>> space = SearchSpace.from_dict({"layers": [{"pattern": "*", "bits": [8, 32]}],
        ...                                "distill": {"alpha": {"low": 0.3, "high": 0.9}}})
        >>> space.param_names()  # what Optuna samples; knobs with one value are fixed
        ['bits.*', 'kd_alpha']
    """

    def __init__(self, spec: _SpaceModel, source: str = "<dict>") -> None:
        self._spec = spec
        self.source = source
        self._bound: dict[str, list[str]] | None = None  # rule label -> matched layers

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> SearchSpace:
        if not isinstance(data, dict):
            raise SpaceError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
        try:
            spec = _SpaceModel.model_validate(data)
        except ValidationError as exc:
            raise SpaceError(_format_errors(source, exc)) from None
        labels = [r.label for r in spec.layers]
        dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
        if dupes:
            raise SpaceError(f"{source}: layers: rule names must be unique, repeated: {dupes}")
        return cls(spec, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        """Load and validate a YAML file.

        Raises:
            SpaceError: missing file, YAML syntax error (with line and column), or invalid content.
        """
        p = Path(path)
        if not p.is_file():
            raise SpaceError(f"{p}: search space file not found")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise SpaceError(f"{p}{where}: YAML syntax error: {problem}") from None
        except UnicodeDecodeError:
            raise SpaceError(f"{p}: not a text (YAML) file") from None
        return cls.from_dict(data if data is not None else {}, source=str(p))

    @classmethod
    def default(cls) -> SearchSpace:
        return cls.from_yaml(default_space_path())

    # -- inspection -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._spec.name

    def to_dict(self) -> dict:
        return self._spec.model_dump(mode="json", exclude_none=False)

    def fingerprint(self) -> str:
        """A hash of the space's content (not its file name), to detect a changed space on resume."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def rules(self) -> list[LayerRule]:
        return list(self._spec.layers)

    # -- binding to a model -----------------------------------------------------------------------
    def bind(self, layer_names: Sequence[str]) -> SearchSpace:
        """Resolve patterns against a model's quantizable/prunable layer names.

        Raises:
            SpaceError: a rule whose pattern matches no layer (listing some layer names), or a
                rule every one of whose layers an earlier rule already took.
        """
        bound: dict[str, list[str]] = {}
        taken: set[str] = set()
        for i, rule in enumerate(self._spec.layers):
            matched = [n for n in layer_names if fnmatch.fnmatchcase(n, rule.pattern)]
            if not matched:
                sample = ", ".join(list(layer_names)[:8])
                raise SpaceError(
                    f"{self.source}: layers[{i}].pattern: {rule.pattern!r} matches no layer of the "
                    f"model (its layers: {sample}{', ...' if len(layer_names) > 8 else ''})"
                )
            own = [n for n in matched if n not in taken]
            if not own:
                raise SpaceError(
                    f"{self.source}: layers[{i}].pattern: {rule.pattern!r} only matches layers "
                    "that earlier rules already set (first match wins); reorder or remove it"
                )
            taken.update(own)
            bound[rule.label] = own
        space = SearchSpace(self._spec, self.source)
        space._bound = bound
        return space

    # -- sampling -------------------------------------------------------------------------------
    def _keys(self, rule: LayerRule) -> list[str]:
        if rule.per_layer:
            if self._bound is None:
                raise SpaceError(
                    f"{self.source}: rule {rule.label!r} has per_layer: true; bind the space to a "
                    "model first (SearchSpace.bind)"
                )
            return self._bound[rule.label]
        return [rule.pattern]

    def param_names(self) -> list[str]:
        """Names of the sampled parameters (fixed knobs are not parameters)."""
        names: list[str] = []
        for rule in self._spec.layers:
            for key in self._keys(rule):
                suffix = rule.label if not rule.per_layer else key
                if _is_choice(rule.bits):
                    names.append(f"bits.{suffix}")
                if _is_choice(rule.prune):
                    names.append(f"prune.{suffix}")
        for name, knob in self._knobs().items():
            if _is_choice(knob):
                names.append(name)
        return names

    def _knobs(self) -> dict[str, Any]:
        s = self._spec
        return {
            "kd_temperature": s.distill.temperature,
            "kd_alpha": s.distill.alpha,
            "finetune_steps": s.finetune.steps,
            "lr": s.finetune.lr,
            "batch_size": s.finetune.batch_size,
            "round_to": s.round_to,
        }

    def sample(self, trial: Any) -> Candidate:
        """Draw a candidate through an Optuna trial (or anything with ``suggest_*`` methods)."""
        bits: dict[str, int] = {}
        prune: dict[str, float] = {}
        for rule in self._spec.layers:
            for key in self._keys(rule):
                suffix = rule.label if not rule.per_layer else key
                if rule.bits is not None:
                    bits[key] = int(_suggest(trial, f"bits.{suffix}", rule.bits))
                if rule.prune is not None:
                    prune[key] = float(_suggest(trial, f"prune.{suffix}", rule.prune))
        knobs = {name: _suggest(trial, name, knob) for name, knob in self._knobs().items()}
        return Candidate(
            bits=bits,
            prune=prune,
            default_bits=self._spec.defaults.bits,
            default_prune=self._spec.defaults.prune,
            kd_temperature=float(knobs["kd_temperature"]),
            kd_alpha=float(knobs["kd_alpha"]),
            finetune_steps=int(knobs["finetune_steps"]),
            lr=float(knobs["lr"]),
            batch_size=int(knobs["batch_size"]),
            round_to=None if knobs["round_to"] is None else int(knobs["round_to"]),
        )

    def candidate_params(self, candidate: Candidate) -> dict[str, Any]:
        """The Optuna parameters that would make ``candidate`` (for enqueueing baselines).

        Values are snapped to the space's choices (nearest choice, or clipped to a range).
        """
        params: dict[str, Any] = {}
        for rule in self._spec.layers:
            for key in self._keys(rule):
                suffix = rule.label if not rule.per_layer else key
                probe = key if rule.per_layer else _probe_name(rule.pattern)
                if _is_choice(rule.bits):
                    params[f"bits.{suffix}"] = _snap(rule.bits, candidate.bits_for(probe))
                if _is_choice(rule.prune):
                    params[f"prune.{suffix}"] = _snap(rule.prune, candidate.prune_for(probe))
        values = {
            "kd_temperature": candidate.kd_temperature,
            "kd_alpha": candidate.kd_alpha,
            "finetune_steps": candidate.finetune_steps,
            "lr": candidate.lr,
            "batch_size": candidate.batch_size,
            "round_to": candidate.round_to,
        }
        for name, knob in self._knobs().items():
            if _is_choice(knob):
                params[name] = _snap(knob, values[name])
        return params

    def grid(self) -> dict[str, list[Any]]:
        """Every sampled parameter with its finite set of values, for a grid search.

        Choices are taken as listed, stepped ranges as ``low, low + step, ... <= high``, with the
        same names and types :meth:`sample` suggests (so the dict feeds Optuna's ``GridSampler``).

        Returns:
            ``{param_name: [values]}`` over :meth:`param_names` (fixed knobs are not parameters).

        Raises:
            SpaceError: a continuous knob (a range without ``step``), naming its key path.

        Example:
            >>> space = SearchSpace.from_dict({"layers": [{"pattern": "*", "bits": [8, 32],
            ...     "prune": {"low": 0.0, "high": 0.5, "step": 0.25}}],
            ...     "distill": {"temperature": [2.0, 4.0]}, "finetune": {"lr": 0.01}})
            >>> space.grid()
            {'bits.*': [8, 32], 'prune.*': [0.0, 0.25, 0.5], 'kd_temperature': [2.0, 4.0]}
        """
        grid: dict[str, list[Any]] = {}

        def add(name: str, knob: Any, where: str) -> None:
            if not _is_choice(knob):
                return
            if isinstance(knob, Range) and knob.step is None:
                raise SpaceError(
                    f"{self.source}: {where}: {{low: {knob.low:g}, high: {knob.high:g}}} is a "
                    "continuous range; a grid search needs a finite set of values: give the "
                    "range a `step` or list the choices"
                )
            grid[name] = _finite_values(knob)

        for i, rule in enumerate(self._spec.layers):
            for key in self._keys(rule):
                suffix = rule.label if not rule.per_layer else key
                add(f"bits.{suffix}", rule.bits, f"layers[{i}].bits")
                add(f"prune.{suffix}", rule.prune, f"layers[{i}].prune")
        paths = {"kd_temperature": "distill.temperature", "kd_alpha": "distill.alpha",
                 "finetune_steps": "finetune.steps", "lr": "finetune.lr",
                 "batch_size": "finetune.batch_size", "round_to": "round_to"}
        for name, knob in self._knobs().items():
            add(name, knob, paths[name])
        return grid

    def __repr__(self) -> str:
        return f"SearchSpace(name={self.name!r}, source={self.source!r}, params={len(self.param_names())})"


def _probe_name(pattern: str) -> str:
    # a concrete name the pattern matches, to look a uniform candidate's value up
    return pattern.replace("*", "x").replace("?", "x")


def _is_choice(knob: Any) -> bool:
    return isinstance(knob, Range) or (isinstance(knob, list) and len(knob) > 1)


def _finite_values(knob: Any) -> list[Any]:
    # the values _suggest can return for a discrete knob, with the same types
    if isinstance(knob, Range):
        values = knob.values() or []
        if all(float(v).is_integer() for v in values) and float(knob.step).is_integer():
            return [int(v) for v in values]
        return values
    return list(knob)


def _suggest(trial: Any, name: str, knob: Any) -> Any:
    if isinstance(knob, Range):
        values = knob.values()
        if values is not None:
            if all(float(v).is_integer() for v in values) and float(knob.step).is_integer():
                return trial.suggest_int(name, int(knob.low), int(knob.high), step=int(knob.step))
            return trial.suggest_float(name, knob.low, knob.high, step=knob.step)
        return trial.suggest_float(name, knob.low, knob.high, log=knob.log)
    if isinstance(knob, list):
        if len(knob) == 1:
            return knob[0]
        return trial.suggest_categorical(name, list(knob))
    return knob


def _snap(knob: Any, value: Any) -> Any:
    if isinstance(knob, Range):
        values = knob.values()
        if values is not None:
            best = min(values, key=lambda v: abs(v - value))
            return int(best) if float(knob.step).is_integer() and float(best).is_integer() else best
        return min(max(value, knob.low), knob.high)
    if value in knob:
        return value
    numeric = [v for v in knob if isinstance(v, (int, float))]
    if value is None or not numeric:
        return knob[0]
    return min(numeric, key=lambda v: abs(v - value))
