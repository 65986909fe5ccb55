"""The architecture patterns of public model code that broke compression (issue 11): each is
reproduced against torch-pruning / torchao alone, then shown to compress here with what cannot
be compressed named, layer by layer, with the reason."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autoshrink import Candidate
from autoshrink.compress import QATModel, apply, compress
from autoshrink.compress.prune import prune_
from autoshrink.compress.quantize import export_model, lower, prepare_ptq, quantized_weights

from .nets import ZOO, create

X = torch.randn(1, 1, 32, 32)

# what torch-pruning does with each on its own (MetaPruner, 50 %): the reason this layer exists
STOCK_FAILURE = {
    "dual_path": (IndexError, "out of bounds"),
    "multiplier": (IndexError, "out of bounds"),
    "shufflenet_v2": (ZeroDivisionError, ""),
}
# the reason a group of each is left unpruned here
EXPECTED_REASON = {
    "dual_path": "cannot map this group's channels",
    "multiplier": "cannot map this group's channels",
    "shufflenet_v1": "would lose different input channels",
    "shufflenet_v2": "channel shuffle of 2 groups would lose different channels",
    "mobilevit_like": "no longer runs with this group pruned",
    "swin_like": "no longer runs with this group pruned",
}


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(STOCK_FAILURE))
def test_torch_pruning_alone_fails(name):
    import torch_pruning as tp

    model = create(name)
    exc, match = STOCK_FAILURE[name]
    with warnings.catch_warnings(), pytest.raises(exc, match=match):
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, X, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=0.5, ignored_layers=[model.fc], round_to=8)
        pruner.step()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_prunes_what_it_can_and_names_the_rest(name):
    model = create(name)
    with torch.no_grad():
        teacher_out = model(X)
    report = prune_(model, Candidate.uniform(prune=0.5), X)
    assert report.params_after <= 0.8 * report.params_before, report.unpruned_groups
    with torch.no_grad():
        assert model(X).shape == teacher_out.shape
    for layers, why in report.unpruned_groups:
        assert layers and why.startswith("left unpruned: ")
        assert all(report.skipped[n] for n in layers)
    if name in EXPECTED_REASON:
        assert any(EXPECTED_REASON[name] in why for _, why in report.unpruned_groups), report.unpruned_groups
    as_dict = report.as_dict()
    assert as_dict["unpruned_groups"] == [{"layers": list(g), "reason": w} for g, w in report.unpruned_groups]


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g)
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5


def _kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which of ``before``'s output rows survive in ``after`` (rows are distinct random weights)."""
    flat_b, flat_a = before.flatten(1), after.flatten(1)
    return [int((flat_b == row).all(1).nonzero()) for row in flat_a]


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_channel_shuffle_groups_are_pruned_as_the_same_shuffle(ratio):
    """A group through a channel shuffle loses the same positions in every shuffle group, its
    channels mapped through the shuffle's permutation: the pruned model computes exactly what
    the teacher computes with those channels silenced (a straight mapping would silence others)."""
    import copy

    from .nets import channel_shuffle

    model = create("shufflenet_v1")
    _randomize_bn(model)
    teacher = copy.deepcopy(model)
    # only the groups through the shuffles, so that nothing else changes the output
    report = prune_(model, Candidate(prune={"*.gconv1.0": ratio}), X)
    assert not any("shuffle" in why for _, why in report.unpruned_groups), report.unpruned_groups
    silenced = copy.deepcopy(teacher)
    for unit in ("unit1", "unit2"):
        t_unit, s_unit, p_unit = (getattr(m, unit) for m in (teacher, silenced, model))
        c = t_unit.gconv1[0].out_channels
        kept = _kept_rows(t_unit.gconv1[0].weight, p_unit.gconv1[0].weight)
        assert len(kept) == p_unit.gconv1[0].out_channels < c
        gone = sorted(set(range(c)) - set(kept))
        per_group = [{i % (c // 2) for i in gone if i // (c // 2) == k} for k in range(2)]
        assert per_group[0] == per_group[1]  # the same positions from both shuffle groups
        mark = torch.zeros(1, c, 1, 1)
        mark[0, gone] = 1
        after_shuffle = channel_shuffle(mark, 2).flatten().nonzero().flatten().tolist()
        for bn, idx in ((s_unit.gconv1[1], gone), (s_unit.dwconv[1], after_shuffle)):
            bn.weight.data[idx] = 0
            bn.bias.data[idx] = 0
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), silenced(x), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(model(x), teacher(x), atol=1e-3)
    assert report.params_after < report.params_before
    # with every group asked, a quarter removes more than 20 % of the parameters
    assert prune_(create("shufflenet_v1"), Candidate.uniform(prune=0.25), X).params_after <= 0.8 * report.params_before


def test_grouped_conv_cut_unevenly_is_left_whole_with_the_reason():
    """The stem and unit1's last conv each feed one of unit2's two input groups (through the
    concat with the pooled shortcut): pruning either alone would take channels from one group
    only, which torch-pruning does silently (a grouped conv's inputs mixed up), so each is kept."""
    model = create("shufflenet_v1")
    report = prune_(model, Candidate.uniform(prune=0.5), X)
    uneven = {g: why for g, why in report.unpruned_groups if "grouped conv unit2.gconv1.0" in why}
    assert set(uneven) == {("stem.0",), ("unit1.gconv2.0",)}
    assert all("lose different input channels" in why for why in uneven.values())
    assert model.unit2.gconv1[0].in_channels == 32


def test_deep_shufflenet_v2_prunes_inside_its_blocks_and_names_the_shuffled_chain():
    """At torchvision's depth torch-pruning alone divides by zero on a shuffle's view (or, with
    that mapping off, recursed without end through the split/concat chain) and then mis-offsets
    the chunks: with the shuffles mapped and the splits' offsets read from autograd the graph
    builds with reshape mapping on, the layers inside each branch are pruned, and the channels
    that run block to block through split, concat and shuffle are kept, with the reason (pruning
    one branch's output alone would leave the two shuffle groups unequal)."""
    from .nets import ShuffleNetV2Deep

    torch.manual_seed(0)
    model = ShuffleNetV2Deep().eval()
    report = prune_(model, Candidate.uniform(prune=0.5), X)
    assert report.params_after <= 0.8 * report.params_before
    assert not report.notes  # no rebuild without reshape mapping
    assert model.stages[15].branch2[0].out_channels < 96
    chained = [g for g, why in report.unpruned_groups if "channel shuffle of 2 groups" in why]
    assert chained and "stages.15.branch2.5" in {n for g in chained for n in g}
    with torch.no_grad():
        assert model(X).shape == (1, 10)


def test_graph_guard_stops_graph_construction():
    model = create("dual_path")
    report = prune_(model, Candidate.uniform(prune=0.5), X, graph_timeout_s=1e-9)
    assert report.params_after == report.params_before
    assert report.unpruned_groups
    assert all("graph_timeout_s=1e-09" in why for _, why in report.unpruned_groups)
    assert set(report.skipped) >= {"stem.0", "block1.conv1.0"}
    with torch.no_grad():
        model(X)  # untouched and still runs


def test_graph_timeout_from_the_environment(monkeypatch):
    from autoshrink.compress.prune import GRAPH_TIMEOUT_VAR

    monkeypatch.setenv(GRAPH_TIMEOUT_VAR, "1e-9")
    report = prune_(create("multiplier"), Candidate.uniform(prune=0.5), X)
    assert report.params_after == report.params_before
    assert all("graph_timeout_s=1e-09" in why for _, why in report.unpruned_groups)
    monkeypatch.setenv(GRAPH_TIMEOUT_VAR, "soon")
    with pytest.raises(ValueError, match="AUTOSHRINK_GRAPH_TIMEOUT_S='soon': must be a number of seconds > 0"):
        prune_(create("multiplier"), Candidate.uniform(prune=0.5), X)
    # no limit at all, on request
    report = prune_(create("multiplier"), Candidate.uniform(prune=0.5), X, graph_timeout_s=None,
                    graph_memory_mb=None)
    assert report.params_after < report.params_before


def test_qkv_attention_keeps_equal_head_divisible_widths():
    model = create("qkv_vit")
    report = prune_(model, Candidate.uniform(prune=0.5), X)
    for layer in model.layers:
        att = layer.attention
        widths = {att.query.out_features, att.key.out_features, att.value.out_features}
        assert len(widths) == 1
        (width,) = widths
        assert width < 32 and width % att.num_attention_heads == 0
        assert att.num_attention_heads == 4  # heads kept, per-head dims pruned
        assert att.attention_head_size == width // 4 and att.all_head_size == width
        assert layer.output.in_features == width
    assert "layers.0.attention.query" not in report.skipped
    with torch.no_grad():
        assert model(X).shape == (1, 10)


def test_same_padding_convs_are_exported_quantizable():
    model = create("same_pad")
    gm = export_model(model, X)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.conv2d.padding not in targets
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))
    comp = compress(model, Candidate.uniform(bits=8), X)
    prepared = prepare_ptq(comp.pruned, Candidate(bits=comp.bits, default_bits=32), X, [X])
    assert quantized_weights(prepared) == {"conv1": 8, "conv2": 8, "conv3": 8, "fc": 8}


def test_even_kernel_same_padding_is_exact():
    model = nn.Sequential(nn.Conv2d(1, 4, 4, padding="same"), nn.ReLU(), nn.Conv2d(4, 4, (2, 3), padding="same",
                                                                                  dilation=(1, 2))).eval()
    x = torch.randn(1, 1, 9, 9)
    gm = export_model(model, x)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    prepared = prepare_ptq(model, Candidate.uniform(bits=8), x, [x])
    assert quantized_weights(prepared) == {"0": 8, "2": 8}


def test_apply_returns_a_model_that_trains():
    model = create("same_pad")
    small = apply(model, Candidate.uniform(bits=8, prune=0.25), X)
    assert isinstance(small, QATModel) and small.training
    batch = torch.randn(4, 1, 32, 32)
    opt = torch.optim.SGD(small.parameters(), lr=0.05)
    small.train()
    loss = small(batch).logsumexp(1).mean()
    loss.backward()
    opt.step()
    assert small.eval() is small and not small.training
    with torch.no_grad():
        out = small(batch)
    assert out.shape == (4, 10)
    torch.testing.assert_close(lower(small)(batch), out, atol=0.5, rtol=0.1)
    with pytest.raises(TypeError, match="expects a bool"):
        small.train("yes")


# -- the sweep of issue 11, one per zoo model ----------------------------------------------------
# tiny on purpose (a few steps on a few samples): what is checked is that every candidate completes
# with what it could not compress named, not how accurate it gets. Pruning alone (at a ratio that
# leaves narrow layers) and pruning with int8 (which is int8 alone wherever pruning leaves a layer)
CANDIDATES = [
    Candidate.uniform(bits=32, prune=0.5, steps=2, batch_size=16),
    Candidate.uniform(bits=8, prune=0.25, steps=2, batch_size=16),
]


@pytest.fixture(scope="module")
def digits_subset():
    from torch.utils.data import TensorDataset

    from autoshrink.tasks.digits import digits_data

    data = digits_data()
    xt, yt = data.train.tensors
    xv, yv = data.val.tensors
    return TensorDataset(xt[:64], yt[:64]), TensorDataset(xv[:64], yv[:64])


# the sweep (Ray workers, int8, fine-tune) repeats one check per pattern: q/k/v heads always; the
# others (fixed-width forwards, padding="same", grouped multiplier, Linear->GELU...) with
# AUTOSHRINK_HEAVY=1. Their pruning runs always (test_zoo_prunes_what_it_can_and_names_the_rest),
# and the Linear->GELU int8 fallback in a real trial too (test_trial_completes_with_the_real_...)
ALWAYS_SWEPT = {"qkv_vit"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n if n in ALWAYS_SWEPT else pytest.param(n, marks=pytest.mark.heavy)
                                  for n in sorted(ZOO)])
def test_zoo_sweep(name, digits_subset, shared_ray, tmp_path):
    """fp32 pruned 0.5; int8 pruned 0.25: every row COMPLETE, pruned rows >= 20 %
    fewer params, int8 rows with at least half of their Conv/Linear layers at int8, and what was
    left alone named with its layers and reason."""
    from types import SimpleNamespace

    import optuna

    import autoshrink as ash
    from autoshrink.tasks.digits import train_teacher

    train, val = digits_subset
    model = create(name)
    train_teacher(model, SimpleNamespace(train=train), epochs=1, batch_size=32, lr=0.05, progress=False)
    task = ash.Task(model=model.eval(), train_data=train, val_data=val, example_input=val.tensors[0][:1], name=name)
    teacher_params = _params(model)

    df = ash.sweep(task, CANDIDATES, ash.Budget(size_mb=100), workers=1, out=tmp_path / "run", progress=False,
                   latency_runs=1)
    assert df["state"].tolist() == ["COMPLETE"] * len(CANDIDATES), df["error"].tolist()
    study = optuna.load_study(study_name="autoshrink", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    trials = {t.number: t for t in study.get_trials()}
    result = ash.load(tmp_path / "run")
    for _, row in df.iterrows():
        cand = CANDIDATES[row["candidate_index"]]
        attrs = trials[row["number"]].user_attrs
        for layer, why in (attrs.get("skipped_layers") or {}).items():
            assert layer and why
        left = result.left_alone(row["number"])
        for group in left["unpruned_groups"]:
            assert group["layers"] and group["reason"].startswith("left unpruned: ")
        for layer, why in left["fp32_layers"].items():
            assert layer and why
        if cand.default_prune:
            assert row["params"] <= 0.8 * teacher_params, (row["params"], teacher_params)
            if name in EXPECTED_REASON:
                assert any(EXPECTED_REASON[name] in g["reason"] for g in left["unpruned_groups"]), left
        if cand.default_bits == 8:
            plan = result.layer_plan(row["number"])
            assert plan
            at_int8 = [layer["layer"] for layer in plan if layer["bits"] == 8]
            assert len(at_int8) >= len(plan) / 2, plan
        assert 0 <= row["accuracy"] <= 100
    report = (tmp_path / "run" / "report.md").read_text()
    if result.best is not None:  # the report names what the chosen trial left alone
        chosen = result.left_alone(int(result.best["number"]))
        for group in chosen["unpruned_groups"]:
            assert "### Left uncompressed" in report and group["reason"].split(" (")[0] in report
    if name == "qkv_vit":  # q, k and v pruned alike, at widths the heads divide
        comp = compress(model, CANDIDATES[0], task.example_input)
        for layer in comp.pruned.layers:
            att = layer.attention
            assert att.query.out_features == att.key.out_features == att.value.out_features
            assert att.query.out_features % att.num_attention_heads == 0


# -- int8 kernels that do not compile ------------------------------------------------------------
_FUSION_ERROR = ("backend='inductor' raised:\nAssertionError: \n  File \"torchao/quantization/pt2e/inductor_passes/"
                 "x86.py\", in qlinear_post_op_fusion\n    assert kwargs['postop_name'] == 'none'")


def _fail_to_compile(_model):
    def run(*_args, **_kwargs):
        raise RuntimeError(_FUSION_ERROR)  # what torch._dynamo's BackendCompilerFailed says

    return run


def test_compile_failure_names_the_fused_int8_layers(monkeypatch):
    from autoshrink.compress import compile as quantize  # where compile_checked looks compile_cpu up

    model = create("gelu_mlp")
    lowered = lower(prepare_ptq(model, Candidate.uniform(bits=8), X, [X]))
    monkeypatch.setattr(quantize, "compile_cpu", _fail_to_compile)
    with pytest.raises(quantize.Int8CompileError, match="qlinear_post_op_fusion|backend='inductor'") as info:
        quantize.compile_checked(lowered, X)
    assert info.value.layers == ["fc1", "fc2"]  # each feeds a GELU; the head feeds nothing


def test_fp32_linear_is_not_implicated(monkeypatch):
    from autoshrink.compress import compile as quantize  # where compile_checked looks compile_cpu up

    model = create("gelu_mlp")
    lowered = lower(prepare_ptq(model, Candidate(bits={"fc1": 32}, default_bits=8), X, [X]))
    monkeypatch.setattr(quantize, "compile_cpu", _fail_to_compile)
    with pytest.raises(quantize.Int8CompileError) as info:
        quantize.compile_checked(lowered, X)
    assert info.value.layers == ["fc2"]


@pytest.mark.slow
def test_trial_leaves_uncompilable_int8_layers_fp32(monkeypatch):
    from torch.utils.data import TensorDataset

    from autoshrink import Budget, Task, trial
    from autoshrink.compress import compile as quantize  # where compile_checked looks compile_cpu up

    calls = []

    def first_fails(lowered, x):  # the first compile fails as torchao's fusion pass does
        calls.append(1)
        real = quantize.compile_cpu
        if len(calls) == 1:
            quantize.compile_cpu = _fail_to_compile
        try:
            return quantize.compile_checked(lowered, x)
        finally:
            quantize.compile_cpu = real

    monkeypatch.setattr(trial, "compile_checked", first_fails)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,)))
    task = Task(model=create("gelu_mlp"), train_data=data, val_data=data, example_input=X, name="gelu")
    r = trial.evaluate(task, Candidate.uniform(bits=8, steps=2, batch_size=16), Budget(size_mb=10),
                       trial.TrialContext(latency_runs=1))
    assert r.state == trial.State.COMPLETE and len(calls) == 2
    assert set(r.fp32_layers) == {"fc1", "fc2"}
    assert all("int8 kernel did not compile" in why for why in r.fp32_layers.values())
    assert {layer["layer"]: layer["bits"] for layer in r.layers} == {"fc1": 32, "fc2": 32, "head": 8}


# -- the real case: an int8 Linear whose output is added to itself --------------------------------
class SelfAddMLP(nn.Module):
    """A Linear whose output reaches both inputs of one add: ``h + dropout(h)`` (dropout is the
    identity in eval), or ``gelu(h) + gelu(h)`` (Inductor merges the two GELUs into one node).
    torchao's x86 qlinear + binary fusion then fails on this torch/torchao, inside Inductor:
    "Tried to erase Node qlinear_pointwise..." or an ``AssertionError`` in
    ``_is_valid_quantized_op_binary_optimization_pattern``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(32 * 32, 64)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x.flatten(1))
        h = h + self.drop(h) if self.kind == "residual_dropout" else F.gelu(h) + F.gelu(h)
        return self.head(h)


@pytest.mark.parametrize("kind", ["residual_dropout", "twin_gelu"])
def test_real_int8_compile_failure_names_the_layer(kind):
    from autoshrink.compress.compile import Int8CompileError, compile_checked

    torch.manual_seed(0)
    model = SelfAddMLP(kind).eval()
    lowered = lower(prepare_ptq(model, Candidate.uniform(bits=8), X, [X]))
    with pytest.raises(Int8CompileError, match="backend='inductor'") as info:
        compile_checked(lowered, X)
    assert info.value.layers == ["fc1"]
    # fc1 fp32, the rest int8: compiles and runs
    fallback = lower(prepare_ptq(model, Candidate(bits={"fc1": 32}, default_bits=8), X, [X]))
    with torch.no_grad():
        assert compile_checked(fallback, X)(X).shape == (1, 10)


@pytest.mark.slow
def test_trial_completes_with_the_real_uncompilable_layer_fp32():
    """No injected error: the trial meets the compiler's failure, leaves fc1 fp32 and completes."""
    from torch.utils.data import TensorDataset

    from autoshrink import Budget, Task, trial

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,)))
    task = Task(model=SelfAddMLP("twin_gelu").eval(), train_data=data, val_data=data, example_input=X,
                name="self_add")
    r = trial.evaluate(task, Candidate.uniform(bits=8, steps=2, batch_size=16), Budget(size_mb=10),
                       trial.TrialContext(latency_runs=1))
    assert r.state == trial.State.COMPLETE, r.error
    assert set(r.fp32_layers) == {"fc1"} and "int8 kernel did not compile" in r.fp32_layers["fc1"]
    assert {layer["layer"]: layer["bits"] for layer in r.layers} == {"fc1": 32, "head": 8}
