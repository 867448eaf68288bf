"""Progress lines for the long commands (quickstart, bench): one line per step on stderr,
stamped with the minutes and seconds since the command began, so a user sees where the time
goes and a log shows it afterwards."""

from __future__ import annotations

import sys
import time
from typing import Optional, Union


class Progress:
    """Call it with a message to print ``[mm:ss] message`` on stderr; the clock starts when it
    is made. ``--no-progress`` silences progress bars, not these lines."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @staticmethod
    def of(progress: Union[bool, "Progress"]) -> Optional["Progress"]:
        """What to print progress lines with: ``progress`` itself when it is one (a caller's
        clock, so one command's lines share it), a new one for ``True``, none for ``False``."""
        if isinstance(progress, Progress):
            return progress
        return Progress() if progress else None

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, msg: str) -> None:
        m, sec = divmod(int(self.elapsed_s()), 60)
        print(f"[{m:2d}:{sec:02d}] {msg}", file=sys.stderr, flush=True)
