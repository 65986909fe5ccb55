"""torchao's rewrite patterns, cached on disk: a loaded pattern lowers exactly what a fresh export
lowers, the key follows what the pattern computes (not where it sits in memory), and a broken
file or folder only costs the saving."""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
import textwrap

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchao.quantization.pt2e.export_utils import WrapperModule  # how torchao hands patterns over

from autoshrink import Candidate
from autoshrink.compress import compress, quantize
from autoshrink.compress._patterns import PatternCache, disk_key

_MODULES = ("utils", "qat_utils", "export_utils", "reference_representation_rewrite")


def _torchao_original():
    quantize._patch_torchao()
    installed = importlib.import_module("torchao.quantization.pt2e.utils")._get_aten_graph_module_for_pattern
    return installed.original if isinstance(installed, PatternCache) else installed


def _use(monkeypatch, cache):
    for name in _MODULES:
        mod = importlib.import_module(f"torchao.quantization.pt2e.{name}")
        if hasattr(mod, "_get_aten_graph_module_for_pattern"):
            monkeypatch.setattr(mod, "_get_aten_graph_module_for_pattern", cache)


class _Net(nn.Module):
    """conv-BN pairs (QAT fusion and its folding at convert), a dropout and a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.drop, self.fc = nn.Dropout(0.1), nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def _lowered(model, x):
    cand = Candidate(bits={"conv2": 4}, default_bits=8, prune={"conv1": 0.25})
    student = compress(copy.deepcopy(model), cand, x).trainable(x)
    return quantize.lower(student)


def _nodes(gm):
    return [(n.op, n.name, str(n.target), [str(a) for a in n.args],
             list((n.meta.get("nn_module_stack") or {}).values())) for n in gm.graph.nodes]


def test_a_model_lowered_from_cached_patterns_is_the_model_lowered_from_fresh_exports(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(1, 1, 8, 8)
    batch = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    original = _torchao_original()

    cold = PatternCache(original, folder=tmp_path)  # an empty folder: every pattern exported, then saved
    _use(monkeypatch, cold)
    fresh = _lowered(model, x)
    assert cold.exports > 10 and cold.loads == 0
    assert len(list(tmp_path.glob("*.pt2"))) == cold.exports

    warm = PatternCache(original, folder=tmp_path)  # a new process' memory: every pattern from disk
    _use(monkeypatch, warm)
    loaded = _lowered(model, x)
    assert warm.exports == 0 and warm.loads == cold.exports

    assert loaded.code == fresh.code
    assert _nodes(loaded) == _nodes(fresh)
    with torch.no_grad():
        assert torch.equal(loaded(batch), fresh(batch))


def _pattern(scale: bool):
    def pattern(x, w):
        y = F.linear(x, w)
        return y * 2 if scale else y

    return pattern


_INPUTS = (torch.randn(2, 3), torch.randn(4, 3))


def test_the_key_follows_the_code_the_closure_and_the_shapes():
    assert disk_key(_pattern(True), _INPUTS, False, {}) == disk_key(_pattern(True), _INPUTS, False, {})
    assert disk_key(_pattern(True), _INPUTS, False, {}) != disk_key(_pattern(False), _INPUTS, False, {})
    assert disk_key(_pattern(True), _INPUTS, False, {}) != disk_key(_pattern(True), (torch.randn(5, 3), _INPUTS[1]),
                                                                    False, {})
    assert disk_key(_pattern(True), _INPUTS, False, {}) != disk_key(_pattern(True), _INPUTS, True, {})
    # a conv function captured by its qualified name (torchao's conv-BN patterns capture F.conv2d)
    conv = disk_key(lambda x, w, fn=F.conv2d: fn(x, w), _INPUTS, False, {})
    assert conv is not None and conv != disk_key(lambda x, w, fn=F.conv1d: fn(x, w), _INPUTS, False, {})


def test_a_closure_without_a_stable_name_stays_in_memory(tmp_path):
    inner = lambda y: y + 1  # noqa: E731 - a lambda's name says nothing about what it computes

    def pattern(x, w):
        return inner(F.linear(x, w))

    assert disk_key(pattern, _INPUTS, False, {}) is None
    cache = PatternCache(_torchao_original(), folder=tmp_path)
    first = cache(WrapperModule(pattern), _INPUTS)
    second = cache(WrapperModule(pattern), _INPUTS)
    assert cache.exports == 1 and first is not second and first.code == second.code
    assert not list(tmp_path.iterdir())


def test_a_torn_file_is_exported_again_and_rewritten(tmp_path):
    original = _torchao_original()
    path = tmp_path / disk_key(_pattern(True), _INPUTS, False, {})
    path.write_bytes(b"not a pt2 archive")
    cache = PatternCache(original, folder=tmp_path)
    gm = cache(WrapperModule(_pattern(True)), _INPUTS)
    assert cache.exports == 1 and cache.loads == 0
    again = PatternCache(original, folder=tmp_path)
    assert again(WrapperModule(_pattern(True)), _INPUTS).code == gm.code and again.loads == 1


def test_a_folder_that_cannot_be_written_only_costs_the_saving(tmp_path):
    (tmp_path / "taken").write_text("a file where the cache folder would be")
    cache = PatternCache(_torchao_original(), folder=tmp_path / "taken" / "patterns")
    assert cache(WrapperModule(_pattern(True)), _INPUTS).code
    assert cache.exports == 1 and cache.loads == 0


def test_the_key_is_the_same_in_another_process(tmp_path):
    # a string set's order follows the per-process string hash: the key must not
    (tmp_path / "pat.py").write_text(textwrap.dedent("""
        import torch.nn.functional as F

        def pattern(x, w):
            y = F.linear(x, w)
            return y if y.dim() in {"a", "b", "c"} else y * 2
    """))
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import pat; "
              "from autoshrink.compress._patterns import disk_key; "
              "print(disk_key(pat.pattern, (torch.randn(2, 3), torch.randn(4, 3)), False, {}))")
    keys = set()
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True, timeout=120)
        keys.add(out.stdout.strip().splitlines()[-1])
    assert len(keys) == 1 and next(iter(keys)).startswith("pattern-")
