"""Progress lines of long work (nca_kit.progress): silent for short work, a count and an estimate for long work."""

from __future__ import annotations

import io

import pytest

from nca_kit.progress import Lines, duration, progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_short_work_prints_nothing():
    stream, clock = io.StringIO(), Clock()
    for _ in Lines(range(5), desc="embedding", stream=stream, clock=clock):
        clock.now += 1.0
    assert stream.getvalue() == ""


def test_long_work_prints_a_count_and_an_estimate_then_a_final_line():
    stream, clock = io.StringIO(), Clock()
    for _ in Lines(range(100), desc="FLR", stream=stream, clock=clock, after=10, every=30):
        clock.now += 1.0  # 1 s an item: 100 s
    lines = stream.getvalue().splitlines()
    assert lines[0] == "FLR: 10/100 (10 %) after 10 s, about 1 min 30 s left"
    assert lines[1] == "FLR: 40/100 (40 %) after 40 s, about 1 min 00 s left"
    assert lines[-1] == "FLR: 100/100 done in 1 min 40 s"
    assert len(lines) == 5  # 10, 40, 70, 100 s and the end


def test_lines_are_off_when_asked(monkeypatch):
    monkeypatch.setenv("NCA_KIT_PROGRESS", "0")
    stream, clock = io.StringIO(), Clock()
    with Lines(total=10, desc="sampling", stream=stream, clock=clock) as lines:
        for _ in range(10):
            clock.now += 60
            lines.update()
    assert stream.getvalue() == ""


def test_a_bar_when_asked_for_one():
    from tqdm.auto import tqdm

    assert isinstance(progress(range(3), bar=True, disable=True), tqdm)
    assert isinstance(progress(range(3), desc="x", unit="batch"), Lines)


@pytest.mark.parametrize("seconds, text", [(4.4, "4 s"), (125, "2 min 05 s"), (3780, "1 h 03 min")])
def test_duration(seconds, text):
    assert duration(seconds) == text
