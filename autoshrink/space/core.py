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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from autoshrink.candidate import Candidate
from autoshrink.space.knobs import Knob, finite_values, lowest, probe_name, snap, suggest, top
from autoshrink.space.schema import LayerRule, Range, SpaceError, SpaceModel, format_errors

__all__ = ["SearchSpace", "SpaceError", "default_space_path"]


def default_space_path() -> Path:
    """The bundled ``default.yaml``."""
    return Path(__file__).parent.parent / "search_spaces" / "default.yaml"


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

    def __init__(self, spec: SpaceModel, source: str = "<dict>") -> None:
        self._spec = spec
        self.source = source
        self._bound: dict[str, list[str]] | None = None  # rule label -> matched layers

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> SearchSpace:
        if not isinstance(data, dict):
            raise SpaceError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
        try:
            spec = SpaceModel.model_validate(data)
        except ValidationError as exc:
            raise SpaceError(format_errors(source, exc)) from None
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
        from autoshrink._yaml import YamlError, load_yaml

        p = Path(path)
        if not p.is_file():
            raise SpaceError(f"{p}: search space file not found" if not p.exists() else f"{p} is not a file")
        try:  # with size and alias limits; an empty file is an error
            data = load_yaml(p)
        except YamlError as exc:
            raise SpaceError(str(exc)) from None
        return cls.from_dict(data, source=str(p))

    @classmethod
    def default(cls) -> SearchSpace:
        return cls.from_yaml(default_space_path())

    @classmethod
    def auto(cls, model: Any, example_input: Any, **kwargs: Any) -> SearchSpace:
        """A space derived from ``model``'s own graph (:func:`autoshrink.space.auto.auto_space`):
        its prunable groups and quantizable layers in a few stages, stem and head protected."""
        from autoshrink.space.auto import auto_space  # torch and torch-pruning: only when asked

        return auto_space(model, example_input, **kwargs)

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

    def bound_layers(self, label: str) -> list[str]:
        """The model layers rule ``label`` took when the space was bound (:meth:`bind`)."""
        if self._bound is None:
            raise SpaceError(f"{self.source}: the space is not bound to a model yet (SearchSpace.bind)")
        return list(self._bound[label])

    # -- the knob walker --------------------------------------------------------------------------
    def _keys(self, rule: LayerRule) -> list[str]:
        if rule.per_layer:
            if self._bound is None:
                raise SpaceError(
                    f"{self.source}: rule {rule.label!r} has per_layer: true; bind the space to a "
                    "model first (SearchSpace.bind)"
                )
            return self._bound[rule.label]
        return [rule.pattern]

    def knobs(self) -> Iterator[Knob]:
        """Every knob of the space, in the one order sampling asks for them.

        Per rule (in file order) and per key (the rule's pattern, or each bound layer for a
        ``per_layer`` rule): its ``bits`` then its ``prune`` where the rule sets them; then the
        distillation and fine-tune knobs and ``round_to``, always. Fixed knobs are included
        (``knob.sampled`` is False): they still set a candidate's value.

        Raises:
            SpaceError: a ``per_layer`` rule on a space not bound to a model.

        Example:
            >>> space = SearchSpace.from_dict({"layers": [{"name": "all", "pattern": "*", "bits": [8, 32]}]})
            >>> [(k.name, k.where) for k in space.knobs() if k.sampled]
            [('bits.all', 'layers[0].bits')]
        """
        for i, rule in enumerate(self._spec.layers):
            for key in self._keys(rule):
                suffix = key if rule.per_layer else rule.label
                probe = key if rule.per_layer else probe_name(rule.pattern)
                for field in ("bits", "prune"):
                    spec = getattr(rule, field)
                    if spec is not None:
                        yield Knob(f"{field}.{suffix}", spec, f"layers[{i}].{field}", field, key, probe)
        s = self._spec
        yield Knob("kd_temperature", s.distill.temperature, "distill.temperature", "kd_temperature")
        yield Knob("kd_alpha", s.distill.alpha, "distill.alpha", "kd_alpha")
        yield Knob("finetune_steps", s.finetune.steps, "finetune.steps", "finetune_steps")
        yield Knob("lr", s.finetune.lr, "finetune.lr", "lr")
        yield Knob("batch_size", s.finetune.batch_size, "finetune.batch_size", "batch_size")
        yield Knob("round_to", s.round_to, "round_to", "round_to")

    def param_names(self) -> list[str]:
        """Names of the sampled parameters (fixed knobs are not parameters)."""
        return [k.name for k in self.knobs() if k.sampled]

    def sample(self, trial: Any) -> Candidate:
        """Draw a candidate through an Optuna trial (or anything with ``suggest_*`` methods)."""
        bits: dict[str, int] = {}
        prune: dict[str, float] = {}
        scalars: dict[str, Any] = {}
        for knob in self.knobs():
            value = suggest(trial, knob.name, knob.spec)
            if knob.field == "bits":
                bits[knob.key] = int(value)
            elif knob.field == "prune":
                prune[knob.key] = float(value)
            else:
                scalars[knob.field] = value
        return Candidate(
            bits=bits,
            prune=prune,
            default_bits=self._spec.defaults.bits,
            default_prune=self._spec.defaults.prune,
            kd_temperature=float(scalars["kd_temperature"]),
            kd_alpha=float(scalars["kd_alpha"]),
            finetune_steps=int(scalars["finetune_steps"]),
            lr=float(scalars["lr"]),
            batch_size=int(scalars["batch_size"]),
            round_to=None if scalars["round_to"] is None else int(scalars["round_to"]),
        )

    def candidate_params(self, candidate: Candidate) -> dict[str, Any]:
        """The Optuna parameters that would make ``candidate`` (for enqueueing baselines).

        Values are snapped to the space's choices (nearest choice, or clipped to a range).
        """
        return {k.name: snap(k.spec, k.value_in(candidate)) for k in self.knobs() if k.sampled}

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
        for knob in self.knobs():
            if not knob.sampled:
                continue
            spec = knob.spec
            if isinstance(spec, Range) and spec.step is None:
                raise SpaceError(
                    f"{self.source}: {knob.where}: {{low: {spec.low:g}, high: {spec.high:g}}} is a "
                    "continuous range; a grid search needs a finite set of values: give the "
                    "range a `step` or list the choices"
                )
            grid[knob.name] = finite_values(spec)
        return grid

    # -- extremes of the space ------------------------------------------------------------------
    def cheapest(self) -> Candidate:
        """The space's smallest, lightest configuration: every rule at its lowest bits and its
        highest pruning ratio (and no channel rounding when the space allows it), not fine-tuned.

        Keyed by each rule's pattern, so it needs no binding to a model.

        Example:
            >>> space = SearchSpace.from_dict({"layers": [{"pattern": "*", "bits": [4, 8],
            ...     "prune": {"low": 0.0, "high": 0.5, "step": 0.25}}]})
            >>> c = space.cheapest()
            >>> c.bits_for("fc"), c.prune_for("fc"), c.finetune_steps
            (4, 0.5, 0)
        """
        bits, prune = {}, {}
        for rule in self._spec.layers:
            if rule.bits is not None:
                bits[rule.pattern] = lowest(rule.bits)
            if rule.prune is not None:
                prune[rule.pattern] = top(rule.prune)
        rounding = self._spec.round_to
        if isinstance(rounding, list):
            rounding = None if None in rounding else min(rounding)
        return Candidate(bits=bits, prune=prune, default_bits=self._spec.defaults.bits,
                         default_prune=self._spec.defaults.prune, finetune_steps=0, round_to=rounding)

    def uniform_prune_ratios(self) -> list[float]:
        """The uniform pruning ratios worth telling apart: every rule's pruning steps (eighths for
        a continuous range, and its top), from 0 to the highest ratio any rule allows, sorted.

        Example:
            >>> SearchSpace.from_dict({"layers": [{"pattern": "*", "prune": {"low": 0.0, "high": 0.3}}]}
            ...                       ).uniform_prune_ratios()
            [0.0, 0.125, 0.25, 0.3]
        """
        values: set[float] = {0.0}
        for rule in self._spec.layers:
            spec = rule.prune
            if isinstance(spec, Range):
                stepped = Range(low=spec.low, high=spec.high, step=spec.step or 0.125)
                values.update(round(v, 6) for v in stepped.values())
                if not spec.step:  # a continuous range: its top too
                    values.add(round(spec.high, 6))
            elif isinstance(spec, list):
                values.update(float(v) for v in spec)
            elif isinstance(spec, (int, float)):
                values.add(float(spec))
        return sorted(v for v in values if 0.0 <= v < 1.0)

    def __repr__(self) -> str:
        return f"SearchSpace(name={self.name!r}, source={self.source!r}, params={len(self.param_names())})"
