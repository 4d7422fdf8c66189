from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy.engine import (
    BASE,
    PROMETHEUS,
    RUN_ID,
    Podman,
    build_netswap,
    debian_image,
    sweep_stale_images,
)

# Filled by test_image_is_lean; printed at the end of the run (measured, never asserted).
IMAGE_REPORT: list[str] = []


@pytest.fixture(scope="session")
def podman() -> Podman:
    podman = Podman.here()
    sweep_stale_images(podman)
    return podman


@pytest.fixture(scope="session")
def base_image(podman: Podman) -> str:
    return debian_image(podman, BASE)


@pytest.fixture(scope="session")
def prometheus_image(podman: Podman) -> str:
    return debian_image(podman, PROMETHEUS)


@pytest.fixture(scope="session")
def netswap_image(podman: Podman, base_image: str) -> Iterator[str]:
    """deploy/Dockerfile built on the local base, under a tag of this run's own."""
    tag = f"localhost/netswap-test/netswap:{RUN_ID}"
    build_netswap(podman, base_image, tag)
    yield tag
    podman("rmi", "--force", tag, check=False)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if IMAGE_REPORT:
        terminalreporter.section("server image (deploy/Dockerfile on the local Debian base)")
        for line in IMAGE_REPORT:
            terminalreporter.write_line(line)
