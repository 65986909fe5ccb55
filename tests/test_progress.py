"""The one progress bar: label, count with its unit, ETA and the extra fields; silent when off."""

from __future__ import annotations

import io

from rich.console import Console

from autoshrink._progress import Bar


def test_bar_shows_label_count_unit_and_fields():
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False, color_system=None)
    with Bar("training", 3, unit="steps", extra="· loss {task.fields[loss]}", fields={"loss": "-"},
             console=console, plain=False) as bar:
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


def test_without_a_terminal_a_plain_line_comes_at_least_every_30_s():
    """``autoshrink search ... > log``: rich's live bar writes nothing to a file until it stops;
    plain lines do, on a fake clock here."""
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False, color_system=None)
    now = [0.0]
    bar = Bar("teacher training", 100, unit="steps", extra="· loss {task.fields[loss]}", fields={"loss": "-"},
              console=console, clock=lambda: now[0])
    assert bar.plain is not None  # chosen from the console: not a terminal
    assert out.getvalue().splitlines() == ["teacher training: 0/100 steps · 0:00:00 elapsed · loss -"]
    for step in range(1, 61):  # one step a second for a minute
        now[0] = float(step)
        bar.advance(loss=f"{1 / step:.3f}")
    now[0] = 95.0
    bar.tick()  # nothing advanced for 35 s: still a line
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[1:] == [
        "teacher training: 30/100 steps · 0:00:30 elapsed · loss 0.033",
        "teacher training: 60/100 steps · 0:01:00 elapsed · loss 0.017",
        "teacher training: 60/100 steps · 0:01:35 elapsed · loss 0.017",
        "teacher training: 60/100 steps · 0:01:35 elapsed · loss 0.017",  # the last one, at close
    ]


def test_the_search_view_ticks_without_a_terminal(capsys):
    from autoshrink._progress import ProgressView

    view = ProgressView(3, 0)  # pytest's stdout is not a terminal
    assert view.bar is not None and view.bar.plain is not None
    view.bar.plain.clock = lambda: view.bar.plain.start + 31.0
    view.tick()
    view.close()
    out = capsys.readouterr().out
    assert "search: 0/3 trials · 0:00:31 elapsed · best feasible: none yet" in out
