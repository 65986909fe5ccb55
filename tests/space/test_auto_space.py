"""Spaces derived from a model's graph: they bind to every zoo model and every built-in task."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import autoshrink as ash
from autoshrink.compress.quantize import quantizable_layers
from autoshrink.plan import default_space_for, plan
from autoshrink.space import SearchSpace
from autoshrink.space.auto import analyze, auto_space, space_to_yaml

X = torch.randn(1, 1, 32, 32)


def _zoo(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ash.models.create(name, num_classes=10, in_chans=1).eval()


@pytest.mark.parametrize("name", ash.models.list_models())
def test_auto_space_binds_to_every_zoo_model(name, tmp_path):
    model = _zoo(name)
    space = auto_space(model, X)
    assert space.source == f"auto:{name}"
    layers = quantizable_layers(model)
    bound = space.bind(layers)  # raises if a pattern matches no layer
    rules = {r.label: r for r in space.rules()}
    graph = analyze(model, X)
    # the stem and the classifier are protected: 8/32 bits, never pruned
    assert rules["head"].pattern == graph.head and rules["head"].prune is None
    assert rules["head"].bits == [8, 32]
    assert rules["stem"].pattern == graph.stem and rules["stem"].prune is None
    stages = [r for r in space.rules() if r.label.startswith("stage")]
    assert 2 <= len(stages) <= 6
    assert all(r.bits == [4, 8, 32] and r.prune is not None for r in stages)
    # every quantizable layer is set by exactly one rule (no layer falls to the defaults)
    matched = [n for r in space.rules() for n in bound.bind(layers)._bound[r.label]]
    assert sorted(matched) == sorted(layers)
    # the YAML a user edits loads back to the same space
    path = tmp_path / "space.yaml"
    path.write_text(space_to_yaml(space))
    assert path.read_text().startswith(f"# Search space auto:{name}\n")
    assert SearchSpace.from_yaml(path).fingerprint() == space.fingerprint()


def test_stages_follow_the_blocks_and_deepen_the_pruning():
    space = auto_space(_zoo("resnet20"), X)
    assert [(r.label, r.pattern) for r in space.rules()] == [
        ("stem", "conv1"), ("head", "fc"), ("stage1", "layer1.*"), ("stage2", "layer2.*"), ("stage3", "layer3.*"),
    ]
    highs = [r.prune.high for r in space.rules() if r.prune is not None]
    assert highs == sorted(highs) and highs[0] == 0.5 and highs[-1] == 0.75
    # the container holding most layers is opened up: blocks.0 ... blocks.6 gathered by glob
    mobile = auto_space(_zoo("mobilenetv2_32"), X)
    assert [r.pattern for r in mobile.rules()][2:5] == ["blocks.[0-2].*", "blocks.[3-4].*", "blocks.[5-6].*"]


class Deep(nn.Module):
    """Twelve numbered blocks: no single glob names blocks 8 to 11."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
                                      for _ in range(12)])
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_blocks_past_ten_are_named_by_globs_that_match_only_them():
    model = Deep().eval()
    space = auto_space(model, X)
    layers = quantizable_layers(model)
    bound = space.bind(layers)
    stages = [r for r in space.rules() if r.label.startswith("stage")]
    owned = [bound._bound[r.label] for r in stages]
    assert sorted(n for o in owned for n in o) == sorted(f"blocks.{i}.0" for i in range(12))
    assert all(o == sorted(o, key=lambda n: int(n.split(".")[1])) for o in owned)
    assert "blocks.1[0-1].*" in [r.pattern for r in stages]  # 10 and 11, not 1


def test_a_single_layer_model_gets_a_head_rule_only():
    space = auto_space(nn.Linear(4, 2), torch.randn(1, 4))
    assert [(r.label, r.pattern) for r in space.rules()] == [("head", "*")]
    space.bind([""])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_stages must be an integer >= 1, got 0"):
        auto_space(_zoo("resnet20"), X, max_stages=0)
    with pytest.raises(ValueError, match="has no Conv2d or Linear layer"):
        auto_space(nn.Sequential(nn.ReLU()), torch.randn(1, 4))


def test_resnet18_32_keeps_the_bundled_default():
    assert default_space_for(_zoo("resnet18_32"), X).fingerprint() == SearchSpace.default().fingerprint()
    assert default_space_for(_zoo("resnet20"), X).source == "auto:resnet20"


@pytest.mark.parametrize("name", ash.tasks.list_tasks())
def test_every_built_in_task_plans_with_its_default_space(name, monkeypatch, tmp_path):
    """No --space: every built-in task binds and plans (teacher training and scoring stubbed out:
    the space depends on the architecture only)."""
    import autoshrink.tasks.digits as digits

    monkeypatch.setenv("AUTOSHRINK_CACHE", str(tmp_path))
    monkeypatch.setattr(digits, "train_teacher", lambda model, *a, **k: model.eval())
    monkeypatch.setattr(ash.Task, "evaluate", lambda self, model, **k: (10.0, None))
    task = ash.tasks.get(name, progress=False)
    p = plan(task, None, ash.Budget(mmacs=1e6), measure=False)
    arch = task.model.default_cfg["architecture"]
    assert p.space.source == (SearchSpace.default().source if arch == "resnet18_32" else f"auto:{arch}")
    assert all(r.layers for r in p.rules) and p.groups
    assert p.cheapest_error == "" and p.cheapest_cost["params"] < p.teacher["params"]
    assert p.meets_budget is True
