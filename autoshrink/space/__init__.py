"""Search spaces: declared in YAML, validated when built, walked one way by every consumer.

Modules:
    ``schema``  the YAML schema (pydantic models) and its error messages;
    ``knobs``   one knob (:class:`Knob`) and how it is suggested, snapped and enumerated;
    ``core``    :class:`SearchSpace`: load, bind to a model, and the one knob walker
                (:meth:`SearchSpace.knobs`) that sampling, grids, baselines and parameter names use.
    ``auto``    a space derived from a model's own graph (:meth:`SearchSpace.auto`; imported
                only when asked, as it needs torch-pruning).

Example:
    >>> from autoshrink.space import SearchSpace
    >>> SearchSpace.from_dict({"layers": [{"pattern": "*", "bits": [8, 32]}]}).param_names()
    ['bits.*']
"""

from __future__ import annotations

from autoshrink.space.core import SearchSpace, default_space_path
from autoshrink.space.knobs import Knob
from autoshrink.space.schema import Defaults, Distill, Finetune, LayerRule, Range, SpaceError

__all__ = [
    "Defaults",
    "Distill",
    "Finetune",
    "Knob",
    "LayerRule",
    "Range",
    "SearchSpace",
    "SpaceError",
    "default_space_path",
]
