"""Who may call, and how much: every SwapService call passes here before any byte of its body is read.

- Authentication: a bearer token (one hash, one lookup) or, under mutual TLS,
  the client certificate's principal. A caller refused here costs the server
  the refusal and nothing else: its body is never read, let alone decoded.
- Failures are audited per peer address up to a budget (a token bucket); past
  it they are refused the same way but folded into one summary line per peer
  every few seconds, so a flood cannot fill the log or keep the loop writing it.
- Per principal: at most `max_calls` unary calls and `max_streams` PageStreams
  at once, so one tenant's burst queues behind itself (RESOURCE_EXHAUSTED past it).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from netswap.server.audit import AuditLog
from netswap.server.auth import Credentials, TokenTable, bearer_token, peer_var, principal_from_certificate
from netswap.server.errors import Exhausted, Unauthenticated
from netswap.server.metrics import ServerMetrics

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class AuthPolicy:
    mutual_tls: bool = False  # client certificates are required and name the principal
    require_token: bool = False  # under mutual TLS, also require a token for that principal


@dataclass(frozen=True)
class CallLimits:
    max_calls: int = 64  # concurrent unary calls per principal
    max_streams: int = 16  # open PageStreams per principal
    failure_burst: int = 20  # audited authentication failures per peer before summaries...
    failure_rate: float = 2.0  # ...and how many per second after that


@dataclass
class _Peer:
    tokens: float
    at: float
    folded: dict[str, int] = field(default_factory=dict)  # reason -> failures not audited one by one


class Gate:
    def __init__(
        self,
        credentials: Credentials,
        policy: AuthPolicy,
        limits: CallLimits,
        metrics: ServerMetrics,
        audit: AuditLog,
    ) -> None:
        self.credentials = credentials
        self._policy = policy
        self._limits = limits
        self._metrics = metrics
        self._audit = audit
        self._calls: dict[str, int] = {}
        self._streams: dict[str, int] = {}
        self._peers: dict[str, _Peer] = {}

    def admit(self, method: str, context: Context, stream: bool = False) -> tuple[str, Callable[[], None]]:
        """The caller's principal, held against its share of calls (or streams), and the function
        that lets go of it (call it exactly once, when the call ends).

        Raises Unauthenticated or Exhausted."""
        peer = context.peer()
        peer_var.set(peer)  # this call's task: the audit log says where its events come from
        name = self.authenticate(method, context, peer)
        counts, limit, what = (
            (self._streams, self._limits.max_streams, "open PageStreams")
            if stream
            else (self._calls, self._limits.max_calls, "calls in progress")
        )
        held = counts.get(name, 0)
        if held >= limit:
            raise Exhausted(f"{held} {what}: the server allows {limit} per principal; retry later")
        counts[name] = held + 1

        def release() -> None:
            counts[name] -= 1
            if not counts[name]:
                del counts[name]

        return name, release

    def authenticate(self, method: str, context: Context, peer: str) -> str:
        try:
            return self._identify(
                self.credentials.table, bearer_token(context.invocation_metadata()), context
            )
        except Unauthenticated as e:
            self.refused(method, peer, e.reason)
            raise

    def still(self, name: str, method: str, context: Context, table: TokenTable) -> None:
        """Raise Unauthenticated unless the caller is still `name` under `table` (after a reload)."""
        peer = context.peer()
        try:
            again = self._identify(table, bearer_token(context.invocation_metadata()), context)
        except Unauthenticated as e:
            self.refused(method, peer, e.reason)
            raise
        if again != name:
            self.refused(method, peer, "principal_changed")
            raise Unauthenticated(
                "the credentials of this stream now name another principal", "principal_changed"
            )

    def refused(self, method: str, peer: str, reason: str) -> None:
        """Count an authentication failure; audit it, or fold it into the peer's summary."""
        self._metrics.auth_failures.labels(reason).inc()
        key = _address(peer)
        now = time.monotonic()
        state = self._peers.get(key)
        if state is None:
            if len(self._peers) >= _MAX_PEERS:
                self._evict()
            state = self._peers[key] = _Peer(float(self._limits.failure_burst), now)
        state.tokens = min(
            float(self._limits.failure_burst), state.tokens + (now - state.at) * self._limits.failure_rate
        )
        state.at = now
        if state.tokens >= 1:
            state.tokens -= 1
            self._audit.event("authn_failure", outcome=reason, method=method, peer=peer)
        else:
            state.folded[reason] = state.folded.get(reason, 0) + 1
            self._metrics.auth_failures_folded.inc()

    def _evict(self) -> None:
        """The table is full: summarise the older half of it and forget those peers."""
        old = list(self._peers)[: _MAX_PEERS // 2]
        self._summarise(old)
        for key in old:
            del self._peers[key]

    def _summarise(self, keys: list[str]) -> None:
        for key in keys:
            state = self._peers[key]
            if state.folded:
                self._audit.event(
                    "authn_failure_summary", outcome="too many failures to log one by one",
                    peer=key, failures=sum(state.folded.values()), reasons=dict(state.folded),
                )  # fmt: skip
                state.folded.clear()

    def flush(self) -> None:
        """Write the summary of each peer's folded failures; forget peers whose budget is whole again."""
        now = time.monotonic()
        self._summarise(list(self._peers))
        for key, state in list(self._peers.items()):
            if state.tokens + (now - state.at) * self._limits.failure_rate >= self._limits.failure_burst:
                del self._peers[key]

    def _identify(self, table: TokenTable, token: str | None, context: Context) -> str:
        tokened = table.authenticate(token) if token is not None else None
        if token is not None and tokened is None:
            raise Unauthenticated("unknown bearer token", "unknown_token")
        if not self._policy.mutual_tls:
            if tokened is None:
                raise Unauthenticated("missing bearer token", "missing_token")
            return tokened.name
        named = principal_from_certificate(context.auth_context())
        if named is None:
            raise Unauthenticated(
                "the client certificate names no principal (SAN URI spiffe://<domain>/principal/NAME)",
                "certificate_without_principal",
            )
        if not table.has(named):
            # The CA vouches for the name; the tokens file says who may use the
            # service (and with what quota). Removing a principal -- and SIGHUP --
            # revokes its certificates too, without replacing the CA.
            raise Unauthenticated(
                f"principal {named!r} of the client certificate is not known here", "unknown_principal"
            )
        if tokened is not None and tokened.name != named:
            raise Unauthenticated(
                "bearer token and client certificate name different principals", "principal_mismatch"
            )
        if tokened is None and self._policy.require_token:
            raise Unauthenticated(
                "missing bearer token (required as well as a client certificate)", "missing_token"
            )
        return named


_MAX_PEERS = 4096  # peer addresses tracked at once


def _address(peer: str) -> str:
    """Whom a failure counts against: an IPv4 address without its port ('ipv4:10.0.0.7:40112'
    -> 'ipv4:10.0.0.7'), an IPv6 address's /64 (one host usually has all of it)."""
    if peer.startswith("ipv4:"):
        return peer.rpartition(":")[0]
    if peer.startswith("ipv6:"):
        host = peer.removeprefix("ipv6:").rpartition(":")[0].strip("[]").partition("%")[0]
        try:
            return f"ipv6:{ipaddress.IPv6Network((host, 64), strict=False)}"
        except ValueError:
            return peer.rpartition(":")[0]
    return peer.partition(":")[0] or "unknown"  # unix sockets: one local peer
