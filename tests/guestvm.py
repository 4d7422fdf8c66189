"""Boot a real Linux guest under QEMU whose swap disk is an NBD export, and make it swap hard.

`guest_assets` fetches Debian's cloud kernel and builds a busybox initramfs around
tests/guest/init.sh and tests/guest/hog.c; `run_guest` boots it against an NBD URI
and reports what the guest saw. Needs qemu-system-x86, busybox-static, gcc and apt.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import lzma
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

GUEST_SRC = Path(__file__).resolve().parent / "guest"
KERNEL_META = "linux-image-cloud-amd64"
# The cloud kernel builds virtio as modules; insmod has no dependency resolution
# (and the .deb ships no modules.dep), so this is the load order.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
)
GUEST_OK = 16  # init.sh's success code; QEMU turns guest code N into exit status 2N+1


@dataclasses.dataclass(frozen=True)
class GuestAssets:
    kernel: Path
    initramfs: Path
    kernel_version: str


@dataclasses.dataclass(frozen=True)
class GuestResult:
    ok: bool
    exit_status: int
    pswpout: int | None
    pswpin: int | None
    seconds: float
    console: str

    @property
    def verdict(self) -> str:
        """The guest's GUEST-RESULT line, or why there is none: for assertion messages."""
        lines = re.findall(r"^GUEST-RESULT .*$", self.console, re.MULTILINE)
        if lines:
            return str(lines[-1])
        why = " (timeout)" if self.exit_status == 124 else ""
        return f"no GUEST-RESULT line; exit status {self.exit_status}{why}"


def _run(argv: list[str], *, cwd: Path | None = None, stdin: bytes | None = None) -> bytes:
    """Run a build step; a failure names the command and carries its stderr."""
    proc = subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(argv)} failed with status {proc.returncode}:\n{err}")
    return proc.stdout


def _kernel_package() -> str:
    """The versioned package the metapackage currently points at."""
    for attempt in range(2):
        try:
            out = _run(["apt-cache", "depends", KERNEL_META]).decode()
        except RuntimeError:
            out = ""
        found = re.findall(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
        if found:
            return str(found[0])
        if attempt == 0:  # fresh containers often have empty apt lists
            _run(["apt-get", "update"])
    raise RuntimeError(f"apt-cache depends {KERNEL_META} names no linux-image-*-cloud-amd64 package")


def _kernel_tree(kdir: Path) -> Path:
    """Download and unpack the kernel once; later calls reuse the .deb and tree in kdir."""
    tree = kdir / "root"
    if tree.is_dir():
        return tree
    kdir.mkdir(parents=True, exist_ok=True)
    debs = sorted(kdir.glob("linux-image-*-cloud-amd64_*.deb"))
    if not debs:
        # The sandbox option only silences apt's warning that _apt cannot write here.
        _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", _kernel_package()], cwd=kdir)
        debs = sorted(kdir.glob("linux-image-*-cloud-amd64_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download left no kernel .deb in {kdir}")
    # Unpack beside the target and rename, so an interrupted run never looks cached.
    with tempfile.TemporaryDirectory(dir=kdir) as tmp:
        _run(["dpkg-deb", "-x", str(debs[-1]), tmp])
        Path(tmp).rename(tree)
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    return tree


def _module_bytes(moddir: Path, name: str) -> bytes | None:
    """A module's ELF bytes, decompressed: busybox insmod cannot load .ko.xz/.ko.zst.

    None means the kernel has it built in (nothing to load).
    """
    for path in sorted(moddir.glob(f"kernel/**/{name}.ko*")):
        data = path.read_bytes()
        if path.suffix == ".ko":
            return data
        if path.suffix == ".xz":
            return lzma.decompress(data)
        if path.suffix == ".gz":
            return gzip.decompress(data)
        if path.suffix == ".zst":
            return _run(["zstd", "-dc", str(path)])
    builtin = moddir / "modules.builtin"
    if builtin.exists() and re.search(rf"/{name}\.ko$", builtin.read_text(), re.MULTILINE):
        return None
    raise RuntimeError(f"module {name} neither in {moddir}/kernel nor built in")


def build_initramfs(out: Path, moddir: Path, files: dict[str, Path], modules: tuple[str, ...]) -> None:
    """A gzipped busybox initramfs at out: files (name in the archive -> source; "init"
    among them), and modules/ holding each module's ELF, with modules/order to insmod them by."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox not found (apt-get install busybox-static)")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "tmp", "modules"):
            (root / d).mkdir()
        shutil.copy(busybox, root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("busybox")  # for init's #!/bin/sh
        for name, src in files.items():
            shutil.copy(src, root / name)
            (root / name).chmod(0o755)
        order = []
        for name in modules:
            data = _module_bytes(moddir, name)
            if data is not None:
                (root / "modules" / f"{name}.ko").write_bytes(data)
                order.append(name)
        (root / "modules" / "order").write_text("".join(f"{m}\n" for m in order))
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        cpio = _run([busybox, "cpio", "-o", "-H", "newc"], cwd=root, stdin="\n".join(names).encode())
    partial = out.with_suffix(".partial")
    partial.write_bytes(gzip.compress(cpio, compresslevel=6))
    partial.rename(out)


@dataclasses.dataclass(frozen=True)
class Kernel:
    image: Path
    version: str
    moddir: Path  # lib/modules/VERSION of the unpacked package


def kernel(build_dir: Path) -> Kernel:
    """Debian's cloud kernel, fetched once into build_dir/kernel."""
    tree = _kernel_tree(build_dir.resolve() / "kernel")
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise RuntimeError(f"no boot/vmlinuz-* in {tree}")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    return Kernel(image=kernels[-1], version=version, moddir=tree / "lib" / "modules" / version)


def input_key(*parts: bytes) -> str:
    """A short hash naming a build product after everything it is made from."""
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def build_hog(build_dir: Path) -> Path:
    """tests/guest/hog.c as a static binary, rebuilt when the source changes."""
    build_dir = build_dir.resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    hog = build_dir / f"hog-{input_key((GUEST_SRC / 'hog.c').read_bytes())}"
    if not hog.exists():
        partial = hog.with_suffix(".partial")
        _run(["gcc", "-static", "-O2", "-Wall", "-o", str(partial), str(GUEST_SRC / "hog.c")])
        partial.rename(hog)
    return hog


def remove_stale(build_dir: Path, pattern: str, keep: Path) -> None:
    """Delete earlier builds matching pattern, all but keep."""
    for stale in build_dir.glob(pattern):
        if stale != keep:
            stale.unlink()


def guest_assets(build_dir: Path) -> GuestAssets:
    """Kernel + initramfs under build_dir, rebuilt only when their inputs change.

    The kernel is fetched once. The initramfs is keyed by a hash of the hog,
    init.sh, the kernel version and this module's module list, so an edit
    to either guest file produces a new initramfs on the next call.
    """
    build_dir = build_dir.resolve()
    k = kernel(build_dir)
    hog = build_hog(build_dir)
    init = GUEST_SRC / "init.sh"
    key = input_key(hog.read_bytes(), init.read_bytes(), k.version.encode(), " ".join(MODULES).encode())
    initramfs = build_dir / f"initramfs-{key}.cpio.gz"
    if not initramfs.exists():
        build_initramfs(initramfs, k.moddir, {"init": init, "hog": hog}, MODULES)
        remove_stale(build_dir, "initramfs-*.cpio.gz", initramfs)
    return GuestAssets(kernel=k.image, initramfs=initramfs, kernel_version=k.version)


def _last_int(pattern: str, text: str) -> int | None:
    found = re.findall(pattern, text)
    return int(found[-1]) if found else None


def run_guest(
    assets: GuestAssets,
    nbd_uri: str,
    *,
    memory_mb: int = 96,
    hog_mib: int = 280,
    hog_same: int = 0,
    min_pswpout: int = 50000,
    timeout: float = 900,
) -> GuestResult:
    """Boot the guest with nbd_uri (e.g. nbd+unix:///?socket=/x.sock) as its swap disk.

    `hog_same` percent of the hog's pages are same-filled (mostly zeros; see hog.c).

    ok means the guest itself reported success: the hog verified every page and
    pswpout exceeded min_pswpout. Any other outcome (guest failure code, panic,
    QEMU error, timeout) is ok=False with the console for diagnosis.
    """
    # QEMU option values escape a literal comma by doubling it.
    drive = ["-drive", f"file={nbd_uri.replace(',', ',,')},format=raw,if=virtio,cache=none"]
    return boot(
        assets.kernel,
        assets.initramfs,
        f"hog_mib={hog_mib} hog_same={hog_same} min_pswpout={min_pswpout}",
        drive,
        memory_mb=memory_mb,
        timeout=timeout,
    )


def boot(
    kernel: Path,
    initramfs: Path,
    append: str,
    devices: list[str],
    *,
    memory_mb: int,
    timeout: float,
    console_log: Path | None = None,
) -> GuestResult:
    """Boot kernel + initramfs under QEMU TCG with `devices` (QEMU arguments), until the
    guest ends QEMU through isa-debug-exit, panics, or `timeout` passes.

    The console goes to console_log as it is written (tail -f it during a long run).
    """
    append = f"console=ttyS0 panic=-1 {append}"
    argv = ["timeout", "--kill-after=10", str(timeout), "qemu-system-x86_64"]
    argv += ["-machine", "q35,accel=tcg", "-m", str(memory_mb)]  # no usable KVM here
    # -nodefaults drops the NIC and VGA a test does not ask for; the serial
    # port on stdio is the console we capture.
    argv += ["-nodefaults", "-display", "none", "-serial", "stdio"]
    argv += ["-no-reboot"]  # panic=-1 reboots at once; this makes that reboot end QEMU
    argv += ["-kernel", str(kernel), "-initrd", str(initramfs), "-append", append, *devices]
    argv += ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
    # QEMU's NBD client fails requests silently; these trace points say why
    # (they print only on failure, into the captured output).
    for event in ("nbd_read_reply_entry_fail", "nbd_co_request_fail", "nbd_unknown_error"):
        argv += ["-trace", event]
    start = time.monotonic()
    with tempfile.TemporaryFile() if console_log is None else console_log.open("w+b") as log:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout + 30,  # backstop only: `timeout` should always end it first
        )
        seconds = time.monotonic() - start
        log.seek(0)
        console = log.read().decode(errors="replace").replace("\r\n", "\n")
    # Both the exit status and the marker line: a stray write to the port
    # alone, or a marker echoed by a dying guest alone, must not pass.
    ok = (
        proc.returncode == 2 * GUEST_OK + 1
        and re.search(r"^GUEST-RESULT ok ", console, re.MULTILINE) is not None
    )
    return GuestResult(
        ok=ok,
        exit_status=proc.returncode,
        pswpout=_last_int(r"\bpswpout=(\d+)", console),
        pswpin=_last_int(r"\bpswpin=(\d+)", console),
        seconds=seconds,
        console=console,
    )
