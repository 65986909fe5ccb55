"""OpenVINO deployables opened and closed in any order leave the process able to take a signal.

Each ``openvino.Core``'s CPU plugin swaps in an alternate signal stack of its own and, when
destroyed, puts back the one it found, even if another Core has freed that one meanwhile. With a
Core per deployable, two deployables closed in the order they were opened left the main thread on
an unmapped stack, and the next Python signal handler (a DataLoader worker's SIGCHLD) killed the
process with a segmentation fault: the suite died that way in ``test_imagefolder`` after the
runtime tests. Run in a child process, since the failure is a crash.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

_CHILD = textwrap.dedent("""
    import gc, os, signal, sys
    import numpy as np
    from autoshrink import runtimes

    rt, x = runtimes.get("openvino"), np.zeros((1, 1, 16, 16), np.float32)
    first = rt.load(sys.argv[1]); first.run(x)
    second = rt.load(sys.argv[1]); second.run(x)
    del first; gc.collect()  # closed in the order opened: the crash's order
    del second; gc.collect()
    junk = [bytearray(os.urandom(1 << 16)) for _ in range(64)]  # reuse what was freed
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    os.kill(os.getpid(), signal.SIGUSR1)
    print("handled" if got else "not handled")
""")


def test_deployables_closed_in_the_order_opened_leave_signals_working(tmp_path):
    pytest.importorskip("openvino")
    from autoshrink import Candidate, runtimes
    from autoshrink.compress.quantize import lower, prepare_ptq

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).eval()
    x = torch.randn(1, 1, 16, 16)
    lowered = lower(prepare_ptq(net, Candidate.uniform(bits=8), x, [torch.randn(4, 1, 16, 16)]))
    rt = runtimes.get("openvino")
    rt.save(rt.build(lowered, x), tmp_path)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # -11: the segmentation fault
    assert proc.stdout.strip().splitlines()[-1] == "handled"
