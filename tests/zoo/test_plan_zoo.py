"""``plan`` on the zoo finds the groups a trial's pruning will leave whole, the way the trial finds
them (guarded graph construction, the same "left unpruned: ..." reasons), and never hangs."""

from __future__ import annotations

import torch

import autoshrink as ash
from autoshrink import Candidate
from autoshrink.compress.prune import GRAPH_TIMEOUT_VAR, prune_
from autoshrink.plan import render

from .nets import create

X = torch.randn(1, 1, 32, 32)


def test_plan_names_shufflenet_v2_groups_as_the_trial_does():
    p = ash.plan(create("shufflenet_v2"), example_input=X, measure=False)
    assert p.groups, "the groups inside the blocks are still prunable"
    assert any("channel shuffle of 2 groups" in why for _, why in p.unpruned_groups), p.unpruned_groups
    report = prune_(create("shufflenet_v2"), Candidate.uniform(prune=0.5), X)
    assert {w for _, w in p.unpruned_groups} == {w for _, w in report.unpruned_groups}
    text = render(p)
    assert "left unpruned: " in text and "channel shuffle of 2 groups" in text
    assert p.as_dict()["unpruned_groups"][0]["reason"].startswith("left unpruned: ")


def test_plan_analysis_is_guarded(monkeypatch):
    """A graph construction past the limit ends the plan with every layer named, not a hang."""
    monkeypatch.setenv(GRAPH_TIMEOUT_VAR, "1e-9")
    p = ash.plan(create("shufflenet_v2"), "auto", example_input=X, measure=False)
    assert not p.groups
    assert p.unpruned_groups and all("graph_timeout_s=1e-09" in why for _, why in p.unpruned_groups)
    assert "stem.0" in p.unpruned and "graph_timeout_s=1e-09" in p.unpruned["stem.0"]
    assert "graph_timeout_s=1e-09" in render(p)


def test_plan_dual_path_names_the_unmappable_group():
    p = ash.plan(create("dual_path"), example_input=X, measure=False)
    (members, why), = [(g, w) for g, w in p.unpruned_groups if "cannot map" in w]
    assert "stem.0" in members and why.startswith("left unpruned: torch-pruning cannot map")
