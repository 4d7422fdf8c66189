"""Log lines leave through a writer thread, and are dropped (and counted) rather than waited for.

A process's stderr is a pipe to someone: a terminal, journald, a container
runtime's log driver. When that reader stalls, a write to a full pipe
blocks, and logging from the event loop would stall every tenant of the
server behind it -- or, in `netswap nbd`, the swap device that the stalled
reader may itself be waiting on. So records are formatted where they are
logged, queued (bounded), and written by one thread; when the queue is full
a record is dropped and counted, and the writer says how many once it gets
through again. Counted: `dropped()`, exported as netswap_log_lines_dropped_total
(netswap_client_log_lines_dropped_total by `netswap nbd`).

The writer writes to the file descriptor itself, holding no lock of the
logging module: a writer stuck on a full pipe cannot hold up the logging
module's own flush at exit, and the process still ends.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import queue
import sys
import threading

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LIMIT = 4096  # lines waiting for the writer; past it, new ones are dropped
STOP_WAIT = 2.0  # seconds the writer gets at exit to write what is queued

_sinks: list[_Sink] = []


class _Sink(logging.handlers.QueueHandler):
    """Formats each record where it is logged and queues the line; never blocks."""

    def __init__(self, limit: int) -> None:
        self.lines: queue.Queue[bytes | None] = queue.Queue(limit)  # None: the writer stops
        super().__init__(self.lines)
        self.dropped = 0  # written under the handler's lock (Handler.handle)

    def prepare(self, record: logging.LogRecord) -> bytes:
        return (self.format(record) + "\n").encode(errors="backslashreplace")

    def enqueue(self, record: logging.LogRecord | bytes) -> None:
        try:
            self.lines.put_nowait(record)  # type: ignore[arg-type]  # a line, from prepare()
        except queue.Full:
            self.dropped += 1


class _Writer:
    """The thread that writes queued lines to `fd`, and after a line the count dropped since."""

    def __init__(self, sink: _Sink, fd: int) -> None:
        self._sink, self._fd = sink, fd
        self._reported = 0
        self._thread = threading.Thread(target=self._run, name="netswap-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        lines = self._sink.lines
        while (line := lines.get()) is not None:
            self._write(line)
            self._report()

    def _write(self, line: bytes) -> None:
        view = memoryview(line)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except InterruptedError:
                continue
            except OSError:
                return  # nobody to read the log any more: what cannot be written is lost

    def _report(self) -> None:
        dropped = self._sink.dropped
        if dropped != self._reported:
            lost, self._reported = dropped - self._reported, dropped
            self._write(f"netswap: {lost} log lines dropped: the reader of this log was too slow\n".encode())

    def finish(self) -> None:
        """Stop once what is queued is written, waiting at most STOP_WAIT seconds for room in
        the queue and as long again for the writer: a reader that never comes back must not
        keep the process from exiting."""
        try:
            self._sink.lines.put(None, timeout=STOP_WAIT)
        except queue.Full:
            return
        self._thread.join(STOP_WAIT)
        if not self._thread.is_alive():
            self._report()


def install(level: int | str, fmt: str = FORMAT, limit: int = LIMIT) -> None:
    """Send the root logger's records to stderr through a writer thread (replacing its handlers)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture): as logging does
        logging.basicConfig(level=level, format=fmt, force=True)
        return
    sys.stderr.flush()  # what was printed before goes first
    sink = _Sink(limit)
    sink.setFormatter(logging.Formatter(fmt))
    writer = _Writer(sink, fd)
    root = logging.getLogger()
    root.handlers[:] = [sink]
    root.setLevel(level)
    _sinks.append(sink)
    atexit.register(writer.finish)


def dropped() -> int:
    """Log records dropped so far because the writer was behind."""
    return sum(sink.dropped for sink in _sinks)
