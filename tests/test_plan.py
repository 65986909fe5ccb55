"""plan(): the space bound to the model, its errors raised before anything trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import autoshrink as ash
import autoshrink.compress
from autoshrink.plan import plan, render
from autoshrink.space import SearchSpace, SpaceError

X = torch.randn(1, 1, 32, 32)


@pytest.fixture
def resnet20():
    torch.manual_seed(0)
    return ash.models.create("resnet20", num_classes=10, in_chans=1).eval()


@pytest.fixture
def no_compress(monkeypatch):
    """Errors in the space must come before any compression (let alone training)."""
    def refuse(*_a, **_k):
        raise AssertionError("compress ran before the space was checked")

    monkeypatch.setattr(autoshrink.compress, "compress", refuse)


def _space(layers, **extra) -> SearchSpace:
    return SearchSpace.from_dict({"layers": layers, **extra}, source="mine.yaml")


def test_a_pattern_matching_no_layer_is_an_error(resnet20, no_compress):
    space = _space([{"pattern": "conv1", "bits": [8, 32]}, {"pattern": "layer4.*", "bits": [4, 8]}])
    with pytest.raises(SpaceError, match=r"mine.yaml: layers\[1\].pattern: 'layer4.\*' matches no layer"):
        plan(resnet20, space, example_input=X)


def test_an_empty_layer_list_is_an_error(resnet20, no_compress):
    with pytest.raises(SpaceError, match="mine.yaml: layers: the space has no layer rules"):
        plan(resnet20, _space([]), example_input=X)


def test_pruning_asked_of_the_head_is_an_error(resnet20, no_compress):
    space = _space([{"name": "head", "pattern": "fc", "bits": 8, "prune": 0.5}])
    with pytest.raises(SpaceError, match=r"layers\[0\].prune: 'head' asks to prune \['fc'\], which are never "
                                         r"pruned \(the classifier head"):
        plan(resnet20, space, example_input=X)


def test_a_model_needs_an_example_input(resnet20):
    with pytest.raises(ValueError, match="needs example_input="):
        plan(resnet20, "auto")


def test_plan_lists_rules_groups_and_what_is_left_alone(resnet20):
    p = plan(resnet20, "auto", ash.Budget(mmacs=1.0), example_input=X, measure=False)
    assert {r.label: len(r.layers) for r in p.rules} == {"stem": 1, "head": 1, "stage1": 6, "stage2": 7, "stage3": 7}
    assert p.defaults == ()
    # the residual stream of stage 3: shortcut and the blocks' second convs pruned together
    stream = next(g for g in p.groups if "layer3.0.shortcut.0" in g.layers)
    assert set(stream.layers) == {"layer3.0.shortcut.0", "layer3.0.conv2", "layer3.1.conv2", "layer3.2.conv2"}
    assert (stream.channels, stream.rule, stream.kept_min, stream.kept_max) == (64, "stage3", 16, 64)
    assert p.unpruned["fc"].startswith("the classifier head")
    assert "stem" in p.unpruned["conv1"]  # the stem's group is not pruned: its rule has no prune
    assert p.cheapest.bits_for("layer2.0.conv1") == 4 and p.cheapest.prune_for("layer2.0.conv1") == 0.625
    assert p.cheapest_cost["mmacs"] < p.teacher["mmacs"] and p.cheapest_cost["latency_ms"] is None
    assert p.meets_budget is False  # 1 MMAC is out of reach, and the plan says so
    text = render(p)
    assert "stage3" in text and "layer3.*" in text and "MISSES" in text
    assert p.as_dict()["rules"][0] == {"rule": "stem", "pattern": "conv1", "layers": ["conv1"]}


class WithConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.conv(x).flatten(2)
        return self.fc(self.seq(x).mean(2))


def test_layers_the_quantizer_cannot_take_are_named_fp32():
    space = _space([{"pattern": "conv", "bits": [8, 32]}, {"pattern": "fc", "bits": [8, 32]}])
    p = plan(WithConv1d().eval(), space, example_input=torch.randn(1, 1, 6, 6), measure=False)
    assert "Conv1d has no int8 lowering" in p.fp32["seq"]
    assert p.defaults == ()  # Conv1d takes no bits, so no rule needs to match it


@pytest.mark.slow  # compiles and times the cheapest candidate (~40 s on 2 cores)
def test_plan_times_the_cheapest_candidate(resnet20):
    p = plan(resnet20, "auto", ash.Budget(latency_ms=1000.0), example_input=X, latency_runs=5)
    assert p.cheapest_error == ""
    assert p.cheapest_cost["latency_ms"] > 0 and p.meets_budget is True
    assert "ms (median of a short run)" in render(p)


def test_the_plan_and_space_commands_need_no_training(tmp_path, capsys, monkeypatch):
    import autoshrink.tasks.digits as digits
    from autoshrink.cli import main
    from autoshrink.space import default_space_path

    def no_training(*_a, **_k):
        raise AssertionError("a teacher trained for a plan")

    monkeypatch.setattr(digits, "train_teacher", no_training)
    assert main(["plan", "--task", "digits-resnet20", "--no-latency", "--budget-mmacs", "1000"]) == 0
    out = capsys.readouterr().out
    assert "space auto:resnet20" in out and "layer3.*" in out and "meets it" in out
    # the bundled default names layer4, which resnet20 does not have: exit 2, one line, in seconds
    assert main(["plan", "--task", "digits-resnet20", "--space", str(default_space_path())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoshrink: error: ") and "'layer4.*' matches no layer" in err
    target = tmp_path / "vit.yaml"
    assert main(["space", "--task", "digits-vit", "-o", str(target)]) == 0
    assert SearchSpace.from_yaml(target).source == str(target)
    assert "blocks.3.*" in target.read_text()
