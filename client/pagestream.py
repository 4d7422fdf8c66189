"""The client's end of PageStream: page traffic as messages on one long-lived call.

Requests are written in the order callers arrive and the server answers in
order, so a FIFO of futures pairs replies with requests; one reader task
per stream resolves them. Any number of requests may be in flight (callers
bound that: the NBD device by max_rpcs, Area by `parallel`).

When the stream breaks -- the server restarted, the network dropped, or a
reply took longer than the timeout (the stream is then cancelled, since its
order can no longer be trusted) -- every request in flight fails with
ConnectionLost, which callers may retry; the next request opens a new stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import grpc

from netswap.client.errors import ConnectionLost, NetswapError, error_from_rpc, error_from_status
from netswap.common.pagewire import decode_page_reply

METHOD = "/netswap.v1.SwapService/PageStream"
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs


class _Stream:
    def __init__(self, call: Any) -> None:
        self.call = call
        self.waiting: deque[asyncio.Future[bytes]] = deque()
        self.write_lock = asyncio.Lock()
        self.broken: NetswapError | None = None
        self.reader: asyncio.Task[None] | None = None


class PageStream:
    def __init__(
        self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], timeout: float
    ) -> None:
        # Raw bytes both ways: messages are built and parsed by pagewire.
        self._open_call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
        self._metadata = metadata
        self.timeout = timeout
        self._stream: _Stream | None = None

    async def request(self, raw: bytes) -> memoryview:
        """Send one serialized PageRequest; return its reply's pages (empty unless SwapIn).

        Raises the NetswapError of a failed request, or ConnectionLost if the
        stream broke before its reply came.
        """
        stream = self._current()
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[bytes] = loop.create_future()
        # The deadline is a timer rather than wait_for: no extra task per
        # request. A reply that is late holds up every one behind it (they
        # come in order), so when it fires the whole stream is abandoned.
        timer = loop.call_later(self.timeout, self._expire, stream, reply)
        try:
            async with stream.write_lock:  # one write at a time, and the FIFO in write order
                if stream.broken is not None:
                    raise stream.broken
                stream.waiting.append(reply)
                try:
                    await stream.call.write(raw)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as e:
                    # Fails everything waiting, this request included.
                    self._break(stream, ConnectionLost(f"the page stream broke while sending: {e}"))
                except BaseException:
                    # Cancelled mid-write: whether the request left is
                    # unknown, so the FIFO cannot be trusted any more.
                    self._break(
                        stream, ConnectionLost("a request on the page stream was abandoned mid-write")
                    )
                    raise
            # A caller cancelled here cancels `reply`; the reader skips it.
            raw_reply = await reply
        finally:
            timer.cancel()
        code, message, pages = decode_page_reply(raw_reply)
        if code:
            raise error_from_status(_STATUS.get(code, grpc.StatusCode.UNKNOWN), message)
        return pages

    def _expire(self, stream: _Stream, reply: asyncio.Future[bytes]) -> None:
        if not reply.done():
            self._break(stream, ConnectionLost(f"no reply on the page stream within {self.timeout:g}s"))

    def _current(self) -> _Stream:
        stream = self._stream
        if stream is None or stream.broken is not None:
            stream = _Stream(self._open_call(None, metadata=self._metadata))
            stream.reader = asyncio.ensure_future(self._read(stream))
            self._stream = stream
        return stream

    async def _read(self, stream: _Stream) -> None:
        error: NetswapError
        try:
            while True:
                raw = await stream.call.read()
                if raw is _EOF:
                    error = ConnectionLost("the server ended the page stream")
                    break
                if not stream.waiting:
                    error = ConnectionLost("a reply on the page stream that nobody asked for")
                    break
                waiter = stream.waiting.popleft()
                if not waiter.done():
                    waiter.set_result(raw)
        except grpc.aio.AioRpcError as e:
            error = error_from_rpc(e)
        except asyncio.CancelledError:
            error = ConnectionLost("the page stream was closed")
        self._break(stream, error)

    def _break(self, stream: _Stream, error: NetswapError) -> None:
        """Fail every request waiting on `stream` and retire it (the next request opens a new one)."""
        if stream.broken is None:
            stream.broken = error
            stream.call.cancel()
        while stream.waiting:
            waiter = stream.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(stream.broken)
                waiter.exception()  # retrieved: a caller that gave up must not leave it unobserved

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None and stream.reader is not None:
            self._break(stream, ConnectionLost("the client is closing"))
            stream.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream.reader


# gRPC status code numbers (PageReply.code) -> grpc.StatusCode, whose value is (number, name).
_STATUS = {code.value[0]: code for code in grpc.StatusCode}
