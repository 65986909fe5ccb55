"""`import autoshrink` stays light: no ray, optuna, plotting, compiler or pruning library, no model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

HEAVY = [
    "ray", "optuna", "matplotlib", "plotly", "rich", "sklearn", "fvcore", "torchao", "torch_pruning",
    "onnx", "torch._dynamo", "torch._inductor", "autoshrink.models", "autoshrink.tasks",
]


def test_import_autoshrink_is_light():
    code = textwrap.dedent(f"""
        import json, sys
        import torch.nn as nn
        built = []
        init = nn.Module.__init__
        def counting(self, *a, **k):
            built.append(type(self).__name__)
            init(self, *a, **k)
        nn.Module.__init__ = counting
        import autoshrink
        print(json.dumps({{"loaded": [m for m in {HEAVY!r} if m in sys.modules], "built": built}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["loaded"] == [], f"import autoshrink loads {found['loaded']}"
    assert found["built"] == [], f"import autoshrink builds modules {found['built']}"
