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
