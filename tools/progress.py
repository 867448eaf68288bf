"""Progress lines for the long commands (quickstart, bench): one line per step on stderr,
stamped with the minutes and seconds since the command began, so a user sees where the time
goes and a log shows it afterwards."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """Call it with a message to print ``[mm:ss] message``; the clock starts when it is made.

    ``enabled=False`` prints nothing (``--no-progress`` silences progress bars, not these lines:
    the commands pass ``enabled`` themselves)."""

    def __init__(self, enabled: bool = True, stream: Optional[TextIO] = None):
        self.enabled = enabled
        self.stream = stream
        self.t0 = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        m, sec = divmod(int(self.elapsed_s()), 60)
        print(f"[{m:2d}:{sec:02d}] {msg}", file=self.stream or sys.stderr, flush=True)
