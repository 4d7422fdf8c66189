"""gRPC's environment for netswap's own processes: set before gRPC is imported.

gRPC reads GRPC_EXPERIMENTS once, when its core loads. Since 1.6x its
EventEngine is on by default for client channels and listeners; with
grpc.aio it hands every completion through more threads before it reaches
the event loop, which lengthens a small request's round trip (more thread
wake-ups: see docs/performance.md on where a round trip goes). So netswap's
processes -- netswap-server, the netswap CLI, `netswap nbd` -- turn those
two experiments off, unless the
operator set GRPC_EXPERIMENTS already. A program using netswap.client as a
library decides for itself (call apply() before importing grpc, or export
the variable).
"""

from __future__ import annotations

import os
import sys

ENV = {"GRPC_EXPERIMENTS": "-event_engine_client,-event_engine_listener"}


def apply() -> bool:
    """Set ENV's defaults in os.environ; False if gRPC is loaded already (too late to matter)."""
    for name, value in ENV.items():
        os.environ.setdefault(name, value)
    return "grpc" not in sys.modules


def server() -> int:
    """The netswap-server command."""
    apply()
    from netswap.server.cli import main  # noqa: PLC0415 (only after apply())

    return main()


def client() -> int:
    """The netswap command."""
    apply()
    from netswap.client.cli import main  # noqa: PLC0415 (only after apply())

    return main()
