"""Podman as the container tests run it, and the images they need that no registry gives here.

Everything persistent lives under CACHE: podman's own storage (so the tests never touch the
machine's default one) and, in it, Debian images made with mmdebstrap from this machine's apt
sources, tagged with a hash of everything that goes into them. `rm -rf CACHE` starts afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
CACHE = Path("/var/cache/netswap-test")
RUNROOT = Path("/run/netswap-test")
# Tags, names and projects of one pytest run: runs in other worktrees share CACHE.
RUN_ID = f"{os.getpid()}-{secrets.token_hex(3)}"
VENV_BIN = Path(sys.executable).parent
TOOLS = ("podman", "runc", "mmdebstrap", "netavark", "aardvark-dns")

CONTAINERS_CONF = """\
[containers]
# Debian's default raises RLIMIT_NOFILE, which this machine's root (no CAP_SYS_RESOURCE) cannot.
default_ulimits = []

[engine]
# crun refuses this machine's hybrid cgroup v1/v2 layout; runc takes it.
runtime = "runc"
# No systemd to delegate cgroups to.
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

# Host-side trust for the build's downloads: this machine reaches PyPI through a proxy whose
# CA only the host's bundle holds. Mounted into RUN steps only, so no layer keeps it.
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@dataclasses.dataclass(frozen=True)
class Podman:
    env: dict[str, str]

    @classmethod
    def here(cls) -> Podman:
        missing = [t for t in TOOLS if shutil.which(t) is None and not Path(f"/usr/lib/podman/{t}").exists()]
        if missing:
            raise RuntimeError(f"{' '.join(missing)} missing: `make test` installs them (Makefile)")
        CACHE.mkdir(parents=True, exist_ok=True)
        conf = replace_file(CACHE / "containers.conf", CONTAINERS_CONF)
        storage = replace_file(
            CACHE / "storage.conf",
            f'[storage]\ndriver = "overlay"\ngraphroot = "{CACHE / "storage"}"\nrunroot = "{RUNROOT}"\n',
        )
        env = {
            **os.environ,
            "CONTAINERS_CONF": str(conf),
            "CONTAINERS_STORAGE_CONF": str(storage),
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        }
        return cls(env)

    def __call__(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        cwd: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run(["podman", *args], self.env | (extra_env or {}), check=check, timeout=timeout, cwd=cwd)


def replace_file(path: Path, text: str) -> Path:
    """Write `path` whole in one rename: a podman of a concurrent run may be reading it."""
    if not path.exists() or path.read_text() != text:
        partial = path.with_name(f".{path.name}.{RUN_ID}")
        partial.write_text(text)
        partial.replace(path)
    return path


def run(
    argv: list[str], env: dict[str, str], *, check: bool = True, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclasses.dataclass(frozen=True)
class DebianImage:
    """A bookworm root file system from Debian's packages, imported as an image."""

    name: str
    packages: tuple[str, ...]
    changes: tuple[str, ...]  # Dockerfile instructions for `podman import --change`
    hooks: tuple[str, ...] = ()  # mmdebstrap --customize-hook commands ("$1" is the root)


# Stands in for python:3.11-slim-bookworm: Debian's python3 (3.11), the venv module the
# Dockerfile's builder stage uses, CA certificates, netbase and tzdata, as the official has.
BASE = DebianImage(
    "base",
    ("python3", "python3-venv", "ca-certificates", "netbase", "tzdata"),
    (
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        'CMD ["python3"]',
    ),
)

# Stands in for prom/prometheus in deploy/compose.yaml: Debian's Prometheus with the
# official image's interface (entrypoint, flags, data directory, user).
PROMETHEUS = DebianImage(
    "prometheus",
    ("prometheus",),
    (
        "USER nobody",
        "WORKDIR /prometheus",
        'ENTRYPOINT ["/usr/bin/prometheus"]',
        'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]',
        "EXPOSE 9090",
    ),
    ('install -d -o 65534 -g 65534 -m 0755 "$1/prometheus"',),
)

# minbase and no docs, man pages or translations, like Debian's slim images; merged /usr
# without the usrmerge package (and the Perl it pulls in).
MMDEBSTRAP_OPTIONS = (
    "--variant=minbase",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")),
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
)


def debian_sources() -> Path:
    for candidate in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if candidate.exists():
            return candidate
    raise RuntimeError("no Debian apt sources on this machine to build images from")


def debian_image(podman: Podman, image: DebianImage) -> str:
    """The image's tag, built (about half a minute) unless an image with the same inputs exists."""
    sources = debian_sources()
    argv = [
        "mmdebstrap",
        *MMDEBSTRAP_OPTIONS,
        f"--include={','.join(image.packages)}",
        *(f"--customize-hook={hook}" for hook in image.hooks),
        "--format=tar",
        "bookworm",
    ]
    key = hashlib.sha256(json.dumps([argv, sources.read_text(), image.changes]).encode()).hexdigest()[:16]
    tag = f"localhost/netswap-test/{image.name}:{key}"
    with locked(CACHE / "images.lock"):
        if podman("image", "exists", tag, check=False).returncode == 0:
            return tag
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            rootfs = Path(tmp) / "rootfs.tar"
            run([*argv, str(rootfs), str(sources)], podman.env, timeout=900)
            podman("import", *(f"--change={c}" for c in image.changes), str(rootfs), tag, timeout=300)
    return tag


def build_args(base: str) -> list[str]:
    """What `podman build` needs here beyond the operator's command (docs/container.md)."""
    return ["--pull=never", "--build-arg", f"BASE_IMAGE={base}", "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]


# Tests build with this beyond the operator's command: no intermediate image per step, which
# every run would otherwise leave behind (the build context changes with each commit).
NO_LAYERS = "--layers=false"


def build_netswap(podman: Podman, base: str, tag: str) -> None:
    podman(
        "build", NO_LAYERS, "--format", "docker", *build_args(base), "-f", "deploy/Dockerfile", "-t", tag, ".",
        cwd=ROOT, timeout=900,
    )  # fmt: skip


def sweep_stale_images(podman: Podman) -> None:
    """Removes the images of test runs whose process is gone (killed runs skip their teardown)."""
    listed = podman(
        "images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", "reference=localhost/netswap-test/*"
    )
    for ref in listed.stdout.split():
        name, _, tag = ref.rpartition("/")[2].partition(":")
        owner = tag.partition("-")[0]
        if name in ("netswap", "netswap-compose") and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            podman("rmi", "--force", ref, check=False)
    podman("image", "prune", "--force", check=False)
