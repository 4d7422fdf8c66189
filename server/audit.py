"""The audit log: one JSON line per SwapOn, SwapOff, authentication or authorization failure.

Each line says who (principal), what (event, area), from where (peer) and how
it ended (outcome). Tokens never appear: failures say why ("unknown_token"),
not with what.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from netswap.server.auth import peer_var

log = logging.getLogger("netswap.audit")


class AuditLog:
    def __init__(self, logger: logging.Logger = log) -> None:
        self._log = logger

    def event(self, event: str, *, outcome: str, **fields: Any) -> None:
        record = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": event,
            "outcome": outcome,
            "peer": fields.pop("peer", None) or peer_var.get() or None,
            **fields,
        }
        self._log.info(json.dumps(record, sort_keys=True))


def outcome_of(error: BaseException | None) -> str:
    """'ok', or the refusal's kind and message (domain errors carry no secrets)."""
    return "ok" if error is None else f"{type(error).__name__}: {error}"
