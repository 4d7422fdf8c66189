"""The client's end of PageStream: page traffic as messages on one long-lived call.

Requests are written in the order callers arrive and the server answers in
order, so a FIFO of futures pairs replies with requests. Whoever finds
nobody reading reads -- a caller, for itself and those before it, so that a
lone request gets its reply without a hand-off between tasks (one turn of
the event loop, a good part of a round trip); when it has its own and others
still wait, a task takes over until nobody does. Any number of requests may
be in flight (callers bound that: the NBD device by max_rpcs, Area by
`parallel`).

When the stream breaks -- the server restarted, the network dropped, the
stream ended with a status (e.g. UNAUTHENTICATED after a revocation), or a
request took longer than the timeout -- every request in flight fails: with
ConnectionLost, which callers may retry, or the error of that status. The
next request opens a new stream. Abandoning is the only safe answer to a
late reply or a request cancelled mid-write: replies come in order, so one
given up on would be taken for the next. A request cancelled while it
reads for others ends the stream too (gRPC cancels a call whose read is cut
short); one cancelled while merely waiting just drops out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import grpc

from netswap.client.errors import (
    ConnectionLost,
    NetswapError,
    ServerError,
    error_from_rpc,
    error_from_status,
)
from netswap.common.pagewire import split_page_reply
from netswap.common.samepages import SamePages

METHOD = "/netswap.v1.SwapService/PageStream"
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs


class _Stream:
    def __init__(self, call: Any) -> None:
        self.call = call
        self.waiting: deque[asyncio.Future[bytes]] = deque()
        self.writing = False  # a caller holds the write (see PageStream.request)
        self.write_queue: deque[asyncio.Future[None]] = deque()  # callers waiting for it, in order
        self.broken: NetswapError | None = None
        self.reading = False  # someone is reading replies (set before it starts, so never two)
        self.reader: asyncio.Task[None] | None = None  # the task that reads when no caller does
        # Every request on this stream not yet over -> its deadline (loop time),
        # in arrival order; and the one timer that watches them (see _watch).
        self.deadlines: dict[asyncio.Future[bytes], float] = {}
        self.watchdog: asyncio.TimerHandle | None = None
        # When it fires, exactly as armed (loop time): uvloop's TimerHandle.when() is
        # rounded to the millisecond, and comparing against it could re-arm needlessly.
        self.watch_at = 0.0
        self.writer: asyncio.Task[Any] | None = None  # the task in call.write(), if any
        self.writer_cut = False  # _break cancelled it


class PageStream:
    def __init__(
        self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], timeout: float
    ) -> None:
        # Raw bytes both ways: messages are built and parsed by pagewire.
        self._open_call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
        self._metadata = metadata
        self.timeout = timeout
        self._stream: _Stream | None = None
        self._closed = False

    async def request(self, raw: bytes) -> tuple[memoryview, SamePages | None]:
        """Send one serialized PageRequest; return its reply's pages (empty unless SwapIn) and
        the same-filled pages they leave out.

        Raises the NetswapError of a failed request, or of the stream breaking
        before its reply came (ConnectionLost, mostly).
        """
        # Every request of the client passes here: the common path stays in
        # this frame; waiting for the write and failures take calls aside.
        if self._closed:
            raise ConnectionLost("the client is closed")
        stream = self._current()
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[bytes] = loop.create_future()
        task = asyncio.current_task()
        # Cancellations of this task already pending (and swallowed) before
        # this request: only more than these mean *it* is being cancelled.
        base = task.cancelling() if task is not None else 0
        # The whole request -- waiting for the write, a write held up by flow
        # control or by a connection still being made, the reply -- is
        # bounded by the stream's watchdog, which breaks the stream once any
        # request is late, and that ends every wait here.
        stream.deadlines[reply] = deadline = loop.time() + self.timeout
        if stream.broken is None and (stream.watchdog is None or deadline < stream.watch_at):
            self._arm(stream, deadline)  # the first request, or the timeout was lowered
        try:
            # One write at a time, and the FIFO in write order: a flag when
            # nobody else writes, a queue when someone does.
            if stream.writing:
                await self._queue_to_write(stream)
            else:
                stream.writing = True
            try:
                if stream.broken is not None:
                    raise _fresh(stream.broken)
                stream.waiting.append(reply)
                stream.writer = task
                try:
                    await stream.call.write(raw)
                except BaseException as e:
                    if self._write_failed(stream, e, base, task):
                        raise
                finally:
                    stream.writer = None
            finally:
                self._next_writer(stream)
            if not stream.reading:
                stream.reading = True
                await self._read(stream, base, until=reply)
            # A caller cancelled here cancels `reply`; the reader skips it.
            # (One cancelled while reading, above, ends the stream: gRPC
            # cancels the call when a read is cut short.)
            raw_reply = await reply
        finally:
            del stream.deadlines[reply]
        return _pages_of(raw_reply)

    async def _queue_to_write(self, stream: _Stream) -> None:
        """Wait for our turn to write (someone is writing): first come, first served."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stream.write_queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            # A turn cancelled while queued stays queued: _next_writer skips
            # it (and may have popped it already, in this very loop turn).
            if turn.done() and not turn.cancelled():
                self._next_writer(stream)  # the turn came with the cancellation: pass it on
            raise

    def _next_writer(self, stream: _Stream) -> None:
        """The write is done: hand it to the next caller queued for it, if any."""
        queue = stream.write_queue
        while queue:
            turn = queue.popleft()
            if not turn.done():
                turn.set_result(None)  # stream.writing stays set: it is theirs now
                return
        stream.writing = False

    def _write_failed(
        self, stream: _Stream, error: BaseException, base: int, writer: asyncio.Task[Any] | None
    ) -> bool:
        """Break the stream for a write that failed; True if the caller must re-raise
        (it was cancelled itself, or `error` is no failure of the write)."""
        if isinstance(error, grpc.aio.AioRpcError):  # the call ended, with a status worth passing on
            self._break(stream, _stream_error(error))
        elif isinstance(error, asyncio.CancelledError):
            if stream.writer_cut and writer is not None:
                writer.uncancel()  # _break's cancellation, not the caller's: see there
            if _cancelling() > base:
                # This caller was cancelled mid-write (e.g. its own timeout), and
                # gRPC then cancels the call itself: whether the request
                # left is unknown.
                self._break(
                    stream,
                    ConnectionLost("a request on the page stream was cancelled or timed out mid-write"),
                )
                return True
            # gRPC reports a write on a call we cancelled (_break) as a
            # cancellation; for this caller it is the stream breaking.
            self._break(stream, ConnectionLost("the page stream was abandoned"))
        elif isinstance(error, Exception):  # e.g. a call that is already over
            self._break(stream, ConnectionLost(f"the page stream broke while sending: {error}"))
        else:  # KeyboardInterrupt and the like: whether the request left is unknown
            self._break(stream, ConnectionLost(f"the page stream was interrupted while sending: {error!r}"))
            return True
        return False

    def _current(self) -> _Stream:
        stream = self._stream
        if stream is None or stream.broken is not None:
            stream = _Stream(self._open_call(None, metadata=self._metadata))
            self._stream = stream
        return stream

    async def _read(self, stream: _Stream, base: int, until: asyncio.Future[bytes] | None = None) -> None:
        """Hand out replies in order: until `until` has its own (a caller reading for itself),
        else until nobody waits (the reader task). The caller sets stream.reading first."""
        try:
            while stream.broken is None and (not until.done() if until is not None else stream.waiting):
                raw = await stream.call.read()
                if raw is _EOF:
                    self._break(stream, ConnectionLost("the server ended the page stream"))
                elif not stream.waiting:
                    self._break(stream, ConnectionLost("a reply on the page stream that nobody asked for"))
                else:
                    waiter = stream.waiting.popleft()
                    if not waiter.done():
                        waiter.set_result(raw)
        except grpc.aio.AioRpcError as e:
            self._break(stream, _stream_error(e))
        except asyncio.CancelledError:
            # gRPC cancels the call when a read is cut short: nothing more comes.
            if _cancelling() > base:  # this reader itself was cancelled (close(), the caller's own timeout)
                self._break(
                    stream, ConnectionLost("a request reading the page stream was cancelled or timed out")
                )
                raise
            self._break(stream, ConnectionLost("the page stream was abandoned"))
        except Exception as e:  # never leave requests waiting on a reader that died
            self._break(stream, ConnectionLost(f"the page stream failed: {e}"))
        finally:
            stream.reading = False
        if stream.waiting and stream.broken is None:
            # Others still wait, and nobody reads for them now.
            stream.reading = True
            stream.reader = asyncio.ensure_future(self._read(stream, 0))

    def _watch(self, stream: _Stream) -> None:
        """The watchdog's timer: break the stream if a request on it is past its deadline,
        else come back at the earliest deadline still pending.

        One timer per stream, re-armed about once per timeout while requests
        keep coming, rather than one per request: arming and disarming a timer
        is a noticeable share of a round trip.
        """
        stream.watchdog = None
        if stream.broken is not None or not stream.deadlines:
            return
        earliest = min(stream.deadlines.values())  # in arrival order unless the timeout changed
        if earliest <= asyncio.get_running_loop().time():
            self._break(stream, ConnectionLost(f"no reply on the page stream within {self.timeout:g}s"))
        else:
            self._arm(stream, earliest)

    def _arm(self, stream: _Stream, deadline: float) -> None:
        if stream.watchdog is not None:
            stream.watchdog.cancel()
        stream.watch_at = deadline
        stream.watchdog = asyncio.get_running_loop().call_at(deadline, self._watch, stream)

    def _break(self, stream: _Stream, error: NetswapError) -> None:
        """Fail every request waiting on `stream` and retire it (the next request opens a new one)."""
        if stream.broken is None:
            stream.broken = error
            stream.call.cancel()
            if stream.watchdog is not None:
                stream.watchdog.cancel()
                stream.watchdog = None
            # Cancelling the call does not end a write that waits for the
            # connection or for flow control (a stopped server): the writer
            # is cancelled itself, and _write_failed takes that back
            # (uncancel) as the stream breaking. Others wait for their turn
            # to write or for a reply, and hear from the writer handing the
            # write on or from the failures below.
            writer = stream.writer
            if writer is not None and writer is not asyncio.current_task():
                stream.writer_cut = True
                writer.cancel()
        while stream.waiting:
            waiter = stream.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(_fresh(stream.broken))
                waiter.exception()  # retrieved: a caller that gave up must not leave it unobserved

    async def close(self) -> None:
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is not None:
            self._break(stream, ConnectionLost("the client is closing"))
            if stream.reader is not None:
                stream.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stream.reader


# Statuses a stream can end with that retrying will not cure. Any other end
# of the stream -- UNAVAILABLE, CANCELLED, or gRPC core's own "Internal error
# from Core" when the connection drops mid-operation -- only broke the
# transport: its requests may succeed on a new stream. (A request the server
# failed comes back in-band, with its own status.)
# (RESOURCE_EXHAUSTED is not among them: for a whole stream it is the
# server's limit on a principal's open streams, which a retry later may pass.)
_FINAL = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
}


def _pages_of(raw_reply: bytes) -> tuple[memoryview, SamePages | None]:
    """A PageReply's pages and same-filled pages; or the error it carries, raised."""
    if not raw_reply:  # an empty PageReply: SwapOut's or Discard's that succeeded
        return _NO_PAGES, None
    try:
        code, message, pages, same = split_page_reply(raw_reply)
    except ValueError as e:
        raise ServerError(f"malformed reply on the page stream: {e}") from None
    if code:
        raise error_from_status(_STATUS.get(code, grpc.StatusCode.UNKNOWN), message)
    return pages, same


def _stream_error(e: grpc.aio.AioRpcError) -> NetswapError:
    if e.code() in _FINAL:
        return error_from_rpc(e)
    return ConnectionLost(f"the page stream broke: {e.details() or ''} ({e.code().name})")


def _cancelling() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def _fresh(error: NetswapError) -> NetswapError:
    """A new exception like `error`: one instance raised in many tasks would collect all their
    tracebacks (and keep their frames, buffers included, alive)."""
    copy = type(error)(str(error))
    copy.code = error.code
    return copy


_NO_PAGES = memoryview(b"")

# gRPC status code numbers (PageReply.code) -> grpc.StatusCode, whose value is (number, name).
_STATUS = {code.value[0]: code for code in grpc.StatusCode}
