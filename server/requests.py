"""The one path every page request takes, unary or on a PageStream: its turn, the handle check,
its slots, the manager, its metrics. Failures are raised; `outcome` times a request and maps
its error to the status the caller is told, for both kinds of call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError

from netswap.common.limits import PAGE_SIZE
from netswap.common.pagewire import SWAP_IN, SWAP_OUT, Op, PageHead, same_from_wire
from netswap.common.samepages import SamePages
from netswap.server import slots as wire_slots
from netswap.server.areas import AreaManager
from netswap.server.errors import InvalidArgument
from netswap.server.fairshare import FairShare, Turn, current_turn
from netswap.server.metrics import ServerMetrics
from netswap.server.status import status_for
from netswap.v1 import swap_pb2

T = TypeVar("T")
Pieces = list[bytes | memoryview]
_NONE: Pieces = []


class PagePath:
    def __init__(self, manager: AreaManager, metrics: ServerMetrics, fair: FairShare) -> None:
        self._manager = manager
        self._metrics = metrics
        self._fair = fair
        self._ok = {
            method: metrics.rpc_duration.labels(method, grpc.StatusCode.OK.name)
            for method in ("SwapOn", "SwapOut", "SwapIn", "Discard", "SwapOff", "ListAreas", "PageStream")
        }
        pages = metrics.batch_pages
        self._pages = {
            Op.SWAP_OUT: pages["swap_out"],
            Op.SWAP_IN: pages["swap_in"],
            Op.DISCARD: pages["discard"],
        }

    async def execute(
        self, principal: str, op: Op, head: PageHead, pages: memoryview, later: bool = False
    ) -> tuple[Pieces, SamePages | None]:
        """Do one page request; a SwapIn's pages (to join at once) and the same-filled pages
        they leave out (if it asked), else nothing.

        With `later`, a SwapOut's copy may be left to the manager's settle()
        (see AreaManager.swap_out), which the caller runs once its reply is sent."""
        wait = self._fair.turn(principal)
        if wait is not None:
            try:
                await wait
            except asyncio.CancelledError:
                if wait.done() and not wait.cancelled():  # woken and cancelled at once: pass the turn on
                    self._fair.pass_turn()
                raise
        turn = Turn(self._fair, principal, wait is not None)
        reset = current_turn.set(turn)
        try:
            manager = self._manager
            area = manager.attached(principal, head.handle, op.value)
            slots = wire_slots.from_wire(head.slots, head.run_start, head.run_count)
            if op is SWAP_IN:
                assert isinstance(head, swap_pb2.SwapInRequest)
                found: list[tuple[int, bytes]] | None = [] if head.same_pages else None
                pieces = await manager.swap_in(area, slots, found)
                same = SamePages([i for i, _ in found], b"".join([w for _, w in found])) if found else None
                self._pages[op].observe(sum(map(len, pieces)) // PAGE_SIZE + (len(found) if found else 0))
                return pieces, same
            if op is SWAP_OUT:
                assert isinstance(head, swap_pb2.SwapOutRequest)
                count = await manager.swap_out(area, slots, pages, later, _same_of(head))
            else:
                count = await manager.discard(area, slots)
            self._pages[op].observe(count)
            return _NONE, None
        finally:
            current_turn.reset(reset)
            turn.end()

    def ok(self, method: str, start: float) -> None:
        """Time a request that succeeded."""
        self._ok[method].observe(time.perf_counter() - start)

    def cancelled(self, method: str, start: float) -> None:
        """Time a request its caller gave up on."""
        code = grpc.StatusCode.CANCELLED.name
        self._metrics.rpc_duration.labels(method, code).observe(time.perf_counter() - start)

    def failed(self, method: str, start: float, error: Exception) -> tuple[grpc.StatusCode, str]:
        """Time a request that failed; the status code and message its caller is told."""
        code, message = status_for(error, method)
        self._metrics.rpc_duration.labels(method, code.name).observe(time.perf_counter() - start)
        return code, message


def _same_of(head: swap_pb2.SwapOutRequest) -> SamePages | None:
    """A SwapOut's same-filled pages, or InvalidArgument if its fields do not make sense."""
    if not head.same_index and not head.same_word:
        return None
    try:
        return same_from_wire(head.same_index, head.same_word)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


def decoded(what: str, parse: Callable[[bytes], T], raw: bytes) -> T:
    """`parse(raw)` of untrusted bytes, or InvalidArgument saying what was wrong with them."""
    try:
        return parse(raw)
    except (ValueError, DecodeError) as e:
        refusal = malformed(what, e)
    # Raised outside the handler: no chain back to the parser's frames, which hold the bytes;
    # and not kept in this frame, which its traceback holds (a cycle only the GC would end).
    try:
        raise refusal
    finally:
        del refusal


def malformed(what: str, error: Exception) -> InvalidArgument:
    """What a caller is told about bytes that did not parse (raise it outside the handler of
    `error`, or it keeps the parser's frames, and the bytes, alive)."""
    return InvalidArgument(f"malformed {what} request: {error}")
