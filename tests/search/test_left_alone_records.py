"""What compression left alone travels from the trial's result to the study, the per-trial record
and report.md (issue 11): the groups left unpruned with their layers and reason, the layers left fp32."""

from __future__ import annotations

import json

import optuna
import pandas as pd

from autoshrink import Budget, SearchSpace
from autoshrink.record import STUDY_DIRECTIONS, State, TrialAttr
from autoshrink.report import write_report_md
from autoshrink.report.markdown import left_alone_section
from autoshrink.search import Driver, DriverConfig
from autoshrink.trial import TrialResult

GROUPS = [{"layers": ["stages.0.branch2.0", "stages.0.branch2.3"],
           "reason": "left unpruned: the group crosses a reshape, and its reshape mapping was switched off"}]
FP32 = {"fc1": "int8 kernel did not compile (qlinear_post_op_fusion); left fp32"}


def test_tell_stores_unpruned_groups_and_fp32_layers(tmp_path):
    space = SearchSpace.default()
    study = optuna.create_study(directions=STUDY_DIRECTIONS)
    driver = Driver(task=None, space=space, study=study, config=DriverConfig(budget=Budget(size_mb=1.0), out=tmp_path))
    trial = study.ask()
    m = TrialResult(state=State.COMPLETE, accuracy=90.0, latency_ms=1.0, size_mb=0.5, mmacs=1.0, meets_budget=True,
                    unpruned_groups=GROUPS, fp32_layers=FP32,
                    skipped_layers={"stages.0.branch2.0": GROUPS[0]["reason"]}).metrics()
    driver.tell(trial, space.sample(trial), m)
    attrs = study.trials[0].user_attrs
    assert attrs[TrialAttr.UNPRUNED_GROUPS] == GROUPS
    assert attrs[TrialAttr.FP32_LAYERS] == FP32
    record = json.loads((tmp_path / "trials" / "0000" / "metrics.json").read_text())
    assert TrialAttr.UNPRUNED_GROUPS in json.dumps(record) and "qlinear_post_op_fusion" in json.dumps(record)


def test_report_names_what_the_chosen_trial_left_alone(tmp_path):
    chosen = pd.Series({"number": 3, "accuracy": 90.0, "latency_ms": 1.0, "size_mb": 0.5})
    left = {TrialAttr.UNPRUNED_GROUPS: GROUPS, TrialAttr.FP32_LAYERS: FP32,
            TrialAttr.SKIPPED_LAYERS: {"stages.0.branch2.0": GROUPS[0]["reason"], "conv5.0": "too few channels"}}
    text = write_report_md(tmp_path / "report.md", teacher={"accuracy": 95.0, "latency_ms": 2.0}, chosen=chosen,
                           front=pd.DataFrame([chosen]), constraints={}, left_alone=left).read_text()
    assert "### Left uncompressed" in text
    assert "stages.0.branch2.0, stages.0.branch2.3" in text and "crosses a reshape" in text
    assert "| fp32 layer | fc1 | int8 kernel did not compile" in text
    assert "| unpruned layer | conv5.0 | too few channels |" in text
    assert text.count("stages.0.branch2.0") == 1  # a grouped layer is not listed again on its own
    assert left_alone_section({TrialAttr.UNPRUNED_GROUPS: [], TrialAttr.FP32_LAYERS: {}}) == []
