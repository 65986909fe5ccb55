"""Search-space parsing, validation errors (file, key path, value), binding and sampling."""

from __future__ import annotations

import optuna
import pytest

from autoshrink import Candidate, SearchSpace, SpaceError
from autoshrink.space import default_space_path

LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.shortcut.0", "fc"]


def _space(**overrides):
    spec = {
        "layers": [
            {"name": "stem", "pattern": "conv1", "bits": [8, 32]},
            {"name": "s1", "pattern": "layer1.*", "bits": [4, 8], "prune": {"low": 0, "high": 0.5, "step": 0.25}},
            {"pattern": "layer2.*", "bits": 8, "prune": [0.0, 0.5], "per_layer": True},
        ],
    }
    spec.update(overrides)
    return SearchSpace.from_dict(spec, source="s.yaml")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"layers": [{"pattern": "x", "bits": [3]}]}, r"s\.yaml: layers\[0\]\.bits: 3 is not one of \[4, 8, 32\]"),
        ({"layers": [{"pattern": "x", "prune": 1.0}]}, r"layers\[0\]\.prune: 1\.0 is outside \[0, 1\)"),
        ({"layers": [{"pattern": "x", "prune": -0.1}]}, r"layers\[0\]\.prune: -0\.1 is outside"),
        ({"layers": [{"pattern": "x", "prune": {"low": 0, "high": 1}}]}, r"must lie within \[0, 1\)"),
        ({"layerz": []}, r"s\.yaml: layerz: unknown key"),
        ({"layers": [{"pattern": "x", "bitz": [8]}]}, r"layers\[0\]\.bitz: unknown key"),
        ({"layers": [{"bits": [8]}]}, r"layers\[0\]\.pattern: required key is missing"),
        ({"distill": {"alpha": 1.5}}, r"distill\.alpha: alpha must lie in \[0, 1\]"),
        ({"distill": {"temperature": 0}}, r"distill\.temperature: temperature must be > 0"),
        ({"finetune": {"lr": {"low": 0.1, "high": 0.01}}}, r"finetune\.lr: `low <= high` must hold"),
        ({"finetune": {"steps": -5}}, r"finetune\.steps: must be >= 0"),
        ({"finetune": {"lr": "fast"}}, r"finetune\.lr: expected a value, a list of choices"),
        ({"defaults": {"bits": 16}}, r"defaults\.bits: 16 is not one of"),
        ({"round_to": 0}, r"round_to: must be null or an integer >= 1"),
        ({"layers": [{"pattern": "a", "bits": [8]}, {"pattern": "a", "bits": [4]}]}, r"rule names must be unique"),
    ],
)
def test_invalid_spaces_name_file_key_and_value(spec, message):
    with pytest.raises(SpaceError, match=message):
        SearchSpace.from_dict(spec, source="s.yaml")


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("layers:\n  - pattern: [unclosed\n")
    with pytest.raises(SpaceError, match=r"bad\.yaml:\d+:\d+: YAML syntax error"):
        SearchSpace.from_yaml(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(SpaceError, match="search space file not found"):
        SearchSpace.from_yaml(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpaceError, match="top level must be a mapping"):
        SearchSpace.from_yaml(tmp_path / "list.yaml")


def test_pattern_matching_no_layer_is_an_error():
    space = SearchSpace.from_dict({"layers": [{"pattern": "block9.*", "bits": [8]}]}, source="s.yaml")
    with pytest.raises(SpaceError, match=r"layers\[0\]\.pattern: 'block9\.\*' matches no layer"):
        space.bind(LAYERS)


def test_shadowed_rule_is_an_error():
    space = SearchSpace.from_dict(
        {"layers": [{"pattern": "layer1.*", "bits": [8]}, {"name": "x", "pattern": "layer1.0.*", "bits": [4]}]}
    )
    with pytest.raises(SpaceError, match="earlier rules already set"):
        space.bind(LAYERS)


def test_default_space_is_valid_and_binds_to_resnet_names():
    space = SearchSpace.from_yaml(default_space_path())
    names = ["conv1"] + [f"layer{i}.0.conv1" for i in range(1, 5)] + ["fc"]
    bound = space.bind(names)
    assert "bits.stage1" in bound.param_names()
    assert "prune.stage4" in bound.param_names()


def test_sampling_is_deterministic_and_valid():
    space = _space().bind(LAYERS)

    def draw(seed):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        return [space.sample(study.ask()) for _ in range(5)]

    a, b = draw(3), draw(3)
    assert a == b
    for cand in a:
        assert cand.bits_for("layer1.0.conv2") in (4, 8)
        assert cand.prune_for("layer1.0.conv1") in (0.0, 0.25, 0.5)
        assert cand.bits_for("layer2.0.conv1") == 8
        # per-layer rule: one parameter per matched layer, keyed by exact name
        assert set(cand.prune) >= {"layer2.0.conv1", "layer2.0.shortcut.0"}


def test_per_layer_needs_binding():
    with pytest.raises(SpaceError, match="bind the space to a model first"):
        _space().param_names()


def test_candidate_params_round_trip_for_baselines():
    space = _space().bind(LAYERS)
    cand = Candidate.uniform(bits=8, prune=0.25)
    params = space.candidate_params(cand)
    assert params["bits.s1"] == 8
    assert params["prune.s1"] == 0.25
    study = optuna.create_study()
    study.enqueue_trial(params)
    sampled = space.sample(study.ask())
    assert sampled.bits_for("layer1.0.conv1") == 8
    assert sampled.prune_for("layer1.0.conv1") == 0.25


def test_fingerprint_tracks_content_not_file_name():
    assert _space().fingerprint() == _space().fingerprint()
    assert _space().fingerprint() != _space(round_to=8).fingerprint()
