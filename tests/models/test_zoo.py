"""Conformance of every registered model, and the registry's own behaviour."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from autoshrink import models
from autoshrink.models import _registry

BUILT_IN = ["densenet_tiny_32", "mobilenetv2_32", "resnet18_32", "resnet20", "vit_tiny_32"]


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", models.list_models())
def test_model_conformance(name: str) -> None:
    """Forward, default_cfg, torch.export with a dynamic batch, and 30% structured pruning."""
    torch.manual_seed(0)
    model = models.create(name).eval()
    cfg = model.default_cfg
    assert cfg["architecture"] == name
    assert cfg["input_size"] == (1, 32, 32)
    assert cfg["description"]
    x = torch.randn(2, *cfg["input_size"])
    with torch.no_grad():
        assert model(x).shape == (2, 10)

    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        assert exported.module()(torch.randn(5, 1, 32, 32)).shape == (5, 10)

    # Attention modules expose qkv/num_heads so torch-pruning can drop whole heads.
    attns = [m for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")]
    heads_before = [a.num_heads for a in attns]
    before = _num_params(model)
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.3,
        ignored_layers=[model.get_submodule(cfg["classifier"])],
        round_to=None,
        num_heads={a.qkv: a.num_heads for a in attns},
        prune_num_heads=bool(attns),
        prune_head_dims=not attns,
        head_pruning_ratio=0.5 if attns else 0.0,
    )
    pruner.step()
    for attn in attns:
        attn.num_heads = pruner.num_heads[attn.qkv]
        attn.head_dim = attn.qkv.out_features // (3 * attn.num_heads)

    assert _num_params(model) < before
    assert [a.num_heads for a in attns] == [h // 2 for h in heads_before]
    with torch.no_grad():
        assert model(torch.randn(3, 1, 32, 32)).shape == (3, 10)


@pytest.mark.parametrize("name", ["resnet20", "vit_tiny_32"])
def test_factory_kwargs(name: str) -> None:
    model = models.create(name, num_classes=7, in_chans=3)
    assert model.default_cfg["input_size"] == (3, 32, 32)
    assert model.default_cfg["num_classes"] == 7
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_list_models_is_sorted_and_filters() -> None:
    names = models.list_models()
    assert names == sorted(names)
    assert set(BUILT_IN) <= set(names)
    assert models.list_models("resnet*") == ["resnet18_32", "resnet20"]
    assert models.list_models("*_32") == [
        "densenet_tiny_32",
        "mobilenetv2_32",
        "resnet18_32",
        "vit_tiny_32",
    ]
    assert models.list_models("nothing*") == []


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(
        ValueError, match=r"Unknown model 'resnet19_32'\. Did you mean 'resnet18_32'\?"
    ):
        models.create("resnet19_32")
    with pytest.raises(ValueError, match=r"Available models: densenet_tiny_32, mobilenetv2_32"):
        models.create("zzz")


def test_duplicate_registration_is_refused() -> None:
    def resnet20() -> nn.Module:
        return nn.Identity()

    with pytest.raises(ValueError, match=r"'resnet20' is already registered"):
        models.register_model(resnet20)


def test_register_and_create_a_custom_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # A private copy keeps the global registry unchanged for other tests.
    monkeypatch.setattr(_registry, "_model_fns", dict(_registry._model_fns))

    @models.register_model
    def tiny_linear(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
        """One Linear layer on flattened pixels.

        More text that is not the description.
        """
        return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 32 * 32, num_classes))

    assert "tiny_linear" in models.list_models()
    model = models.create("tiny_linear", num_classes=3)
    assert model.default_cfg["description"] == "One Linear layer on flattened pixels."
    assert model.default_cfg["input_size"] == (1, 32, 32)
    assert tiny_linear().default_cfg["architecture"] == "tiny_linear"
