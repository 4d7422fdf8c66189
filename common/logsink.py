"""Log lines leave through a writer thread, and are dropped (and counted) rather than waited for.

A process's stderr is a pipe to someone: a terminal, journald, a container
runtime's log driver. When that reader stalls, a write to a full pipe
blocks, and logging from the event loop would stall every tenant of the
server behind it -- or, in `netswap nbd`, the swap device that the stalled
reader may itself be waiting on. So records are formatted where they are
logged, queued (bounded), and written by one thread; when the queue is full
a record is dropped and counted, and the writer says how many once it gets
through again. Counted: `dropped()`, exported by the server as
netswap_log_lines_dropped_total.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LIMIT = 4096  # records waiting for the writer; past it, new ones are dropped
STOP_WAIT = 2.0  # seconds the writer gets at exit to write what is queued

_sinks: list[_Sink] = []


class _Sink(logging.handlers.QueueHandler):
    """Formats each record where it is logged and queues it; never blocks."""

    def __init__(self, limit: int) -> None:
        super().__init__(queue.Queue(limit))
        self.dropped = 0  # only the logging thread writes it (under the handler's lock)

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Writer(logging.handlers.QueueListener):
    """Writes queued records; after a record, reports lines dropped since the last report."""

    def __init__(self, sink: _Sink, out: logging.Handler) -> None:
        super().__init__(sink.queue, out)
        self._sink = sink
        self._reported = 0

    def handle(self, record: logging.LogRecord) -> None:
        super().handle(record)
        self.report_dropped()

    def report_dropped(self) -> None:
        dropped = self._sink.dropped
        if dropped != self._reported:
            lost, self._reported = dropped - self._reported, dropped
            note = f"netswap: {lost} log lines dropped: the reader of this log was too slow"
            super().handle(logging.makeLogRecord({"msg": note, "levelno": logging.WARNING}))

    def finish(self) -> None:
        """Stop the writer once it has written what is queued, waiting at most STOP_WAIT
        seconds: a reader that never comes back must not keep the process from exiting
        (the writer's thread is a daemon)."""
        try:
            self.queue.put(self._sentinel, timeout=STOP_WAIT)  # type: ignore[attr-defined]
        except queue.Full:
            return
        thread = self._thread  # type: ignore[has-type]
        if thread is not None:
            thread.join(STOP_WAIT)
            if not thread.is_alive():
                self.report_dropped()


def install(level: int | str, fmt: str = FORMAT, limit: int = LIMIT) -> None:
    """Send the root logger's records to stderr through a writer thread (replacing its handlers)."""
    sink = _Sink(limit)
    sink.setFormatter(logging.Formatter(fmt))
    out = logging.StreamHandler()  # sys.stderr
    out.setFormatter(logging.Formatter("%(message)s"))  # formatted already, by the sink
    writer = _Writer(sink, out)
    writer.start()
    root = logging.getLogger()
    root.handlers[:] = [sink]
    root.setLevel(level)
    _sinks.append(sink)
    atexit.register(writer.finish)


def dropped() -> int:
    """Log records dropped so far because the writer was behind."""
    return sum(sink.dropped for sink in _sinks)
