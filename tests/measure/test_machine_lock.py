"""MachineLock: readers-writer semantics across processes (trainers share it, a timer owns it).

Each holder runs in its own process. A blocked holder is checked by its ``acquired`` event staying
unset after it announced it is trying; waits on events that must come are hang guards only.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest

from autoshrink.measure.latency import MachineLock

GUARD_S = 60.0  # hang guard: something that must happen, happens long before this
BLOCKED_S = 0.5  # how long a blocked holder is watched not getting the lock


def _hold(folder: str, kind: str, trying, acquired, release) -> None:
    lock = MachineLock(folder)
    trying.set()
    with getattr(lock, kind)():
        acquired.set()
        release.wait(GUARD_S)


class _Holder:
    def __init__(self, ctx, folder: str, kind: str) -> None:
        self.trying, self.acquired, self.release = ctx.Event(), ctx.Event(), ctx.Event()
        self.proc = ctx.Process(target=_hold, args=(folder, kind, self.trying, self.acquired, self.release))
        self.proc.start()
        assert self.trying.wait(GUARD_S), f"{kind} holder did not start"

    def holds(self) -> bool:
        return self.acquired.wait(GUARD_S)

    def blocked(self) -> bool:
        return not self.acquired.wait(BLOCKED_S)

    def done(self) -> None:
        self.release.set()
        self.proc.join(GUARD_S)
        assert self.proc.exitcode == 0


@pytest.fixture
def start(tmp_path):
    ctx = mp.get_context("fork")
    holders: list[_Holder] = []

    def _start(kind: str) -> _Holder:
        h = _Holder(ctx, str(tmp_path), kind)
        holders.append(h)
        return h

    yield _start
    for h in holders:  # never leave a process behind, even when an assertion failed
        h.release.set()
        h.proc.join(GUARD_S)
        if h.proc.is_alive():
            h.proc.kill()


def test_trainers_share_the_lock(start):
    a, b = start("training"), start("training")
    assert a.holds() and b.holds()
    a.done(), b.done()


def test_training_blocks_measuring_until_it_ends(start):
    trainer = start("training")
    assert trainer.holds()
    timer = start("measuring")
    assert timer.blocked()
    trainer.done()
    assert timer.holds()
    timer.done()


def test_measuring_blocks_training_and_other_timers(start):
    timer = start("measuring")
    assert timer.holds()
    trainer, other = start("training"), start("measuring")
    assert trainer.blocked() and other.blocked()
    timer.done()
    # the trainer and the second timer then run one after the other, never together
    first = trainer if trainer.acquired.wait(GUARD_S / 2) else other
    second = other if first is trainer else trainer
    assert first.holds() and second.blocked()
    first.done()
    assert second.holds()
    second.done()


def test_a_waiting_timer_holds_back_new_trainers(start):
    trainer = start("training")
    assert trainer.holds()
    timer = start("measuring")
    assert timer.blocked()
    late = start("training")  # would share with `trainer`, but the timer is queued first
    assert late.blocked()
    trainer.done()
    assert timer.holds() and late.blocked()
    timer.done()
    assert late.holds()
    late.done()
