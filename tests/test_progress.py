"""The one progress bar: label, count with its unit, ETA and the extra fields; silent when off."""

from __future__ import annotations

import io

from rich.console import Console

from autoshrink._progress import Bar


def test_bar_shows_label_count_unit_and_fields():
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False, color_system=None)
    with Bar("training", 3, unit="steps", extra="· loss {task.fields[loss]}", fields={"loss": "-"},
             console=console) as bar:
        bar.advance(loss="0.500")
        bar.advance(2, loss="0.250")
        assert bar.completed == 3
        bar.print("a line above the bar")
    text = out.getvalue()
    assert "training" in text and "3/3 steps · ETA" in text and "loss 0.250" in text
    assert "a line above the bar" in text


def test_a_disabled_bar_does_nothing(capsys):
    with Bar("training", 3, enabled=False) as bar:
        bar.advance(loss="x")
        bar.update(completed=2)
        bar.print("nothing")
        assert bar.completed == 0
    assert capsys.readouterr().out == ""


def test_search_view_prints_each_outcome_and_tracks_the_best(capsys):
    from autoshrink import Budget
    from autoshrink._progress import ProgressView

    view = ProgressView(3, 0)
    budget = Budget(latency_ms=5.0)
    view.finished(0, {"state": "COMPLETE", "accuracy": 90.0, "latency_ms": 2.0, "size_mb": 1.0,
                      "meets_budget": True, "finetune_s": 3.0}, budget)
    view.finished(1, {"state": "FAIL", "error": "boom"}, budget)
    view.finished(2, {"state": "COMPLETE", "latency_ms": 9.0, "size_mb": 1.0, "meets_budget": False},
                  budget, done=2)
    view.close()
    out = capsys.readouterr().out
    assert "trial 0: accuracy 90.00 %" in out and "trial 1 FAILED: boom" in out
    assert "trial 2 misses the budget (latency_ms +80%)" in out and "not counted" in out
    assert view.best == (90.0, 2.0, 0)
