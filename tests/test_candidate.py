"""Candidate: validation, per-layer resolution, JSON round trip."""

from __future__ import annotations

import pytest

from autoshrink import Candidate


def test_first_matching_key_wins_and_exact_names_first():
    c = Candidate(bits={"layer1.*": 4, "layer1.0.conv1": 32, "*": 8}, default_bits=32)
    assert c.bits_for("layer1.0.conv1") == 32
    assert c.bits_for("layer1.1.conv2") == 4
    assert c.bits_for("fc") == 8


def test_defaults_apply_when_nothing_matches():
    c = Candidate(prune={"layer2.*": 0.5}, default_prune=0.25)
    assert c.prune_for("layer2.0.conv1") == 0.5
    assert c.prune_for("layer3.0.conv1") == 0.25


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": {"fc": 3}}, r"bits\['fc'\]: 3 is not one of \[4, 8, 32\]"),
        ({"prune": {"x": 1.0}}, r"prune\['x'\]: 1\.0 is outside \[0, 1\)"),
        ({"default_bits": 16}, r"default_bits: 16 is not one of"),
        ({"kd_temperature": 0}, "kd_temperature: 0 must be > 0"),
        ({"kd_alpha": 1.5}, r"kd_alpha: 1\.5 must be in \[0, 1\]"),
        ({"finetune_steps": -1}, "finetune_steps: -1 must be an integer >= 0"),
        ({"lr": 0}, "lr: 0 must be > 0"),
        ({"round_to": 0}, "round_to: 0 must be None or an integer >= 1"),
    ],
)
def test_invalid_values_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Candidate(**kwargs)


def test_json_round_trip_and_unknown_keys():
    c = Candidate(bits={"layer1.*": 4}, prune={"layer2.*": 0.5}, kd_temperature=2.5, round_to=8)
    assert Candidate.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match=r"unknown candidate key\(s\) \['bitz'\]"):
        Candidate.from_dict({"bitz": {}})


def test_uniform_and_is_quantized():
    assert Candidate.uniform(bits=32).is_quantized is False
    assert Candidate.uniform(bits=4, prune=0.5).is_quantized is True
    assert Candidate(bits={"fc": 8}).is_quantized is True
