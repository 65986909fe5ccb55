"""Public Hugging Face architectures nobody here wrote (issue 11), built from tiny configs (random
weights, nothing downloaded) and wrapped to return ``.logits`` as a user would: ``plan`` and
``apply`` (uniform int8, prune 0.25) go through each, pruning what they can and naming the rest."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import autoshrink as ash
from autoshrink.compress import QATModel, compress

T = pytest.importorskip("transformers")


class Logits(nn.Module):
    """What a user writes: call the HF model, return its ``.logits``."""

    def __init__(self, model: nn.Module, text: bool = False) -> None:
        super().__init__()
        self.model, self.text = model, text

    def forward(self, x):
        return (self.model(input_ids=x) if self.text else self.model(pixel_values=x)).logits


def _img(cls, cfg):
    torch.manual_seed(0)
    return Logits(cls(cfg).eval()).eval(), torch.randn(1, 3, 32, 32)


def _bert():
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=16, num_labels=2)
    return Logits(T.BertForSequenceClassification(cfg).eval(), text=True).eval(), torch.randint(1, 50, (1, 8))


BUILDERS = {
    "resnet": lambda: _img(T.ResNetForImageClassification, T.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10)),
    "mobilenet_v2": lambda: _img(T.MobileNetV2ForImageClassification, T.MobileNetV2Config(
        num_channels=3, image_size=32, depth_multiplier=0.25, num_labels=10)),
    "convnext": lambda: _img(T.ConvNextForImageClassification, T.ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)),
    "vit": lambda: _img(T.ViTForImageClassification, T.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=10)),
    "deit": lambda: _img(T.DeiTForImageClassification, T.DeiTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=10)),
    "regnet": lambda: _img(T.RegNetForImageClassification, T.RegNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=10)),
    "poolformer": lambda: _img(T.PoolFormerForImageClassification, T.PoolFormerConfig(
        num_channels=3, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], mlp_ratio=2.0, num_labels=10)),
    "efficientnet": lambda: _img(T.EfficientNetForImageClassification, T.EfficientNetConfig(
        num_channels=3, image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, num_labels=10)),
    "mobilevit": lambda: _img(T.MobileViTForImageClassification, T.MobileViTConfig(
        num_channels=3, image_size=32, patch_size=2, hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=2, num_labels=10)),
    "swin": lambda: _img(T.SwinForImageClassification, T.SwinConfig(
        image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
        num_labels=10)),
    "bert": _bert,
}
FAST = ("vit", "bert", "swin", "regnet")  # a few seconds each; the others take longer to trace
# what each leaves alone, and why (the rest of each model is pruned)
EXPECTED_UNPRUNED = {"swin": "window/patch partition"}
EXPECTED_FP32 = {"bert": "Embedding has no int8 lowering"}


HEAVY = ("mobilevit",)  # ~20 s to trace: its attention is vit's, its convs mobilenet_v2's


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.heavy if n in HEAVY
                                                                   else pytest.mark.slow) for n in BUILDERS])
def test_public_hf_model_plans_and_applies(name):
    model, x = BUILDERS[name]()
    before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        teacher_out = model(x)
    p = ash.plan(model, example_input=x, measure=False)
    assert p.groups and not p.cheapest_error, p.cheapest_error
    for members, why in p.unpruned_groups:
        assert members and why.startswith("left unpruned: ")

    cand = ash.Candidate.uniform(bits=8, prune=0.25)
    comp = compress(model, cand, x)
    assert comp.prune_report.params_after < before
    if name in EXPECTED_UNPRUNED:
        assert any(EXPECTED_UNPRUNED[name] in w for _, w in comp.prune_report.unpruned_groups)
        assert {w for _, w in p.unpruned_groups} == {w for _, w in comp.prune_report.unpruned_groups}
    else:
        assert not comp.prune_report.unpruned_groups, comp.prune_report.unpruned_groups
    if name in EXPECTED_FP32:
        assert comp.fp32_layers and all(EXPECTED_FP32[name] in w for w in comp.fp32_layers.values())

    small = ash.apply(model, cand, x)
    assert isinstance(small, QATModel)
    small.train()
    small(x).float().sum().backward()  # fine-tunable
    small.eval()
    with torch.no_grad():
        assert small(x).shape == teacher_out.shape
