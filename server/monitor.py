"""Watching the event loop: how long it is kept from running what is due, and the periodic chores."""

from __future__ import annotations

import asyncio
import time

from netswap.common import loopmetrics

INTERVAL = 0.01  # seconds between samples


class LoopMonitor:
    """Samples the loop's lag: how late a timer due every INTERVAL actually runs. Anything
    that holds the loop (or the GIL) shows up here as the time it held it."""

    def __init__(self, histogram: loopmetrics.Histogram) -> None:
        self._lag = histogram.labels()
        self.max_lag = 0.0

    async def run(self) -> None:
        while True:
            due = time.monotonic() + INTERVAL
            await asyncio.sleep(INTERVAL)
            lag = max(0.0, time.monotonic() - due)
            self._lag.observe(lag)
            self.max_lag = max(self.max_lag, lag)
