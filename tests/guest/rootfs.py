"""The root file system of a guest that runs `netswap nbd` itself: an ext4 image built from this host.

It holds the host's Python (at the same prefix, so nothing needs relocating),
a virtualenv at /opt/netswap -- where deploy/vm's units expect it -- with
netswap installed from a wheel of this tree and its dependencies copied from
the project's virtualenv, Debian's nbd-client, kmod, util-linux's swap tools,
busybox for the rest, the kernel modules the units load, and the hog. Every
binary brings the shared libraries ldd names for it. The image is keyed by
its inputs and rebuilt only when one changes.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from packaging.requirements import Requirement

from tests.guestvm import Kernel, input_key, remove_stale

ROOT = Path(__file__).resolve().parent.parent.parent
GUEST_SRC = Path(__file__).resolve().parent
VENV = "/opt/netswap"  # deploy/vm/netswap-nbd.service runs /opt/netswap/bin/netswap
INIT = "/sbin/netswap-guest-init"
# The package's own sources: a change to any of them is a new wheel and a new image.
PACKAGE_DIRS = ("proto", "server", "client", "common")
# Debian's binaries the units and the guest's init call, at the paths they call them by.
DEBIAN_TOOLS = {
    "/usr/sbin/nbd-client": "/usr/sbin/nbd-client",
    "/usr/bin/kmod": "/usr/bin/kmod",
    "/usr/sbin/mkswap": "/usr/sbin/mkswap",
    "/usr/sbin/swapon": "/usr/sbin/swapon",
    "/usr/sbin/swapoff": "/usr/sbin/swapoff",
}
KMOD_LINKS = ("modprobe", "insmod", "lsmod", "rmmod", "depmod", "modinfo")
# The modules loaded after the switch to this root (the disk's own are in the initramfs).
MODULES = ("nbd", "virtio_net")
# Parts of the standard library a daemon never imports.
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages"}
ELF_MAGIC = b"\x7fELF"


def _run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with status {proc.returncode}:\n{proc.stderr}")
    return proc.stdout


def _package_sources() -> list[Path]:
    files = [ROOT / "pyproject.toml", ROOT / "README.md"]
    for d in PACKAGE_DIRS:
        files += sorted(p for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return files


def runtime_distributions() -> list[importlib.metadata.Distribution]:
    """netswap's dependencies as installed in this virtualenv, transitively, without extras."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(importlib.metadata.requires("netswap") or [])
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in found:
            continue
        found[name] = importlib.metadata.distribution(req.name)
        todo += found[name].requires or []
    return [found[n] for n in sorted(found)]


def _tools() -> dict[str, Path]:
    """Where each tool lives in the image -> its file on this host; a missing one is a set-up bug."""
    tools = {}
    for dest, src in DEBIAN_TOOLS.items():
        if not Path(src).is_file():
            raise RuntimeError(f"{src} missing: `make test` installs it (Makefile DEBIAN_TEST_PACKAGES)")
        tools[dest] = Path(src)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox missing: `make test` installs busybox-static")
    tools["/usr/bin/busybox"] = Path(busybox)
    return tools


def image_key(kernel: Kernel, hog: Path) -> str:
    """Everything the image is made from, hashed: sources, versions, binaries and this builder."""
    parts = [f"{sys.version} {sys.base_prefix} {kernel.version}".encode()]
    parts += [f"{d.metadata['Name']}=={d.version}".encode() for d in runtime_distributions()]
    parts += [f"{p.relative_to(ROOT)}".encode() + p.read_bytes() for p in _package_sources()]
    parts += [(GUEST_SRC / name).read_bytes() for name in ("inside_vm.sh", "stallwatch.c")]
    parts += [Path(__file__).read_bytes(), hog.read_bytes()]
    for dest, src in sorted(_tools().items()):
        st = src.stat()
        parts.append(f"{dest} {src} {st.st_size} {st.st_mtime_ns}".encode())
    return input_key(*parts)


class Stage:
    """A directory laid out as the guest's / (merged /usr, as Debian 12 has)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "etc/netswap", "opt", "root"):
            (root / d).mkdir(parents=True, exist_ok=True)
        for link in ("bin", "sbin", "lib", "lib64"):
            (root / link).symlink_to(f"usr/{link}")
        for d in ("proc", "sys", "dev", "run", "tmp"):
            (root / d).mkdir()

    def path(self, guest: str) -> Path:
        return self.root / guest.lstrip("/")

    def copy(self, src: Path, guest: str) -> None:
        dest = self.path(guest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)

    def copy_library(self, host: str) -> None:
        """A library at its host path, with its symlink chain (libfoo.so.1 -> libfoo.so.1.2.3)."""
        path = Path(host)
        while True:
            dest = self.path(str(path))
            if dest.exists() or dest.is_symlink():
                return
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():
                target = os.readlink(path)
                dest.symlink_to(target)
                path = path.parent / target
            else:
                shutil.copy2(path, dest)
                return

    def elves(self) -> list[Path]:
        found = []
        for p in self.root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                with p.open("rb") as f:
                    if f.read(4) == ELF_MAGIC:
                        found.append(p)
        return found

    def add_libraries(self) -> None:
        """Every shared library any ELF file in the stage needs (ldd, run on the host copies)."""
        needed: set[str] = set()
        for elf in self.elves():
            proc = subprocess.run(["ldd", str(elf)], capture_output=True, text=True)
            if proc.returncode != 0:  # static executables: "not a dynamic executable"
                continue
            for line in proc.stdout.splitlines():
                if "not found" in line:
                    raise RuntimeError(f"{elf}: {line.strip()}")
                match = re.search(r"(/\S+) \(0x", line)
                if match:
                    needed.add(match.group(1))
        for lib in sorted(needed):
            if not self.path(lib).exists():
                self.copy_library(lib)


def _add_python(stage: Stage) -> None:
    """This Python's installation at its own prefix, less what a daemon never imports."""
    prefix = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    stage.copy(prefix / "bin" / version, f"{prefix}/bin/{version}")
    for lib in sorted((prefix / "lib").glob("libpython*.so*")):
        stage.copy_library(str(lib))

    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n.endswith(".pyc") and ".opt-" in n}  # only the plain bytecode
        if Path(directory) == stdlib:
            skip |= {n for n in names if n in STDLIB_SKIP or n.startswith("config-")}
        if Path(directory).name == "lib-dynload":
            skip |= {n for n in names if n.startswith("_tkinter")}  # it brings X11
        return skip

    shutil.copytree(stdlib, stage.path(str(stdlib)), symlinks=True, ignore=ignore)
    (stage.path(str(stdlib)) / "site-packages").mkdir()


def _build_wheel(out: Path) -> Path:
    """A wheel of this tree, built from a clean copy (setuptools' build/ could hold stale files)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for f in _package_sources():
            dest = src / f.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src))
    (wheel,) = out.glob("netswap-*.whl")
    return wheel


def _add_venv(stage: Stage, wheel: Path) -> None:
    """/opt/netswap: a virtualenv of this Python with netswap and its dependencies."""
    venv = stage.path(VENV)
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    _run(str(base), "-m", "venv", "--without-pip", str(venv))
    _run(sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
         "--no-deps", "--no-index", "--no-compile", str(wheel))  # fmt: skip
    # Its scripts' #! lines and pyvenv.cfg name the staging path; in the guest it is VENV.
    for f in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if f.is_file() and not f.is_symlink():
            text = f.read_bytes()
            if str(venv).encode() in text:
                f.write_bytes(text.replace(str(venv).encode(), VENV.encode()))
    site = Path(sysconfig.get_paths(vars={"base": str(venv)})["purelib"])
    for dist in runtime_distributions():
        for rel in dist.files or []:
            src = Path(str(dist.locate_file(rel)))
            if rel.parts[0] == ".." or "__pycache__" in rel.parts or not src.is_file():
                continue  # scripts outside site-packages, and bytecode: compiled below
            dest = site / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    # Bytecode that needs no source check: imports under TCG are slow enough.
    _run(sys.executable, "-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash", str(site))


def _add_modules(stage: Stage, kernel: Kernel) -> None:
    """MODULES and what they depend on, with modules.dep from depmod for kmod's modprobe."""
    dest_root = stage.path(f"/lib/modules/{kernel.version}")
    todo, seen = list(MODULES), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        (path,) = kernel.moddir.glob(f"kernel/**/{name}.ko*")
        dest = dest_root / path.relative_to(kernel.moddir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
        todo += [d for d in _run("modinfo", "-F", "depends", str(path)).strip().split(",") if d]
    for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (kernel.moddir / meta).exists():
            shutil.copy2(kernel.moddir / meta, dest_root / meta)
    _run("depmod", "-b", str(stage.root), kernel.version)


def _add_tools(stage: Stage, hog: Path) -> None:
    for dest, src in _tools().items():
        stage.copy(src, dest)
    for name in KMOD_LINKS:
        dir_ = "usr/bin" if name == "lsmod" else "usr/sbin"
        (stage.root / dir_ / name).symlink_to("/usr/bin/kmod")
    # busybox for everything else, where no real tool took the name already
    for line in _run("/usr/bin/busybox", "--list-full").split():
        applet = stage.path(re.sub(r"^(s?bin)/", r"usr/\1/", line))
        if not applet.exists() and not applet.is_symlink():
            applet.parent.mkdir(parents=True, exist_ok=True)
            applet.symlink_to("/usr/bin/busybox")
    stage.copy(hog, "/usr/bin/hog")
    stallwatch = stage.path("/usr/bin/stallwatch")
    _run("gcc", "-static", "-O2", "-Wall", "-o", str(stallwatch), str(GUEST_SRC / "stallwatch.c"))
    stage.copy(GUEST_SRC / "inside_vm.sh", INIT)


def build_rootfs(build_dir: Path, kernel: Kernel, hog: Path) -> Path:
    """build_dir/rootfs-KEY.ext4, built unless an image of the same inputs exists."""
    build_dir = build_dir.resolve()
    image = build_dir / f"rootfs-{image_key(kernel, hog)}.ext4"
    if image.exists():
        return image
    with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
        stage = Stage(Path(tmp) / "root")
        _add_python(stage)
        _add_venv(stage, _build_wheel(Path(tmp) / "wheel"))
        _add_modules(stage, kernel)
        _add_tools(stage, hog)
        stage.add_libraries()
        size = sum(p.stat().st_size for p in stage.root.rglob("*") if p.is_file() and not p.is_symlink())
        blocks = (size * 5 // 4 + (64 << 20)) // 4096  # room for metadata; the guest mounts it read-only
        partial = image.with_suffix(".partial")
        _run("mke2fs", "-q", "-t", "ext4", "-b", "4096", "-L", "netswap-guest", "-d", str(stage.root),
             str(partial), str(blocks))  # fmt: skip
        partial.rename(image)
    remove_stale(build_dir, "rootfs-*.ext4", image)
    return image
