"""The server image as an operator runs it: built from deploy/Dockerfile, set up and started by
the shell blocks of docs/container.md, then checked from the host with the real client."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netswap.client import TlsFiles
from netswap.client.sync import SwapClient
from tests.deploy.conftest import IMAGE_REPORT
from tests.deploy.engine import RUN_ID, VENV_BIN, Podman, run
from tests.helpers import PS, free_port, pattern

pytestmark = [pytest.mark.container, pytest.mark.root, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = ROOT / "docs" / "container.md"
UID = 10001


def doc_block(name: str) -> str:
    """The shell block that follows `<!-- test: NAME -->` in docs/container.md."""
    found = re.search(rf"<!-- test: {name} -->\n```sh\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert found, f"docs/container.md has no block marked <!-- test: {name} -->"
    return found.group(1)


def as_here(script: str, replacements: dict[str, str]) -> str:
    """The documented commands with this test's paths, names and ports in place of the docs'."""
    for documented, here in replacements.items():
        assert documented in script, f"docs/container.md no longer says {documented!r}"
        script = script.replace(documented, here)
    return script


@dataclasses.dataclass
class Served:
    podman: Podman
    image: str
    name: str
    volume: str
    work: Path  # the operator's working directory: certs/, alice.token
    srv: Path  # the host side of the mounts (the docs' /srv/netswap)
    grpc_port: int
    metrics_port: int

    def netswap(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The host's client CLI, as docs/container.md runs it."""
        argv = [
            str(VENV_BIN / "netswap"), "--server", f"127.0.0.1:{self.grpc_port}",
            "--tls-ca", "certs/ca.pem", "--token-file", "alice.token", *args,
        ]  # fmt: skip
        return run(argv, self.podman.env, cwd=self.work, timeout=120)

    def client(self) -> SwapClient:
        token = (self.work / "alice.token").read_text().strip()
        return SwapClient(
            f"127.0.0.1:{self.grpc_port}", token, timeout=30, tls=TlsFiles(ca=self.work / "certs" / "ca.pem")
        )

    def inspect(self) -> Any:
        """`podman container inspect`'s JSON for this container."""
        return json.loads(self.podman("container", "inspect", self.name).stdout)[0]

    def wait_healthy(self, seconds: float = 60) -> None:
        """`podman healthcheck run` until the image's HEALTHCHECK passes (no systemd here to run it)."""
        deadline = time.monotonic() + seconds
        while True:
            check = self.podman("healthcheck", "run", self.name, check=False)
            if check.returncode == 0:
                return
            assert time.monotonic() < deadline, f"{check.stderr}\n{self.logs()}"
            time.sleep(0.5)

    def logs(self) -> str:
        done = self.podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def exec(self, *argv: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.podman("exec", *(["--user", user] if user else []), self.name, *argv, check=False)


@pytest.fixture(scope="module")
def served(podman: Podman, netswap_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("operator")
    s = Served(
        podman, netswap_image, f"netswap-test-{RUN_ID}", f"netswap-test-store-{RUN_ID}",
        work, work / "srv", free_port(), free_port(),
    )  # fmt: skip
    # The docs' trial certificates (`netswap-server gen-dev-certs certs`, host side).
    run([str(VENV_BIN / "netswap-server"), "gen-dev-certs", "certs"], podman.env, cwd=work)
    script = as_here(
        doc_block("prepare") + doc_block("run"),
        {
            "/srv/netswap": str(s.srv),
            "netswap:0.1.0": s.image,
            "netswap-store": s.volume,
            "--name netswap ": f"--name {s.name} ",
            "127.0.0.1:50051:": f"127.0.0.1:{s.grpc_port}:",
            "127.0.0.1:9108:": f"127.0.0.1:{s.metrics_port}:",
        },
    )
    try:
        run(["bash", "-euo", "pipefail", "-c", script], podman.env, cwd=work, timeout=300)
        s.wait_healthy()
        yield s
    finally:
        podman("rm", "--force", "--time", "0", s.name, check=False)
        podman("volume", "rm", "--force", s.volume, check=False)


def test_runs_as_uid_10001_on_a_read_only_root(served: Served) -> None:
    info = served.inspect()
    assert info["Config"]["User"] == f"{UID}:{UID}"
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    status = served.exec("cat", "/proc/1/status").stdout
    assert re.search(rf"^Uid:\s+{UID}\s+{UID}\s+{UID}\s+{UID}$", status, re.MULTILINE), status
    assert re.search(r"^CapEff:\s+0+$", status, re.MULTILINE), status  # --cap-drop ALL
    assert "netswap-server" in served.exec("cat", "/proc/1/cmdline").stdout
    # Not even root in the container can write its root file system.
    for path in ("/opt/netswap/probe", "/etc/probe", "/probe"):
        touched = served.exec("touch", path, user="0")
        assert touched.returncode != 0 and "Read-only file system" in touched.stderr, (path, touched)


def test_store_on_a_volume_tokens_read_only_and_demo_from_the_host(served: Served) -> None:
    mounts = {m["Destination"]: m for m in served.inspect()["Mounts"]}
    store = mounts["/var/lib/netswap"]
    assert store["Type"] == "volume" and store["Name"] == served.volume, store
    for secret in ("/etc/netswap/tokens", "/etc/netswap/tls"):
        assert mounts[secret]["RW"] is False, mounts[secret]
    touched = served.exec("touch", "/etc/netswap/tokens/probe")
    assert "Read-only file system" in touched.stderr, touched
    tokens = served.srv / "tokens" / "tokens.toml"  # made by gen-token inside the image
    st = tokens.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (UID, 0o600)

    demo = served.netswap("demo", "--size", "16MiB", "--name", "from-host", "--keep")
    assert "verified: all 4096 pages read back byte-identical" in demo.stdout, demo
    assert "from-host" in served.netswap("ls").stdout
    # The pages are in the volume's file system on the host, written by UID 10001.
    where = served.podman("volume", "inspect", served.volume, "--format", "{{.Mountpoint}}").stdout.strip()
    stored = [p for p in Path(where, "store").rglob("*") if p.is_file()]
    assert stored and all(p.stat().st_uid == UID for p in stored), stored
    assert sum(p.stat().st_blocks * 512 for p in stored) >= 4096 * PS
    served.netswap("swapoff", "from-host")


def test_health_check_and_metrics(served: Served) -> None:
    image: list[dict[str, dict[str, list[str]]]] = json.loads(
        served.podman("image", "inspect", served.image).stdout
    )
    assert image[0]["Healthcheck"]["Test"] == ["CMD", "netswap-server", "healthcheck"]
    served.wait_healthy(seconds=0)
    assert served.inspect()["State"]["Health"]["Status"] == "healthy"
    with urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=10) as r:
        scraped = r.read().decode()
    assert "netswap_capacity_bytes 8.589934592e+09" in scraped  # the image's NETSWAP_CAPACITY
    lint = subprocess.run(["promtool", "check", "metrics"], input=scraped, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_pages_survive_stop_and_start(served: Served) -> None:
    slots = [0, 1, 2, 500, 1023]
    data = pattern(19, len(slots))
    with served.client() as client:
        area = client.swapon("kept", 4 << 20)
        assert area.created
        area.swap_out(slots, data)

    served.podman("stop", served.name, timeout=60)
    state = served.inspect()["State"]
    assert state["ExitCode"] == 0, served.logs()
    assert "stopped" in served.logs()  # drained and shut down on SIGTERM
    served.podman("start", served.name)
    served.wait_healthy()

    with served.client() as client:
        assert {a.name: a.pages_stored for a in client.list_areas()}["kept"] == len(slots)
        area = client.swapon("kept", 4 << 20)
        assert not area.created  # re-attached, not made anew
        with area.swap_in(slots) as pages:
            assert bytes(pages.view) == data
        area.swapoff()


@pytest.mark.parametrize(
    ("owner", "mode", "message"),
    [
        (0, 0o600, "owned by uid 0 (mode 0600) and this server runs as uid 10001"),
        (UID, 0o640, "is accessible to group or others (mode 0640); run: chmod 600"),
    ],
    ids=["root-owned", "group-readable"],
)
def test_bad_tokens_file_stops_it_with_a_clear_message(
    podman: Podman, netswap_image: str, tmp_path: Path, owner: int, mode: int, message: str
) -> None:
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    os.chown(tokens, UID, UID)
    (tokens / "tokens.toml").write_text('[principals.alice]\ntoken_sha256 = "' + "0" * 64 + '"\n')
    os.chown(tokens / "tokens.toml", owner, owner)
    os.chmod(tokens / "tokens.toml", mode)
    name = f"netswap-test-bad-{RUN_ID}-{owner}-{mode:o}"
    started = podman(
        "run", "--name", name, "--read-only", "--network", "none", "--env", "NETSWAP_INSECURE=1",
        "--env", "NETSWAP_TLS_CERT=", "--env", "NETSWAP_TLS_KEY=",  # TLS is not what fails here
        "-v", f"{tokens}:/etc/netswap/tokens:ro", netswap_image,
        check=False, timeout=120,
    )  # fmt: skip
    podman("rm", "--force", "--volumes", "--time", "0", name)
    out = started.stdout + started.stderr
    assert started.returncode == 1, out
    assert message in out and "serving on" not in out, out


# What an image has no business shipping: a compiler, a linker, make, pip.
BUILD_TOOLS = re.compile(
    r"(?:x86_64-linux-gnu-)?(?:gcc|g\+\+|cc|c\+\+|cpp|clang|ld|as|make|pip3?)(?:-[\d.]+|[\d.]+)?"
)


def tree_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def test_image_is_lean(podman: Podman, netswap_image: str) -> None:
    size = int(podman("image", "inspect", "--format", "{{.Size}}", netswap_image).stdout)
    root = Path(podman("image", "mount", netswap_image).stdout.strip())
    try:
        tools = sorted(
            str(p.relative_to(root))
            for p in root.rglob("*")
            if BUILD_TOOLS.fullmatch(p.name) and not p.is_dir() and os.access(p, os.X_OK)
        )
        assert tools == [], tools
        (site,) = (root / "opt/netswap/lib").glob("python3*/site-packages")
        packages = {p.name.split("-")[0]: p.name[:-10] for p in site.glob("*.dist-info")}
        assert not {"pip", "setuptools", "wheel"} & packages.keys(), packages
        assert "netswap" in packages
        sizes = {d.name: tree_bytes(d) for d in site.iterdir() if d.is_dir() and not d.name.endswith("-info")}
        venv = tree_bytes(root / "opt/netswap")
    finally:
        podman("image", "unmount", netswap_image)
    # Neither the venv nor the base (the official image ships pip) leaves an importable pip.
    probe = "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('pip', 'setuptools')))"
    podman("run", "--rm", "--network", "none", "--read-only", netswap_image, "python3", "-c", probe)

    mb = 1e6
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    IMAGE_REPORT.extend(
        [
            f"image {size / mb:.0f} MB (podman image inspect .Size); /opt/netswap venv {venv / mb:.0f} MB,"
            f" the rest is the base",
            "largest in the venv: " + ", ".join(f"{name} {n / mb:.1f} MB" for name, n in largest),
            "venv packages: " + ", ".join(sorted(packages.values())),
            "no pip, setuptools, compiler, linker or make in the image",
        ]
    )
