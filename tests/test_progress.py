"""progress_bar: tqdm's bar on a terminal, whole lines every 30 s or 10 % in a file."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tqdm import tqdm

from dinov2_patho import progress
from dinov2_patho.progress import LINE_FRACTION, LINE_SECONDS, LogLines, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_terminal_gets_the_bar_a_file_gets_lines():
    terminal, log = Terminal(), io.StringIO()
    with progress_bar(total=3, file=terminal) as bar:
        assert type(bar) is tqdm
        bar.update(3)
    assert "\r" in terminal.getvalue()
    with progress_bar(total=3, file=log, desc="x", leave=False) as bar:
        assert isinstance(bar, LogLines)
        bar.update(3)
    assert "\r" not in log.getvalue() and log.getvalue().splitlines()[-1].startswith("x: 100%")


STEPS = st.lists(st.tuples(st.integers(1, 500), st.floats(0, 40)), max_size=60)  # (count, seconds)


@settings(max_examples=40, deadline=None)
@given(total=st.integers(1, 10_000) | st.none(), steps=STEPS, leave=st.booleans())
def test_lines_come_every_30_s_or_10_percent_and_at_the_end(total, steps, leave):
    clock = Clock()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(progress.time, "monotonic", clock)
        check_lines(clock, total, steps, leave)


def check_lines(clock: Clock, total: int | None, steps: list[tuple[int, float]], leave: bool) -> None:
    log = io.StringIO()
    bar = progress_bar(total=total, file=log, mininterval=0, miniters=1, leave=leave)
    stamps = [(0.0, 0)]  # (time, count) of every line written, from the first one
    for n, dt in steps:
        clock.now += dt
        before = log.getvalue().count("\n")
        bar.update(n)
        if log.getvalue().count("\n") > before:
            stamps.append((clock.now, bar.n))
        else:  # no line: neither 30 s nor 10 % since the last one
            assert clock.now - stamps[-1][0] < LINE_SECONDS
            assert total is None or bar.n - stamps[-1][1] < total * LINE_FRACTION
    count = bar.n
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text and text.endswith("\n")
    assert len(text.splitlines()) >= len(stamps)
    last = text.splitlines()[-1]
    assert (f"{count}/{total}" if total and count <= total else f"{count}it") in last  # past total: no total
