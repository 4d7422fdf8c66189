"""Property-based: random RPC sequences from two principals against a model of what each should see.

Hypothesis drives SwapOn / SwapOut / SwapIn / Discard / SwapOff / ListAreas
from alice and bob -- with each other's handles and stale ones mixed in --
and every reply (data or status code) must match a plain-Python model of the
service. Any divergence fails with the shortest sequence that shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from prometheus_client import CollectorRegistry

from netswap.server.app import NetswapServer, build_server
from netswap.server.config import Config
from netswap.server.store import open_store
from netswap.v1 import swap_pb2, swap_pb2_grpc
from tests.helpers import PS, auth, write_tokens

PRINCIPALS = ("alice", "bob")
NAMES = ("x", "y", "..")
SIZES = (4 * PS, 16 * PS, PS)


# Mostly in range of every area, sometimes past the end of the small ones.
SLOTS = st.one_of(
    st.lists(st.integers(0, 17), min_size=1, max_size=4, unique=True),
    st.builds(lambda first, n: list(range(first, first + n)), st.integers(0, 17), st.integers(1, 4)),
)


NAMING = st.sampled_from(["listed", "run", "run", "both", "start only"])


def naming(slots: list[int], how: str) -> dict[str, Any]:
    """The request fields that name `slots`: listed; as a run (run_start, run_count) when
    they are one; or wrongly -- listed *and* as a run, or with a run_start alone."""
    if how == "run" and slots == list(range(slots[0], slots[0] + len(slots))):
        return {"run_start": slots[0], "run_count": len(slots)}
    if how == "both":
        return {"slots": slots, "run_start": slots[0], "run_count": len(slots)}
    if how == "start only":
        return {"slots": slots, "run_start": slots[0] + 1}
    return {"slots": slots}


# Mostly a live handle of the caller's own; sometimes anyone's, stale ones included.
PICK = st.one_of(st.just(-1), st.integers(min_value=0))


@dataclass
class ModelArea:
    size: int
    handle: bytes
    pages: dict[int, bytes] = field(default_factory=dict)


@contextlib.contextmanager
def server_in_thread(tmp_path: Path, store: str) -> Iterator[NetswapServer]:
    """A real server on its own loop in a thread, so Hypothesis can drive it with blocking calls."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = Config(
        listen="127.0.0.1:0",
        store=f"file:{tmp_path / 'store'}" if store == "file" else "memory",
        capacity=64 << 20,
        tokens=write_tokens(tmp_path / "tokens.toml"),
        metrics_listen="",
        swapon_rate=1e6,
        swapon_burst=1_000_000,
    )

    async def start() -> NetswapServer:
        server = build_server(config, open_store(config.store), CollectorRegistry())
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result()
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


class SwapModel(RuleBasedStateMachine):
    stub: swap_pb2_grpc.SwapServiceStub

    def __init__(self) -> None:
        super().__init__()
        self.areas: dict[tuple[str, str], ModelArea] = {}
        self.handles: list[bytes] = []  # every handle ever issued, live or not

    @initialize()
    def clean(self) -> None:
        # One server serves all examples: start each from no areas at all.
        for principal in PRINCIPALS:
            for info in self.stub.ListAreas(swap_pb2.ListAreasRequest(), metadata=auth(principal)).areas:
                h = self.stub.SwapOn(
                    swap_pb2.SwapOnRequest(name=info.name, size_bytes=info.size_bytes),
                    metadata=auth(principal),
                ).handle
                self.stub.SwapOff(swap_pb2.SwapOffRequest(handle=h), metadata=auth(principal))

    def call(self, method: str, request: object, principal: str) -> tuple[grpc.StatusCode, object]:
        try:
            return grpc.StatusCode.OK, getattr(self.stub, method)(request, metadata=auth(principal))
        except grpc.RpcError as e:
            return e.code(), None

    def handle_for(self, principal: str, pick: int) -> bytes:
        """pick -1: a live handle of `principal` if it has one; otherwise any handle ever issued."""
        own = [a.handle for (p, _), a in self.areas.items() if p == principal]
        if pick == -1 and own:
            return own[0]
        return self.handles[max(pick, 0) % len(self.handles)]

    def owner_of(self, handle: bytes) -> tuple[str, str] | None:
        for key, area in self.areas.items():
            if area.handle == handle:
                return key
        return None

    def expect(
        self, code: grpc.StatusCode, principal: str, handle: bytes, slots: list[int], how: str
    ) -> tuple[str, str] | None:
        """Check a data-plane call's status against the model; the area's key if it went through."""
        key = self.owner_of(handle)
        if key is None or key[0] != principal:
            assert code == grpc.StatusCode.NOT_FOUND  # unknown, stale, or someone else's: first
            return None
        if how in ("both", "start only") or max(slots) >= self.areas[key].size // PS:
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            return None
        assert code == grpc.StatusCode.OK
        return key

    @rule(principal=st.sampled_from(PRINCIPALS), name=st.sampled_from(NAMES), size=st.sampled_from(SIZES))
    def swapon(self, principal: str, name: str, size: int) -> None:
        code, reply = self.call("SwapOn", swap_pb2.SwapOnRequest(name=name, size_bytes=size), principal)
        existing = self.areas.get((principal, name))
        if existing is not None and existing.size != size:
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            return
        assert code == grpc.StatusCode.OK and isinstance(reply, swap_pb2.SwapOnResponse)
        assert reply.created == (existing is None)
        assert reply.slot_count == size // PS
        if existing is None:
            self.areas[(principal, name)] = ModelArea(size, reply.handle)
        else:
            existing.handle = reply.handle  # the old one is dead now
        self.handles.append(reply.handle)

    @precondition(lambda self: self.handles)
    @rule(
        principal=st.sampled_from(PRINCIPALS),
        pick=PICK,
        slots=SLOTS,
        seed=st.integers(0, 255),
        how=NAMING,
    )
    def swap_out(self, principal: str, pick: int, slots: list[int], seed: int, how: str) -> None:
        handle = self.handle_for(principal, pick)
        pages = [bytes([(seed + i) % 256]) * PS for i in range(len(slots))]
        request = swap_pb2.SwapOutRequest(handle=handle, pages=b"".join(pages), **naming(slots, how))
        code, _ = self.call("SwapOut", request, principal)
        key = self.expect(code, principal, handle, slots, how)
        if key is not None:
            self.areas[key].pages.update(zip(slots, pages, strict=True))

    @precondition(lambda self: self.handles)
    @rule(
        principal=st.sampled_from(PRINCIPALS),
        pick=PICK,
        slots=SLOTS,
        how=NAMING,
    )
    def swap_in(self, principal: str, pick: int, slots: list[int], how: str) -> None:
        handle = self.handle_for(principal, pick)
        request = swap_pb2.SwapInRequest(handle=handle, **naming(slots, how))
        code, reply = self.call("SwapIn", request, principal)
        key = self.expect(code, principal, handle, slots, how)
        if key is not None:
            assert isinstance(reply, swap_pb2.SwapInResponse)
            pages = self.areas[key].pages
            assert reply.pages == b"".join(pages.get(s, bytes(PS)) for s in slots)

    @precondition(lambda self: self.handles)
    @rule(
        principal=st.sampled_from(PRINCIPALS),
        pick=PICK,
        slots=SLOTS,
        how=NAMING,
    )
    def discard(self, principal: str, pick: int, slots: list[int], how: str) -> None:
        handle = self.handle_for(principal, pick)
        request = swap_pb2.DiscardRequest(handle=handle, **naming(slots, how))
        code, _ = self.call("Discard", request, principal)
        key = self.expect(code, principal, handle, slots, how)
        if key is not None:
            for s in slots:
                self.areas[key].pages.pop(s, None)

    @precondition(lambda self: self.handles)
    @rule(principal=st.sampled_from(PRINCIPALS), pick=PICK)
    def swapoff(self, principal: str, pick: int) -> None:
        handle = self.handle_for(principal, pick)
        code, _ = self.call("SwapOff", swap_pb2.SwapOffRequest(handle=handle), principal)
        key = self.owner_of(handle)
        if key is None or key[0] != principal:
            assert code == grpc.StatusCode.NOT_FOUND
        else:
            assert code == grpc.StatusCode.OK
            del self.areas[key]

    @invariant()
    def listings_match(self) -> None:
        for principal in PRINCIPALS:
            code, reply = self.call("ListAreas", swap_pb2.ListAreasRequest(), principal)
            assert code == grpc.StatusCode.OK and isinstance(reply, swap_pb2.ListAreasResponse)
            got = sorted((a.name, a.size_bytes, a.pages_stored) for a in reply.areas)
            want = sorted((n, a.size, len(a.pages)) for (p, n), a in self.areas.items() if p == principal)
            assert got == want


@pytest.mark.parametrize("store", ["memory", "file"])
def test_two_principals_against_the_model(tmp_path: Path, store: str) -> None:
    with server_in_thread(tmp_path, store) as server, grpc.insecure_channel(server.address) as channel:
        SwapModel.stub = swap_pb2_grpc.SwapServiceStub(channel)
        run_state_machine_as_test(
            SwapModel,
            settings=settings(
                max_examples=40,
                stateful_step_count=25,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
