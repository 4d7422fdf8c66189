from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import Running, running_server


@pytest.fixture(params=["memory", "file"])
async def srv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Running]:
    """A real in-process server on port 0, once per store."""
    async with running_server(tmp_path, request.param) as running:
        yield running
