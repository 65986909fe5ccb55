"""Every consumer of SearchSpace.knobs() agrees: names, sample, candidate_params, grid, extremes."""

from __future__ import annotations

import optuna
import pytest

from autoshrink import Candidate
from autoshrink.space import SearchSpace, default_space_path

SPACES = {
    "default": SearchSpace.from_yaml(default_space_path()).to_dict(),
    "mixed": {
        "layers": [
            {"name": "stem", "pattern": "conv1", "bits": [8, 32], "prune": 0.0},
            {"name": "body", "pattern": "layer*", "bits": [4, 8], "prune": {"low": 0.0, "high": 0.5, "step": 0.25},
             "per_layer": True},
            {"pattern": "fc", "bits": 8, "prune": [0.0, 0.125]},
        ],
        "defaults": {"bits": 32, "prune": 0.0},
        "distill": {"temperature": [2.0, 4.0], "alpha": 0.5},
        "finetune": {"steps": {"low": 0, "high": 200, "step": 100}, "lr": [0.01, 0.02], "batch_size": 32},
        "round_to": [None, 8],
    },
}
LAYERS = ["conv1", "layer1.0", "layer1.1", "layer2.0", "fc"]


def _space(name: str) -> SearchSpace:
    space = SearchSpace.from_dict(SPACES[name])
    return space.bind(LAYERS) if any(r.per_layer for r in space.rules()) else space


def _trial(seed: int) -> optuna.trial.Trial:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return study.ask()


@pytest.mark.parametrize("name", sorted(SPACES))
def test_names_sample_params_and_grid_agree(name):
    space = _space(name)
    names = space.param_names()
    assert names == [k.name for k in space.knobs() if k.sampled]
    trial = _trial(0)
    cand = space.sample(trial)
    assert list(trial.params) == names  # sampled in the walker's order, nothing else asked
    params = space.candidate_params(cand)
    assert list(params) == names
    assert params == trial.params  # a sampled candidate maps back onto its own parameters
    if all(k.spec.step is not None for k in space.knobs() if hasattr(k.spec, "step")):
        grid = space.grid()
        assert list(grid) == names
        assert all(trial.params[n] in grid[n] for n in names)


def test_per_layer_rules_walk_each_bound_layer():
    space = _space("mixed")
    walked = [(k.name, k.field, k.key, k.where) for k in space.knobs() if k.field in ("bits", "prune")]
    assert walked[:2] == [("bits.stem", "bits", "conv1", "layers[0].bits"),
                          ("prune.stem", "prune", "conv1", "layers[0].prune")]
    assert ("bits.layer2.0", "bits", "layer2.0", "layers[1].bits") in walked
    assert [k.name for k in space.knobs()][-6:] == [
        "kd_temperature", "kd_alpha", "finetune_steps", "lr", "batch_size", "round_to"]


def test_cheapest_and_uniform_ratios():
    space = _space("mixed")
    c = space.cheapest()
    assert c == Candidate(bits={"conv1": 8, "layer*": 4, "fc": 8}, prune={"conv1": 0.0, "layer*": 0.5, "fc": 0.125},
                          default_bits=32, default_prune=0.0, finetune_steps=0, round_to=None)
    assert space.uniform_prune_ratios() == [0.0, 0.125, 0.25, 0.5]
    continuous = SearchSpace.from_dict({"layers": [{"pattern": "*", "prune": {"low": 0.1, "high": 0.3}}]})
    assert continuous.uniform_prune_ratios() == [0.0, 0.1, 0.225, 0.3]
