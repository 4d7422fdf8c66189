# ruff: noqa: E402  (gRPC may load only after grpcenv.apply())
from __future__ import annotations

from netswap.common import grpcenv

grpcenv.apply()  # as netswap's own processes do, before anything loads gRPC

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import Running, running_server


@pytest.fixture(params=["memory", "file"])
async def srv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Running]:
    """A real in-process server on port 0, once per store."""
    async with running_server(tmp_path, request.param) as running:
        yield running


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the guest swap test's wall times side by side (measured, never asserted)."""
    from tests.test_nbd_guest import GUEST_TIMES  # noqa: PLC0415 (only once tests ran)

    if GUEST_TIMES:
        terminalreporter.section("guest swap test wall times (QEMU TCG, 280 MiB hog, 61 MB RAM)")
        base = GUEST_TIMES.get("nbdkit memory")
        for name, seconds in GUEST_TIMES.items():
            ratio = f"  ({seconds / base:.2f}x nbdkit)" if base and name != "nbdkit memory" else ""
            terminalreporter.write_line(f"{name:46} {seconds:6.1f} s{ratio}")
