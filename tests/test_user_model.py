"""A model written by a user (not from the zoo) goes through a sweep with no change to autoshrink.

It has the four couplings structured pruning must respect: a residual add, a depthwise conv, a
``torch.cat``, and an attention block (a fused ``qkv`` Linear with ``num_heads``/``head_dim``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import autoshrink as ash
from autoshrink.record import State


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5  # fixed: pruning head_dim must not change it
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, -1))


class UserNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise
        self.pw = nn.Conv2d(16, 16, 1)
        self.branch = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(32, 32, 3, stride=4, padding=1)  # 4x4 = 16 tokens of width 32
        self.norm = nn.LayerNorm(32)
        self.attn = Attention(32, num_heads=4)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.pw(F.relu(self.dw(x)))  # residual add
        x = torch.cat([x, F.relu(self.branch(x))], dim=1)  # concat
        x = F.relu(self.down(x))
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm(t))
        return self.fc(t.mean(1))


def _user_task() -> ash.Task:
    from autoshrink.tasks.digits import digits_data

    torch.manual_seed(0)
    data = digits_data()
    xt, yt = data.train.tensors
    xv, yv = data.val.tensors
    train, val = TensorDataset(xt[:640], yt[:640]), TensorDataset(xv[:256], yv[:256])
    model = UserNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i in range(30):  # a teacher that is better than chance, in a few seconds
        xb, yb = xt[(i * 64) % 640:][:64], yt[(i * 64) % 640:][:64]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ash.Task(model=model.eval(), train_data=train, val_data=val, example_input=xv[:1],
                    name="user-net")


@pytest.mark.usefixtures("shared_ray")  # tests/conftest.py: the suite's one local Ray
@pytest.mark.slow  # two trials, each compiled twice (latency, accuracy); fp32 pruning alone: tests/zoo
@pytest.mark.heavy  # a user's model swept on Ray workers runs always in tests/test_multifile.py
def test_a_user_model_sweeps_without_changes(tmp_path):
    task = _user_task()
    knobs = {"steps": 20, "batch_size": 32, "round_to": 8}
    candidates = [
        ash.Candidate.uniform(bits=8, prune=0.25, **knobs),
        ash.Candidate(bits={"attn.*": 32, "dw": 8}, prune={"attn.*": 0.5}, default_bits=4,
                      default_prune=0.5, finetune_steps=20, batch_size=32, round_to=8),
    ]
    df = ash.sweep(task, candidates, ash.Budget(latency_ms=1000.0), workers=1, out=tmp_path,
                   progress=False, latency_runs=10)
    assert len(df) == len(candidates)
    assert (df["state"] == State.COMPLETE).all(), df[["state", "error"]].to_dict("records")
    assert (df["error"] == "").all()
    done = df[df["meets_budget"] == True]  # noqa: E712 - pandas
    assert len(done) == len(candidates) and done["accuracy"].notna().all()
    assert (df["params"] < sum(p.numel() for p in task.model.parameters())).all()
