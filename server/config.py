"""The server's one Config object, filled from flags with NETSWAP_* environment equivalents."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from netswap.common.limits import PAGE_SIZE
from netswap.common.sizes import size_arg

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:50051"
    # "memory" or "file:PATH"
    store: str = "memory"
    # Total bytes all areas together may reserve.
    capacity: int = 1 * GiB
    max_area_size: int = 64 * GiB
    max_batch_pages: int = 256
    tokens: Path | None = None
    # "" disables the metrics endpoint.
    metrics_listen: str = "127.0.0.1:9108"
    # Seconds in-flight calls get to finish on SIGTERM.
    grace_seconds: float = 10.0
    # Memory store: mlock each area at swapon (refused -> RESOURCE_EXHAUSTED).
    mlock: bool = False
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.store != "memory" and not self.store.startswith("file:"):
            raise ValueError(f"--store must be 'memory' or 'file:PATH', not {self.store!r}")
        if self.store.startswith("file:") and not self.store[5:]:
            raise ValueError("--store file: needs a directory, e.g. file:/var/lib/netswap")
        if self.capacity <= 0 or self.capacity % PAGE_SIZE:
            raise ValueError(f"--capacity must be a positive multiple of {PAGE_SIZE}")
        if self.max_area_size <= 0 or self.max_area_size % PAGE_SIZE:
            raise ValueError(f"--max-area-size must be a positive multiple of {PAGE_SIZE}")
        if not 1 <= self.max_batch_pages <= 4096:
            raise ValueError("--max-batch-pages must be between 1 and 4096")
        if self.metrics_listen:
            _, sep, port = self.metrics_listen.rpartition(":")
            if not sep or not port.isdigit() or int(port) > 65535:
                raise ValueError(
                    f"--metrics-listen must be HOST:PORT (or empty), not {self.metrics_listen!r}"
                )
        if self.mlock and self.store != "memory":
            raise ValueError("--mlock applies to --store memory (file stores live in the page cache)")
        if self.grace_seconds < 0:
            raise ValueError("--grace-seconds must not be negative")

    @property
    def store_path(self) -> Path | None:
        return Path(self.store[5:]) if self.store.startswith("file:") else None


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """Flags of `netswap-server`; each defaults to NETSWAP_<FLAG> from `environ`, then Config."""
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="netswap-server",
        description="Serve netswap swap areas over gRPC. "
        "Every flag can also be set as NETSWAP_<FLAG> (e.g. NETSWAP_LISTEN).",
    )

    def add(flag: str, help: str, **kw: object) -> None:
        dest = flag.lstrip("-").replace("-", "_")
        env = "NETSWAP_" + dest.upper()
        default = environ.get(env, getattr(defaults, dest))
        parser.add_argument(flag, dest=dest, default=default, help=f"{help} [env {env}]", **kw)  # type: ignore[arg-type]

    add("--listen", "gRPC address: HOST:PORT or unix:PATH (default %(default)s)")
    add("--store", "memory, or file:DIR for areas that survive restarts (default %(default)s)")
    add("--capacity", "bytes all areas may reserve together, e.g. 8GiB", type=size_arg)
    add("--max-area-size", "largest single area, e.g. 16GiB", type=size_arg)
    add("--max-batch-pages", "most pages one SwapOut/SwapIn/Discard may carry", type=int)
    add("--tokens", "TOML file of principals and token hashes (required)", type=Path)
    add("--metrics-listen", "Prometheus HOST:PORT, empty to disable (default %(default)s)")
    add("--grace-seconds", "time in-flight calls get on SIGTERM", type=float)
    add(
        "--log-level",
        "debug, info, warning or error",
        choices=["debug", "info", "warning", "error"],
    )
    parser.add_argument(
        "--mlock",
        action="store_true",
        default=environ.get("NETSWAP_MLOCK", "") in ("1", "true", "yes"),
        help="memory store: lock every area in RAM at swapon; refuse SwapOn if that is not allowed"
        " [env NETSWAP_MLOCK=1]",
    )
    return parser


def config_from_args(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    parser = build_parser(environ)
    ns = parser.parse_args(argv)
    # argparse applies `type` to string defaults, so env values are parsed too.
    if ns.tokens is None:
        parser.error("--tokens (or NETSWAP_TOKENS) is required: every call is authenticated")
    try:
        return Config(**vars(ns))
    except ValueError as e:
        parser.error(str(e))
