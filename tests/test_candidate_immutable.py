"""Candidate is immutable all the way down, hashable, and still pickles and round-trips JSON."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import cloudpickle
import pytest

from autoshrink import Candidate


def _cand() -> Candidate:
    return Candidate(bits={"layer1.*": 4, "fc": 8}, prune={"layer2.*": 0.5}, kd_temperature=2.5, round_to=8)


def test_per_layer_tables_are_read_only():
    c = _cand()
    with pytest.raises(TypeError):
        c.bits["fc"] = 4  # type: ignore[index]
    with pytest.raises(TypeError):
        c.prune["fc"] = 0.25  # type: ignore[index]
    with pytest.raises(AttributeError):
        c.bits.update({"fc": 4})  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.bits = {}  # type: ignore[misc]
    assert c.bits_for("fc") == 8


def test_the_input_dict_does_not_leak_into_the_candidate():
    bits = {"fc": 8}
    c = Candidate(bits=bits)
    bits["fc"] = 4
    assert c.bits_for("fc") == 8


def test_equal_candidates_hash_equal_and_key_a_set():
    a, b = _cand(), _cand()
    assert a == b and hash(a) == hash(b)
    assert len({a, b, Candidate.uniform(bits=8)}) == 2
    assert a != dataclasses.replace(a, bits={"fc": 4})
    assert hash(Candidate()) == hash(Candidate())


def test_tables_compare_equal_to_plain_dicts():
    c = _cand()
    assert c.bits == {"layer1.*": 4, "fc": 8}
    assert {"layer2.*": 0.5} == c.prune
    assert list(c.bits) == ["layer1.*", "fc"]  # order kept: the first matching key wins


def test_json_is_unchanged_and_round_trips():
    c = _cand()
    data = json.loads(c.to_json())
    assert data["bits"] == {"layer1.*": 4, "fc": 8}
    assert data["prune"] == {"layer2.*": 0.5}
    assert type(c.to_dict()["bits"]) is dict
    assert Candidate.from_json(c.to_json()) == c


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_pickles_and_copies_as_itself(dumps):
    c = _cand()
    back = pickle.loads(dumps(c))
    assert back == c and hash(back) == hash(c)
    with pytest.raises(TypeError):
        back.bits["fc"] = 4  # type: ignore[index]
    assert copy.deepcopy(c) == c
