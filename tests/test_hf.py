"""Hugging Face models as they are: `.logits` outputs, dict batches, `--model hf:DIR`.

Every model is built from a tiny config (random weights, nothing downloaded).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import autoshrink as ash
from autoshrink import _batches
from autoshrink.plan import plan
from autoshrink.task import TaskError

transformers = pytest.importorskip("transformers")


def _vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    num_labels=3)
    return transformers.ViTForImageClassification(config).eval()


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(config).eval()


class Text(Dataset):
    """Random token ids; the label is whether the first token is above 25 (learnable)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 50, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": (self.ids[i, 0] > 25).long()}


def _vit_task() -> ash.Task:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 16, 16, generator=g), torch.randint(0, 3, (48,), generator=g)
    return ash.Task(model=_vit(), train_data=TensorDataset(x, y), val_data=TensorDataset(x, y),
                    example_input=x[:1], name="hf-vit")


def _bert_task() -> ash.Task:
    example = {"input_ids": torch.randint(1, 50, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    return ash.Task(model=_bert(), train_data=Text(64, 0), val_data=Text(32, 1), example_input=example,
                    name="hf-bert")


# -- the adapter ------------------------------------------------------------------------------------
def test_logits_are_found_in_every_output_shape():
    t = torch.zeros(2, 3)
    assert _batches.logits_of(t) is t
    assert _batches.logits_of(transformers.modeling_outputs.SequenceClassifierOutput(logits=t)) is t
    assert _batches.logits_of({"logits": t, "loss": None}) is t
    assert _batches.logits_of((t, torch.ones(1))) is t
    with pytest.raises(TypeError, match="returned a str; expected a logits tensor"):
        _batches.logits_of("no")


def test_batches_split_into_inputs_and_targets():
    x, y = _batches.split_batch({"input_ids": torch.ones(2, 3), "labels": torch.tensor([0, 1])})
    assert list(x) == ["input_ids"] and y.tolist() == [0, 1]
    x, y = _batches.split_batch((torch.ones(2, 3), torch.tensor([1, 0]), "extra"))
    assert x.shape == (2, 3) and y.tolist() == [1, 0]
    with pytest.raises(TypeError, match="a dict batch needs a 'labels' entry"):
        _batches.split_batch({"input_ids": torch.ones(2, 3)})
    padded = _batches.pad_to({"a": torch.ones(2, 3)}, 4)
    assert padded["a"].shape == (4, 3) and _batches.batch_size(padded) == 4


# -- tasks ------------------------------------------------------------------------------------------
def test_an_image_model_with_logits_output_is_a_task():
    task = _vit_task()
    assert task.num_classes == 3
    acc, se = task.evaluate(task.model, batch_size=16, fixed_batch=True)
    assert 0 <= acc <= 100 and se is not None


def test_a_text_model_with_dict_batches_is_a_task():
    task = _bert_task()
    assert task.num_classes == 2
    acc, _ = task.evaluate(task.model, batch_size=10, limit=25, fixed_batch=True)
    assert 0 <= acc <= 100
    batch = next(task.calibration_batches(n=1, batch_size=4))
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].shape == (4, 8)


def test_an_output_without_logits_is_a_task_error():
    class Words(torch.nn.Module):
        def forward(self, x):
            return "a sentence"

    data = TensorDataset(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TaskError, match="returned a str; expected a logits tensor"):
        ash.Task(model=Words(), train_data=data, val_data=data, example_input=torch.randn(1, 2))


@pytest.mark.parametrize("make", [_vit_task, _bert_task], ids=["vit", "bert"])
def test_hf_models_plan_with_an_auto_space_of_their_own_names(make):
    task = make()
    p = plan(task, None, ash.Budget(mmacs=100.0), measure=False)
    assert p.space.source.startswith("auto:")
    assert {r.label for r in p.rules} >= {"head", "stage1", "stage2"}
    assert all(r.layers for r in p.rules) and p.groups and p.cheapest_error == ""
    names = dict(task.model.named_modules())
    assert all(n in names for r in p.rules for n in r.layers)
    if "bert" in p.model:  # embeddings have no int8 kernel: named fp32
        assert any("Embedding has no int8 lowering" in why for why in p.fp32.values())


def test_pruning_an_hf_text_model_with_dict_inputs():
    task = _bert_task()
    small = ash.apply(task.model, ash.Candidate.uniform(bits=32, prune=0.5), task.example_input)
    params = sum(p.numel() for p in small.parameters())
    assert params < sum(p.numel() for p in task.model.parameters())
    assert _batches.logits_of(_batches.call(small, task.example_input)).shape == (1, 2)


# -- hf:DIR -----------------------------------------------------------------------------------------
def test_model_hf_dir_loads_a_save_pretrained_folder(tmp_path):
    from autoshrink.tasks.custom import build_model, model_input_spec

    vit = _vit()
    vit.save_pretrained(tmp_path / "vit")
    loaded = build_model(f"hf:{tmp_path / 'vit'}")
    assert type(loaded).__name__ == "ViTForImageClassification"
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(loaded(x).logits, vit(x).logits)
    assert model_input_spec(loaded) == (1, (16, 16))
    with pytest.raises(TaskError, match="--num-classes 5: the model in .* has 3 labels"):
        build_model(f"hf:{tmp_path / 'vit'}", num_classes=5)
    with pytest.raises(TaskError, match="no config.json in the folder"):
        build_model(f"hf:{tmp_path}")
    with pytest.raises(TaskError, match="no such folder"):
        build_model(f"hf:{tmp_path / 'missing'}")


def test_an_hf_image_model_applies_at_int8():
    task = _vit_task()
    small = ash.apply(task.model, ash.Candidate.uniform(bits=8, prune=0.25), task.example_input)
    assert _batches.logits_of(small(torch.randn(2, 1, 16, 16))).shape == (2, 3)


@pytest.mark.usefixtures("shared_ray")  # tests/conftest.py: the suite's one local Ray
@pytest.mark.slow  # one Ray trial: pruned, int8, fine-tuned, lowered and compiled (~3 min on 2 cores)
def test_an_hf_text_model_sweeps_with_dict_batches(tmp_path):
    task = _bert_task()
    df = ash.sweep(task, [ash.Candidate.uniform(bits=8, prune=0.25, steps=4, batch_size=16)],
                   ash.Budget(latency_ms=1e4), workers=1, out=tmp_path, progress=False, latency_runs=2)
    assert df[["state", "error"]].to_dict("records") == [{"state": "COMPLETE", "error": ""}]
    assert df["accuracy"].notna().all() and df["params"].iloc[0] < sum(p.numel() for p in task.model.parameters())
