# ruff: noqa: E402  (gRPC may load only after grpcenv.apply())
from __future__ import annotations

from netswap.common import grpcenv

grpcenv.apply()  # as netswap's own processes do, before anything loads gRPC

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import Running, running_server

# The suite's peak of scratch disk is about 3 GiB (guest and fleet tests reserve file-store
# areas of up to 2 GiB); below this, tests would fail one by one with ENOSPC instead.
SCRATCH_NEEDED = 4 << 30


def pytest_sessionstart(session: pytest.Session) -> None:
    scratch = tempfile.gettempdir()
    free = shutil.disk_usage(scratch).free
    if free < SCRATCH_NEEDED and not session.config.option.collectonly:
        raise pytest.UsageError(
            f"{scratch} has {free >> 20} MiB free; the tests need {SCRATCH_NEEDED >> 30} GiB of scratch disk there"
        )


@pytest.fixture(params=["memory", "file"])
async def srv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Running]:
    """A real in-process server on port 0, once per store."""
    async with running_server(tmp_path, request.param) as running:
        yield running


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the guest swap tests' wall times side by side (measured, never asserted)."""
    from tests.guest import walltimes  # noqa: PLC0415 (only once tests ran)

    for section in walltimes.SECTIONS:
        terminalreporter.section(f"guest swap test wall times ({section})")
        for line in walltimes.lines(section):
            terminalreporter.write_line(line)
