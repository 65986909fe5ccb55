"""A torchao patch whose target moved is not silently skipped: warned once and recorded."""

from __future__ import annotations

import importlib
import warnings

import pytest

from autoshrink.compress import quantize


@pytest.mark.parametrize("patch, module, attr", [
    ("_skip_empty_qspec_updates", "qat_utils", "_update_conv_input_qspec_map_after_replacement"),
    ("_skip_absent_conv_kinds", "qat_utils", "_fold_conv_bn_qat_helper"),
    ("_memoize_pattern_exports", "utils", "_get_aten_graph_module_for_pattern"),
])
def test_a_moved_torchao_function_is_warned_once_and_recorded(monkeypatch, patch, module, attr):
    mod = importlib.import_module(f"torchao.quantization.pt2e.{module}")
    monkeypatch.delattr(mod, attr)  # as if torchao had renamed it
    monkeypatch.setattr(quantize, "_PATCH_WARNINGS", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        getattr(quantize, patch)()
        getattr(quantize, patch)()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert attr in messages[0] and "patch is not installed" in messages[0]
    assert quantize.patch_warnings() == messages


def test_the_pinned_torchao_takes_every_patch():
    quantize.prepare_ptq  # noqa: B018  (the module is loaded; the patches install on first use)
    quantize._patch_torchao()
    assert quantize.patch_warnings() == []
