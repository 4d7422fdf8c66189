"""One NBD client connection: the handshake, then requests, over an asyncio BufferedProtocol.

Reading: every connection owns one preallocated receive buffer. Each socket
read is parsed completely -- all requests in it are dispatched before the
loop turns -- so requests that arrive together reach the device together and
share RPCs. A write's payload goes into pages leased from the area's pool:
what is already in the receive buffer is copied, the rest is received
straight into the lease (get_buffer hands the socket the lease's memory).

Bounds: a request is only taken off the socket once its pages are leased;
when the pool is empty, reading pauses until pages come back (the client
feels TCP backpressure, the frontend does not queue). Replies are written
with a zero high-water mark, so the moment a reply cannot be sent at once
reading pauses too, and a read's pages stay leased until the socket has
taken them. A client that never reads its replies therefore stalls only
itself.

Errors: a request that is wrong gets its NBD error; a protocol violation
(bad magic, an absurd length) closes this connection only. Requests already
accepted still complete on the device, so nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import cast

from netswap.client.metrics import FrontendMetrics
from netswap.client.nbd import protocol as p
from netswap.client.nbd.device import AreaDevice, DeviceError
from netswap.client.pool import Lease

log = logging.getLogger(__name__)

RECV_BUFFER = 256 * 1024
_FULL = "the frontend serves no more clients at once (--max-connections)"


class Phase(enum.Enum):
    FLAGS = "the client's flags"  # after our greeting
    OPTIONS = "option haggling"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class Pause(enum.Enum):
    """Why reading from the socket is paused."""

    POOL = "waiting for pool pages"
    WRITE = "replies not yet taken by the socket"
    DISCONNECT = "NBD_CMD_DISC: finishing what was accepted"


# What answering a request takes: cookie, command, when it started, its lease, a read's payload.
_Answer = tuple[int, int, float, Lease, memoryview | None]
# Module constants for the hot path (see batcher.READ).
_FLAGS, _OPTIONS, _TRANSMISSION, _CLOSED = Phase.FLAGS, Phase.OPTIONS, Phase.TRANSMISSION, Phase.CLOSED


class NbdConnection(asyncio.BufferedProtocol):
    def __init__(
        self,
        device: AreaDevice,
        export: p.Export,
        on_close: Callable[[NbdConnection], None],
        budget_pages: int,
        metrics: FrontendMetrics | None = None,
        *,
        handshake_timeout: float = 10.0,
        on_transmission: Callable[[NbdConnection], bool] = lambda conn: True,
    ) -> None:
        self.device = device
        self.export = export
        self._metrics = metrics
        # Pool pages this connection may hold at once, so that one client
        # (say, one that never reads its replies) cannot starve the others.
        self.budget_pages = budget_pages
        self._pool = device.area.pool
        self._leased = 0
        self._pending: tuple[int, int, int, int, Callable[[Lease, int, int, int], bool]] | None = None
        self._waiting = False
        self._on_close = on_close
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0  # unparsed data is _buf[_start:_end]
        self._end = 0
        self._phase = _FLAGS
        self._no_zeroes = False
        self._transport: asyncio.Transport | None = None
        self._paused: set[Pause] = set()  # why reading is paused
        # A write payload arriving straight into leased pages.
        self._sink: memoryview | None = None
        self._sink_done: Callable[[], None] | None = None
        self._sink_lease: Lease | None = None  # whose pages the sink is filling
        self._skip = 0  # payload bytes of a refused write still to throw away
        self._tasks: set[asyncio.Task[None]] = set()
        self.busy = 0  # requests accepted and not yet answered
        self._unsent: list[Lease] = []  # leases whose data the transport may still hold
        # Replies finished in one turn of the loop leave in one writev: one
        # syscall for many 16-byte headers instead of one each.
        self._corked: list[bytes | memoryview] = []
        self._corked_leases: list[Lease] = []
        self._disconnecting = False
        self.peer = "?"
        self.opened = time.monotonic()
        self._handshake_timeout = handshake_timeout
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._on_transmission = on_transmission  # may it enter transmission? (--max-connections)

    # -- asyncio callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self.peer = str(transport.get_extra_info("peername") or "unix")
        # Any unsent byte pauses reading (see the module docstring).
        transport.set_write_buffer_limits(high=0, low=0)
        transport.write(p.greeting())
        # A client that does not finish its handshake in time is dropped: idle
        # sockets must not hold the places of clients that would use them.
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self._handshake_timeout, self._close, f"no handshake within {self._handshake_timeout:g}s"
        )

    @property
    def in_handshake(self) -> bool:
        return self._phase in (_FLAGS, _OPTIONS)

    @property
    def serving(self) -> bool:
        return self._phase is _TRANSMISSION

    def drop(self, why: str) -> None:
        """Close this connection (the frontend needs its place)."""
        self._close(why)

    def _enter_transmission(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._phase = _TRANSMISSION

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._sink is not None:
            return self._sink
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):  # move the partial message to the front
            n = self._end - self._start
            self._view[:n] = self._view[self._start : self._end]
            self._start, self._end = 0, n
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._sink is not None:
            self._sink = self._sink[nbytes:]
            if not len(self._sink):
                self._sink = None
                self._sink_lease = None
                done, self._sink_done = self._sink_done, None
                assert done is not None
                done()
            else:
                return
        else:
            self._end += nbytes
        self._parse()

    def pause_writing(self) -> None:
        self._pause(Pause.WRITE)

    def resume_writing(self) -> None:
        unsent, self._unsent = self._unsent, []
        for lease in unsent:
            self._release(lease)
        self._resume(Pause.WRITE)

    def connection_lost(self, exc: Exception | None) -> None:
        # The transport closes silently on a socket error; say so, or an NBD
        # client's I/O errors have no explanation on this side.
        if exc is not None:
            log.warning("NBD connection from %s lost: %s", self.peer, exc)
        elif self._phase is not _CLOSED and self.busy:
            log.warning("NBD client %s left with %d requests in flight", self.peer, self.busy)
        self._phase = _CLOSED
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self._pending = None
        if self._sink_lease is not None:  # the client left in the middle of a write payload
            self._sink = self._sink_done = None
            lease, self._sink_lease = self._sink_lease, None
            self._release(lease)
        unsent, self._unsent = self._unsent, []
        for lease in unsent:
            self._release(lease)
        self._on_close(self)

    # -- flow control ---------------------------------------------------------------

    def _pause(self, reason: Pause) -> None:
        if not self._paused and self._transport is not None:
            self._transport.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: Pause) -> None:
        self._paused.discard(reason)
        if not self._paused and self._transport is not None and self._phase is not _CLOSED:
            self._transport.resume_reading()
            self._parse()  # requests may be waiting in the receive buffer

    def _close(self, why: str) -> None:
        if self._phase is not _CLOSED:
            log.warning("closing NBD connection from %s: %s", self.peer, why)
            self._phase = _CLOSED
            if self._transport is not None:
                self._transport.close()

    # -- parsing ----------------------------------------------------------------------

    def _available(self) -> int:
        return self._end - self._start

    def _take(self, n: int) -> memoryview:
        out = self._view[self._start : self._start + n]
        self._start += n
        return out

    def _parse(self) -> None:
        # Requests parsed together go to the server together (see AreaDevice.hold).
        self.device.hold()
        try:
            self._parse_all()
        finally:
            self.device.release()

    def _parse_all(self) -> None:
        while (
            self._phase is not _CLOSED and not self._paused and self._sink is None and not self._disconnecting
        ):
            if self._skip:
                n = min(self._skip, self._available())
                self._start += n
                self._skip -= n
                if self._skip:
                    return
            if self._phase is _FLAGS:
                if self._available() < p.CLIENT_FLAGS.size:
                    return
                (flags,) = p.CLIENT_FLAGS.unpack(self._take(p.CLIENT_FLAGS.size))
                if flags & ~(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
                    self._close(f"unknown client flags {flags:#x}")
                    return
                self._no_zeroes = bool(flags & p.FLAG_C_NO_ZEROES)
                self._phase = _OPTIONS
            elif self._phase is _OPTIONS:
                if not self._option():
                    return
            elif not self._request():
                return

    def _option(self) -> bool:
        """Handle one option if it is complete in the buffer; False if more bytes are needed."""
        if self._available() < p.OPTION_HEADER.size:
            return False
        magic, option, length = p.OPTION_HEADER.unpack_from(self._buf, self._start)
        if magic != p.IHAVEOPT:
            self._close(f"bad option magic {magic:#x}")
            return False
        if length > p.MAX_OPTION_LENGTH:
            if option == p.OPT_EXPORT_NAME or length > p.MAX_SKIPPED_OPTION:
                self._close(f"option {option} claims {length} bytes of data")
                return False
            # Longer than anything we accept: throw the data away, say so, go on.
            self._start += p.OPTION_HEADER.size
            self._skip = length
            self._write(
                p.error_reply(option, p.REP_ERR_TOO_BIG, f"{length} bytes of option data is too much")
            )
            return True
        if self._available() < p.OPTION_HEADER.size + length:
            return False
        self._start += p.OPTION_HEADER.size
        data = bytes(self._take(length))
        handler = {
            p.OPT_EXPORT_NAME: self._opt_export_name,
            p.OPT_ABORT: self._opt_abort,
            p.OPT_LIST: self._opt_list,
            p.OPT_INFO: self._opt_info_go,
            p.OPT_GO: self._opt_info_go,
        }.get(option)
        if handler is not None:
            handler(option, data)
        elif option == p.OPT_STARTTLS:
            self._write(p.error_reply(option, p.REP_ERR_POLICY, "TLS is not offered; use a unix socket"))
        else:
            self._write(p.error_reply(option, p.REP_ERR_UNSUP, f"option {option} is not supported"))
        return self._phase is not _CLOSED

    def _known(self, name: str) -> bool:
        return name in (self.export.name, "")  # "" is the default export

    def _opt_export_name(self, option: int, data: bytes) -> None:
        if not self._known(data.decode("utf-8", "replace")):
            # This option has no way to report an error: the spec says hang up.
            self._close("NBD_OPT_EXPORT_NAME for an unknown export")
            return
        if not self._on_transmission(self):  # no error reply exists for this option either
            self._close(_FULL)
            return
        self._write(p.export_name_reply(self.export, self._no_zeroes))
        self._enter_transmission()

    def _opt_abort(self, option: int, data: bytes) -> None:
        self._write(p.option_reply(option, p.REP_ACK))
        self._close("client aborted the handshake")

    def _opt_list(self, option: int, data: bytes) -> None:
        if data:
            self._write(p.error_reply(option, p.REP_ERR_INVALID, "NBD_OPT_LIST takes no data"))
            return
        self._write(p.option_reply(option, p.REP_SERVER, p.server_list_entry(self.export.name)))
        self._write(p.option_reply(option, p.REP_ACK))

    def _opt_info_go(self, option: int, data: bytes) -> None:
        try:
            name, requested = p.parse_info_request(data)
        except (ValueError, UnicodeDecodeError) as e:
            self._write(p.error_reply(option, p.REP_ERR_INVALID, str(e)))
            return
        if not self._known(name):
            self._write(p.error_reply(option, p.REP_ERR_UNKNOWN, f"no export named {name!r}"))
            return
        if option == p.OPT_GO and not self._on_transmission(self):
            self._write(p.error_reply(option, p.REP_ERR_POLICY, _FULL))
            self._close(_FULL)
            return
        for reply in p.info_replies(option, self.export, requested):
            self._write(reply)
        if option == p.OPT_GO:
            self._enter_transmission()

    def _request(self) -> bool:
        """Dispatch one request if its header is in the buffer; False to stop parsing for now."""
        if self._available() < p.REQUEST.size:
            return False
        magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack_from(self._buf, self._start)
        if magic != p.REQUEST_MAGIC:
            self._close(f"bad request magic {magic:#x}")
            return False
        if cmd == p.CMD_WRITE and length > self.export.max_payload and length >= p.DOS_LENGTH:
            self._close(f"write of {length} bytes")  # too big even to read and throw away
            return False
        self._start += p.REQUEST.size
        if cmd == p.CMD_DISC:
            # Never answered, whatever its fields: finish everything accepted,
            # then close. Nothing after it is read.
            self._disconnecting = True
            self._pause(Pause.DISCONNECT)
            self._maybe_finish_disconnect()
            return False
        errno = p.validate_request(cmd, flags, offset, length, self.export)
        if errno or (length == 0 and cmd not in (p.CMD_DISC, p.CMD_FLUSH)):
            self._write(p.simple_reply(errno, cookie))
            if self._metrics is not None:
                self._metrics.request_done(cmd, 0.0, errno == 0)
            if cmd == p.CMD_WRITE:
                self._skip = length  # keep the stream in step: the payload still comes
            return True
        return self._dispatch(cmd, cookie, offset, length)

    def _dispatch(self, cmd: int, cookie: int, offset: int, length: int) -> bool:
        """Start a valid request; False when parsing must stop (waiting for pages, or DISC)."""
        dev = self.device
        if cmd == p.CMD_READ:
            ps = dev.page_size
            pages = (offset + length - 1) // ps - offset // ps + 1
            return self._with_lease(pages, cookie, offset, length, self._start_read)
        if cmd == p.CMD_WRITE:
            return self._with_lease(
                dev.write_pages(offset, length), cookie, offset, length, self._write_payload
            )
        # Every command in progress holds at least one pool page, so the pool
        # bounds what the frontend holds whatever a client sends.
        if cmd == p.CMD_WRITE_ZEROES:
            return self._with_lease(
                max(1, dev.partial_edges(offset, length)), cookie, offset, length, self._start_zeroes
            )
        if cmd == p.CMD_TRIM:
            return self._with_lease(1, cookie, offset, length, self._start_trim)
        # FLUSH. Writes are answered only once the server has them
        # (docs/nbd.md: durability), so every acknowledged write is already
        # as permanent as netswap makes anything.
        self._write(p.simple_reply(0, cookie))
        if self._metrics is not None:
            self._metrics.request_done(cmd, 0.0, True)
        return True

    # -- requests that need pages -----------------------------------------------------

    def _with_lease(
        self,
        pages: int,
        cookie: int,
        offset: int,
        length: int,
        then: Callable[[Lease, int, int, int], bool],
    ) -> bool:
        """Run then(lease, ...) with `pages` pool pages; if that must wait, stop reading meanwhile."""
        if self._leased + pages <= self.budget_pages:
            lease = self._pool.try_acquire(pages) if pages else Lease(None, 0, 0, memoryview(b""))
            if lease is not None:
                self._leased += pages
                return then(lease, cookie, offset, length)
        # Over this connection's share, or the pool is dry: no more requests
        # come off the socket until pages are back.
        self._pause(Pause.POOL)
        self._pending = (pages, cookie, offset, length, then)
        self._retry_pending()
        return False

    def _retry_pending(self) -> None:
        """Wait for the pool for the pending request once this connection's share allows it."""
        if self._pending is None or self._waiting or self._leased + self._pending[0] > self.budget_pages:
            return
        pages, cookie, offset, length, then = self._pending
        self._waiting = True

        async def wait() -> None:
            try:
                got = await self._pool.acquire(pages)
            except (asyncio.CancelledError, ValueError):  # connection or pool closing
                return
            finally:
                self._waiting = False
            if self._phase is _CLOSED:
                got.release()
                return
            self._leased += pages
            self._pending = None
            then(got, cookie, offset, length)
            self._resume(Pause.POOL)

        task = asyncio.ensure_future(wait())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release(self, lease: Lease) -> None:
        self._leased -= lease.pages
        lease.release()
        self._retry_pending()

    def _write_payload(self, lease: Lease, cookie: int, offset: int, length: int) -> bool:
        skip = offset % self.device.page_size
        target = lease.view[skip : skip + length]
        have = min(length, self._available())
        target[:have] = self._take(have)

        def received() -> None:
            self.device.write(offset, length, lease.view, self._answer(p.CMD_WRITE, cookie, lease))

        if have == length:
            received()
            return True
        self._sink = target[have:]
        self._sink_done = received
        self._sink_lease = lease
        return False

    def _start_read(self, lease: Lease, cookie: int, offset: int, length: int) -> bool:
        skip = offset % self.device.page_size
        answer = self._answer(p.CMD_READ, cookie, lease, lease.view[skip : skip + length])
        self.device.read(offset, length, lease.view, answer)
        return True

    def _start_trim(self, lease: Lease, cookie: int, offset: int, length: int) -> bool:
        self.device.trim(offset, length, self._answer(p.CMD_TRIM, cookie, lease))
        return True

    def _start_zeroes(self, lease: Lease, cookie: int, offset: int, length: int) -> bool:
        answer = self._answer(p.CMD_WRITE_ZEROES, cookie, lease)
        self.device.write_zeroes(offset, length, lease.view, answer)
        return True

    # -- completion ---------------------------------------------------------------------

    def _answer(
        self, command: int, cookie: int, lease: Lease, data: memoryview | None = None
    ) -> Callable[[BaseException | None], None]:
        """What answers a request the device is about to take: its done(error)."""
        self.busy += 1
        return partial(self._finish, (cookie, command, time.perf_counter(), lease, data))

    def _finish(self, answer: _Answer, error: BaseException | None) -> None:
        """A request is over on the device: answer it."""
        cookie, command, start, lease, data = answer
        if error is None:
            errno = 0
        elif isinstance(error, DeviceError):
            errno = error.errno
            log.warning("request %#x failed: %s", cookie, error)
        else:
            errno = p.EIO
            log.error("request %#x failed", cookie, exc_info=error)
        try:
            self._reply(cookie, errno, lease, data)
        finally:  # answered, even if that failed: or a DISC would wait for it forever
            self.busy -= 1
        if self._metrics is not None:
            self._metrics.request_done(command, time.perf_counter() - start, errno == 0)
        if self._disconnecting:
            self._maybe_finish_disconnect()

    def _reply(self, cookie: int, errno: int, lease: Lease | None, data: memoryview | None) -> None:
        transport = self._transport
        if self._phase is _CLOSED or transport is None or transport.is_closing():
            if lease is not None:
                self._release(lease)
            return
        flush_scheduled = bool(self._corked)
        self._corked.append(p.simple_reply(errno, cookie))
        if data is not None and errno == 0:
            self._corked.append(data)
        if lease is not None:
            if data is not None:
                self._corked_leases.append(lease)  # its pages are in the queue until flushed
            else:
                self._release(lease)
        if flush_scheduled:
            return
        if self.busy <= 1:
            # This is the only request in progress: no other reply can join
            # it this turn, so waiting a turn would only add latency.
            self._flush()
        else:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send every reply queued this turn; keep read leases until the socket has the data."""
        corked, self._corked = self._corked, []
        leases, self._corked_leases = self._corked_leases, []
        transport = self._transport
        if self._phase is not _CLOSED and transport is not None and not transport.is_closing():
            transport.writelines(corked)
            if transport.get_write_buffer_size():
                self._unsent.extend(leases)  # released once the socket has taken it
                return
        for lease in leases:
            self._release(lease)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _maybe_finish_disconnect(self) -> None:
        if self._disconnecting and not self.busy and self._phase is not _CLOSED:
            if self._corked:
                self._flush()  # the last replies go out before the close
            self._phase = _CLOSED
            if self._transport is not None:
                self._transport.close()

    def abort(self) -> None:
        """Stop serving (shutdown): close the socket; requests in progress still finish on the device."""
        if self._transport is not None:
            self._transport.close()
