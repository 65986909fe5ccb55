"""KD loss against a hand computation; the fine-tune loop's NaN guard and early stop."""

from __future__ import annotations

import math

import pytest
import torch

from autoshrink import Candidate
from autoshrink.compress.distill import StopTrial, finetune, kd_loss


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[1.0, 1.0, 0.0]])
    y = torch.tensor([0])
    T, alpha = 2.0, 0.6
    ps = [math.exp(v / T) for v in s[0].tolist()]
    pt = [math.exp(v / T) for v in t[0].tolist()]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    kl = sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))  # KL(teacher || student)
    logits = s[0].tolist()
    ce = -logits[0] + math.log(sum(math.exp(v) for v in logits))
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert kd_loss(s, t, y, T, alpha).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_extremes():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    ce = torch.nn.functional.cross_entropy(s, y)
    assert kd_loss(s, t, y, 3.0, 0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    assert kd_loss(t, t, y, 3.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_nan_loss_fails_with_a_reason(tiny_task):
    import copy

    student = copy.deepcopy(tiny_task.model)
    cand = Candidate.uniform(bits=32, steps=5, lr=1e30)
    with pytest.raises(FloatingPointError, match="loss became"):
        finetune(student, tiny_task, cand)


def test_report_can_stop_a_fine_tune(tiny_task):
    import copy

    student = copy.deepcopy(tiny_task.model)
    seen = []

    def report(step, acc):
        seen.append((step, acc))
        raise StopTrial("dominated")

    with pytest.raises(StopTrial):
        finetune(student, tiny_task, Candidate.uniform(bits=32, steps=20, batch_size=16),
                 report=report, eval_every=5, eval_limit=64)
    assert seen and seen[0][0] == 5 and 0 <= seen[0][1] <= 100
