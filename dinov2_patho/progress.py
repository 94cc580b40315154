"""Every progress bar of the project is made here: `progress_bar(...)` takes tqdm's arguments.

On a terminal it is tqdm's bar. In a file (a SLURM log, `nohup`, CI) a redrawn bar is one carriage
return per refresh, thousands of them in one line of the log; there it writes a whole line at the start,
then every LINE_SECONDS or LINE_FRACTION of the total, whichever comes first, and at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

LINE_SECONDS = 30.0
LINE_FRACTION = 0.1


class LogLines(tqdm):
    """tqdm writing whole lines (no carriage return, no cursor movement) for a file that is not a tty."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._line_time, self._line_n = -float("inf"), None
        super().__init__(*args, **kwargs)

    def _due(self) -> bool:
        if self._line_n is None:
            return True
        step = self.total * LINE_FRACTION if self.total else float("inf")
        return time.monotonic() - self._line_time >= LINE_SECONDS or self.n - self._line_n >= step

    def _write_line(self) -> None:
        self._line_time, self._line_n = time.monotonic(), self.n
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is None and self._due():  # msg: tqdm clearing its line, nothing to clear in a log
            self._write_line()
        return False  # tells close() that no line is left to clear with a carriage return

    def clear(self, nolock: bool = False) -> None:
        pass

    def close(self) -> None:
        if not getattr(self, "disable", True) and self.n != self._line_n:
            self._write_line()  # the final count, also for leave=False bars
        self.leave = False  # the line is written: tqdm's close only clears, which display() ignores
        super().close()


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """tqdm's bar on a terminal, LogLines elsewhere; tqdm writes to stderr unless `file` is given."""
    stream = kwargs.get("file") or sys.stderr
    return (tqdm if _is_terminal(stream) else LogLines)(iterable, **kwargs)
