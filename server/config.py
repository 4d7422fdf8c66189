"""The server's one Config object, filled from flags with NETSWAP_* environment equivalents."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
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
    # A plaintext port with gRPC health (probes) and reflection only; "" for none.
    health_listen: str = ""
    # Seconds in-flight calls get to finish on SIGTERM.
    grace_seconds: float = 10.0
    # Memory store: mlock each area at swapon (refused -> RESOURCE_EXHAUSTED).
    mlock: bool = False
    # TLS: server certificate and key; with a client CA, mutual TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    require_token: bool = False  # under mutual TLS, a token as well
    insecure: bool = False  # allow plaintext on a non-loopback address
    # Limits (each refusal: RESOURCE_EXHAUSTED with a message).
    max_connections: int = 1024  # open connections, all peers together
    max_streams: int = 64  # concurrent RPCs per connection
    max_calls_per_principal: int = 64  # unary calls in progress at once
    max_streams_per_principal: int = 16  # open PageStreams
    max_areas_per_principal: int = 16
    swapon_rate: float = 10.0  # per principal per second ...
    swapon_burst: int = 20  # ... with bursts of this many
    # Seconds a unary call's body may take to arrive after its headers (then
    # DEADLINE_EXCEEDED), and a new connection its TLS and HTTP/2 handshake.
    request_timeout: float = 10.0
    # Seconds before a connection with no call open is closed (0: never).
    idle_timeout: float = 300.0
    # Authentication failures audited one by one per peer address (a burst,
    # then a rate per second); past that, one summary line per peer.
    auth_failure_burst: int = 20
    auth_failure_rate: float = 2.0
    io_threads: int = 8  # file store: threads for writes and reads the page cache misses
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
        self._check_security()

    def _check_security(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.require_token and self.tls_client_ca is None:
            raise ValueError(
                "--require-token applies with --tls-client-ca; without it a token is always required"
            )
        if self.tls_cert is None and not self.insecure and not plaintext_is_local(self.listen):
            raise ValueError(
                f"refusing plaintext on {self.listen}: it is reachable from other hosts. Give"
                " --tls-cert/--tls-key, listen on loopback or unix:PATH, or pass --insecure"
            )
        positive = {
            "--max-connections": self.max_connections,
            "--max-streams": self.max_streams,
            "--max-calls-per-principal": self.max_calls_per_principal,
            "--max-streams-per-principal": self.max_streams_per_principal,
            "--max-areas-per-principal": self.max_areas_per_principal,
            "--swapon-rate": self.swapon_rate,
            "--swapon-burst": self.swapon_burst,
            "--request-timeout": self.request_timeout,
            "--auth-failure-burst": self.auth_failure_burst,
            "--auth-failure-rate": self.auth_failure_rate,
            "--io-threads": self.io_threads,
        }
        for flag, value in positive.items():
            if value <= 0:
                raise ValueError(f"{flag} must be positive, not {value}")
        if self.idle_timeout < 0:
            raise ValueError("--idle-timeout must not be negative (0: never)")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def store_path(self) -> Path | None:
        return Path(self.store[5:]) if self.store.startswith("file:") else None


def plaintext_is_local(listen: str) -> bool:
    """True for unix sockets and loopback addresses: nobody else can reach them."""
    if listen.startswith("unix:"):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        value = environ.get(env)
        if value == "" and dest not in ("metrics_listen", "health_listen"):
            value = None  # empty means unset (a container can blank an image default)
        default = value if value is not None else getattr(defaults, dest)
        parser.add_argument(flag, dest=dest, default=default, help=f"{help} [env {env}]", **kw)  # type: ignore[arg-type]

    add("--listen", "gRPC address: HOST:PORT or unix:PATH (default %(default)s)")
    add("--store", "memory, or file:DIR for areas that survive restarts (default %(default)s)")
    add("--capacity", "bytes all areas may reserve together, e.g. 8GiB", type=size_arg)
    add("--max-area-size", "largest single area, e.g. 16GiB", type=size_arg)
    add("--max-batch-pages", "most pages one SwapOut/SwapIn/Discard may carry", type=int)
    add("--tokens", "TOML file of principals and token hashes (required)", type=Path)
    add("--metrics-listen", "Prometheus HOST:PORT, empty to disable (default %(default)s)")
    add(
        "--health-listen",
        "HOST:PORT serving gRPC health (for probes) and reflection, plaintext (default off)",
    )
    add("--grace-seconds", "time in-flight calls get on SIGTERM", type=float)
    add(
        "--log-level",
        "debug, info, warning or error",
        choices=["debug", "info", "warning", "error"],
    )
    add("--tls-cert", "server certificate (PEM): serve TLS", type=Path)
    add("--tls-key", "server private key (PEM)", type=Path)
    add("--tls-client-ca", "CA (PEM) for client certificates: require mutual TLS", type=Path)
    add("--max-connections", "open connections, all peers together", type=int)
    add("--max-streams", "concurrent RPCs per connection", type=int)
    add("--max-calls-per-principal", "unary calls one principal may have in progress", type=int)
    add("--max-streams-per-principal", "PageStreams one principal may have open", type=int)
    add("--max-areas-per-principal", "areas one principal may have", type=int)
    add("--swapon-rate", "SwapOn calls per second per principal", type=float)
    add("--swapon-burst", "SwapOn calls a principal may make at once", type=int)
    add(
        "--request-timeout",
        "seconds a call's request may take to arrive after its headers, and a connection its handshake",
        type=float,
    )
    add("--idle-timeout", "seconds before a connection with no call open is closed; 0: never", type=float)
    add("--auth-failure-burst", "authentication failures audited one by one per peer address", type=int)
    add("--auth-failure-rate", "...and per second after that (the rest: summary lines)", type=float)
    add("--io-threads", "file store: threads for writes and for reads the page cache misses", type=int)
    for flag, env, help in (
        ("--require-token", "NETSWAP_REQUIRE_TOKEN", "under mutual TLS, also require a bearer token"),
        ("--insecure", "NETSWAP_INSECURE", "allow plaintext on a non-loopback address (not for production)"),
    ):
        parser.add_argument(
            flag,
            action="store_true",
            default=environ.get(env, "") in ("1", "true", "yes"),
            help=f"{help} [env {env}=1]",
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
