"""The central node's time: when it reads the clock and how it waits for its sockets.

Deadlines, keep-alives, late workers and fault ages are all read from one clock, and every wait
for a message is one poll with a timeout. :class:`SystemClock` is ``time.monotonic`` and a real
poll. :class:`ManualClock` is simulated time, for driving a :class:`~coformer.runtime.central.CentralNode`
turn by turn in a test (issue 39): a poll never blocks, and one that finds nothing moves the clock
on by its timeout, as if that long had passed in silence. A deadline test is then exact and runs
in no time, on a machine however busy: no sleep, no wall-clock window.

Timings reported to clients (``timing_ms``) are measured with ``time.perf_counter`` whatever the
clock: they are what a request cost, not when it must end.
"""

from __future__ import annotations

import time

import zmq


class SystemClock:
    """Wall time: ``time.monotonic()``, and a poll that waits."""

    def now(self) -> float:
        return time.monotonic()

    def poll(self, poller: zmq.Poller, timeout_ms: int) -> dict:
        return dict(poller.poll(timeout_ms))


class ManualClock:
    """Simulated time that moves only when told (:meth:`advance`) or when a poll finds nothing.

    ``poll(poller, timeout_ms)`` looks once, without blocking: what is waiting is returned at
    once and the clock stays; with nothing waiting the clock moves on by ``timeout_ms`` (a
    negative or zero timeout moves nothing). Its sockets must be ``inproc://`` ones fed from the
    test's own thread, so that what was sent is waiting by the time of the poll.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock does not go back: advance({seconds!r})")
        self.t += seconds

    def poll(self, poller: zmq.Poller, timeout_ms: int) -> dict:
        events = dict(poller.poll(0))
        if not events and timeout_ms is not None and timeout_ms > 0:
            self.t += timeout_ms / 1e3
        return events
