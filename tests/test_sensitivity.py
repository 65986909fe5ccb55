from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from autoshrink.sensitivity import COLUMNS, narrow_space, plot_sensitivity, sensitivity
from autoshrink.space import SearchSpace
from autoshrink.task import Task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = ["conv1", "conv2", "fc"]
BITS = (4, 8)
PRUNE = (0.25, 0.5, 0.75)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)  # keeps which quadrant was bright
        self.fc = nn.Linear(16 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _quadrants(n: int, seed: int) -> TensorDataset:
    """8x8 noise images; the class is the quadrant that was brightened."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    for i, q in enumerate(y.tolist()):
        r, c = divmod(q, 2)
        x[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 0.6
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def task() -> Task:
    torch.manual_seed(0)
    train, val = _quadrants(512, seed=1), _quadrants(256, seed=2)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    loader = torch.utils.data.DataLoader(
        train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    model.train()
    for _ in range(7):  # 56 steps
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return Task(model=model.eval(), train_data=train, val_data=val, example_input=val[0][0][None])


@pytest.fixture(scope="module")
def table(task: Task) -> pd.DataFrame:
    return sensitivity(task, bits=BITS, prune=PRUNE, limit=256, progress=False)


def test_teacher_learned_the_task(task: Task) -> None:
    accuracy, _ = task.evaluate(task.model)
    assert accuracy > 90.0


def test_one_row_per_layer_and_setting(table: pd.DataFrame) -> None:
    assert list(table.columns) == list(COLUMNS)
    got = set(zip(table["layer"], table["kind"], table["value"], strict=True))
    want = {(n, "bits", float(b)) for n in LAYERS for b in BITS}
    want |= {(n, "prune", r) for n in ("conv1", "conv2") for r in PRUNE}  # fc is the head
    assert got == want
    assert len(table) == len(want)
    assert table["accuracy"].notna().all()
    assert table.attrs["by"] == "layer" and table.attrs["limit"] == 256


def test_baseline_settings_are_not_measured(task: Task) -> None:
    df = sensitivity(task, bits=(8, 32), prune=(0.0, 0.5), layers=["conv2"], progress=False,
                     limit=64)
    assert set(zip(df["kind"], df["value"], strict=True)) == {("bits", 8.0), ("prune", 0.5)}


def test_progress_bar_names_the_setting(task: Task, capsys) -> None:
    sensitivity(task, bits=(8,), prune=(), layers=["fc"], limit=64, progress=True)
    out = capsys.readouterr().out
    assert "sensitivity" in out and "1/1" in out


def test_drop_is_teacher_minus_accuracy(table: pd.DataFrame) -> None:
    teacher = table.attrs["teacher_accuracy"]
    assert (table["drop"] - (teacher - table["accuracy"])).abs().max() < 1e-9
    # 8-bit weights cost (almost) nothing on this net
    assert table.loc[table["kind"] == "bits"].query("value == 8")["drop"].max() < 5.0


def test_more_pruning_removes_more(table: pd.DataFrame) -> None:
    pruned = table[table["kind"] == "prune"]
    for _layer, rows in pruned.groupby("layer"):
        params = rows.sort_values("value")["params"].tolist()
        assert params == sorted(params, reverse=True) and params[0] > params[-1]
    mean_drop = pruned.groupby("value")["drop"].mean()
    assert mean_drop[0.75] > mean_drop[0.25]


def test_by_rule_changes_each_rules_layers_together(task: Task) -> None:
    space = SearchSpace.from_dict(
        {"layers": [{"name": "convs", "pattern": "conv*", "bits": [4, 8, 32]},
                    {"pattern": "*", "bits": [8, 32]}]}
    )
    df = sensitivity(task, bits=(8,), prune=(0.5,), by="rule", space=space, limit=64,
                     progress=False)
    assert set(zip(df["layer"], df["kind"], strict=True)) == {
        ("convs", "bits"), ("convs", "prune"), ("*", "bits")  # "*" keeps only fc: never pruned
    }
    pruned = df[df["kind"] == "prune"]["params"].item()
    assert pruned < sum(p.numel() for p in task.model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"by": "stage"}, r"by must be one of \['layer', 'rule'\], got 'stage'"),
        ({"layers": ["conv*", "layer9.*"]}, r"layers: 'layer9\.\*' matches no quantizable layer"),
        ({"bits": (3,)}, r"bits: 3 is not one of \[4, 8, 32\]"),
        ({"prune": (1.0,)}, r"prune: 1\.0 is not a ratio in \[0, 1\)"),
        ({"limit": 0}, r"limit must be None or an integer >= 1, got 0"),
        ({"bits": (32,), "prune": ()}, r"nothing to measure"),
    ],
)
def test_errors_name_the_value(task: Task, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sensitivity(task, progress=False, **kwargs)


def test_rule_matching_no_layer_is_an_error(task: Task) -> None:
    space = SearchSpace.from_dict({"layers": [{"pattern": "layer1.*", "bits": [4, 8]}]})
    with pytest.raises(ValueError, match=r"'layer1\.\*' matches no layer"):
        sensitivity(task, by="rule", space=space, progress=False)


def test_plot_writes_a_png(table: pd.DataFrame, tmp_path) -> None:
    out = plot_sensitivity(table, tmp_path / "plots" / "sensitivity.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in out.parent.iterdir()] == ["sensitivity.png"]  # no temp file left


def test_plot_rejects_a_table_without_drops(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['drop'\]"):
        plot_sensitivity(pd.DataFrame({"layer": ["a"], "kind": ["bits"], "value": [4]}),
                         tmp_path / "x.png")


# -- narrow_space --------------------------------------------------------------------------------


def _rows(*rows: tuple[str, str, float, float]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["layer", "kind", "value", "drop"])


SPACE = SearchSpace.from_dict(
    {
        "layers": [
            {"name": "stem", "pattern": "conv1", "bits": [4, 8, 32]},
            {"name": "stage1", "pattern": "layer1.*", "bits": [4, 8, 32],
             "prune": {"low": 0.0, "high": 0.75, "step": 0.125}},
            {"name": "stage2", "pattern": "layer2.*", "bits": [4, 8],
             "prune": [0.0, 0.25, 0.5]},
            {"name": "head", "pattern": "fc", "bits": [8, 32]},
        ]
    },
    source="test.yaml",
)

DF = _rows(
    ("conv1", "bits", 4, 9.0),  # forced high: 4 goes from the stem
    ("conv1", "bits", 8, 0.2),
    ("layer1.0.conv1", "bits", 4, 0.3),
    ("layer1.0.conv2", "bits", 4, 0.8),  # worst over the stage is still within 1.0
    ("layer1.0.conv1", "prune", 0.25, 0.1),
    ("layer1.0.conv1", "prune", 0.5, 0.9),
    ("layer1.0.conv2", "prune", 0.5, 2.5),  # 0.5 fails for the stage: cap at 0.25
    ("layer1.0.conv2", "prune", 0.75, 30.0),
    ("layer2.0.conv1", "bits", 4, 3.0),
    ("layer2.0.conv1", "bits", 8, 0.5),
    ("layer2.0.conv1", "prune", 0.25, 4.0),
    ("fc", "bits", 8, 5.0),
)


def test_narrow_removes_bad_choices_and_keeps_32() -> None:
    narrowed = narrow_space(SPACE, DF, max_drop=1.0)
    rules = {r.label: r for r in narrowed.rules()}
    assert rules["stem"].bits == [8, 32]
    assert rules["stage1"].bits == [4, 8, 32]
    assert rules["stage1"].prune.high == 0.25 and rules["stage1"].prune.low == 0.0
    assert rules["stage2"].bits == [8]
    assert rules["stage2"].prune == [0.0]
    assert rules["head"].bits == [32]  # 8 goes, 32 always stays
    assert "narrowed" in narrowed.source
    assert {r.label: r.bits for r in SPACE.rules()}["stem"] == [4, 8, 32]  # input unchanged


def test_narrow_keeps_everything_within_the_limit() -> None:
    narrowed = narrow_space(SPACE, DF, max_drop=100.0)
    assert narrowed.to_dict()["layers"] == SPACE.to_dict()["layers"]


def test_narrow_keeps_one_choice_when_all_are_too_costly() -> None:
    space = SearchSpace.from_dict({"layers": [{"pattern": "fc", "bits": [4, 8],
                                              "prune": [0.25, 0.5]}]})
    df = _rows(("fc", "bits", 4, 9.0), ("fc", "bits", 8, 2.0), ("fc", "prune", 0.25, 5.0))
    with pytest.warns(UserWarning, match="every bit choice"):
        rule = narrow_space(space, df, max_drop=1.0).rules()[0]
    assert rule.bits == [8] and rule.prune == [0.25]


def test_narrow_by_rule_table_uses_rule_labels() -> None:
    df = _rows(("stage1", "bits", 4, 7.0), ("stage1", "prune", 0.125, 3.0))
    rules = {r.label: r for r in narrow_space(SPACE, df).rules()}
    assert rules["stage1"].bits == [8, 32] and rules["stage1"].prune == 0.0
    assert rules["stem"].bits == [4, 8, 32]  # no rows: unchanged


@pytest.mark.parametrize(
    ("df", "kwargs", "error", "match"),
    [
        (DF, {"max_drop": float("nan")}, ValueError, r"max_drop must be a finite number.*nan"),
        (DF.drop(columns="drop"), {}, ValueError, r"lacks column\(s\) \['drop'\]"),
        (_rows(("fc", "quant", 4, 1.0)), {}, ValueError, r"kind: \['quant'\] not one of"),
        ([1, 2], {}, TypeError, r"expected a pandas DataFrame.*got list"),
    ],
)
def test_narrow_errors(df, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        narrow_space(SPACE, df, **kwargs)


def test_reestimated_batchnorm_statistics_are_the_batches_own() -> None:
    """A pruned setting is scored with BatchNorm statistics of the pruned model (as
    Once-for-all scores sub-networks), averaged over the calibration batches; no weight moves."""
    import torch
    from torch import nn

    from autoshrink.sensitivity import reestimate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [torch.randn(8, 3, 6, 6) * 3 + 1 for _ in range(3)]
    out = reestimate_batchnorm(model, batches)
    assert out is model and not model.training and model[1].momentum == 0.3
    with torch.no_grad():
        feats = torch.cat([model[0](b) for b in batches])
    torch.testing.assert_close(model[1].running_mean, feats.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v)
    plain = nn.Linear(3, 2).train()
    assert reestimate_batchnorm(plain, batches) is plain and not plain.training
