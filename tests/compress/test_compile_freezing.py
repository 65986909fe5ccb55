"""compile_cpu freezes the compiled graph without switching Inductor's freezing on for the process."""

from __future__ import annotations

import torch
import torch._inductor.config as inductor_config
import torch.nn as nn
from torch._inductor.utils import run_and_get_code

from autoshrink.compress.quantize import compile_cpu


def test_freezing_holds_for_the_compiled_call_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 1, 8, 8)
    assert inductor_config.freezing is False
    fast = compile_cpu(model)
    assert inductor_config.freezing is False  # building it changes nothing global
    with torch.no_grad():
        out, code = run_and_get_code(fast, x)
        expected = model(x)
    assert inductor_config.freezing is False
    # a frozen graph holds the weights as constants instead of taking them as inputs
    assert "_frozen_param" in "".join(code)
    torch.testing.assert_close(out, expected)


def test_a_trial_compiles_the_model_it_times_once():
    """The budget gate compiles the int8 model once: its compile check runs in the timer's grad mode
    (inference) and thread count, both Dynamo guards. A first call under no_grad, or with the
    process's threads instead of the timing's, made the timer's first call compile it all again."""
    from torch._dynamo.utils import counters

    from autoshrink import Budget, Candidate, Task
    from autoshrink.measure.latency import MachineLock
    from autoshrink.trial import TrialContext, evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 10)).eval()
    x = torch.randn(16, 1, 8, 8)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 10, (16,)))
    task = Task(model=model, train_data=data, val_data=data, example_input=x[:1], name="t")
    torch._dynamo.reset()
    counters.clear()
    old = torch.get_num_threads()
    try:  # fine-tuning threads (2) differ from the timing's (1)
        r = evaluate(task, Candidate.uniform(bits=8), Budget(latency_ms=1e-9),
                     TrialContext(lock=MachineLock(), latency_runs=3, threads=2, latency_threads=1))
    finally:
        torch.set_num_threads(old)
    assert r.latency_ms is not None and r.latency_ms > 0
    # one frame compiled once (a recompile is a second frame compilation)
    assert counters["frames"]["total"] == 1 and counters["aot_autograd"]["total"] == 1, dict(counters["frames"])
