"""Where an area's copies live: rendezvous hashing over the server set, no metadata service.

Every server gets a score from (principal, area name, server); the area goes
to the servers with the highest scores. The order is the same for every
client that knows the same set, so a VM that restarts looks where it put its
area; a server added or removed moves only the areas it wins or held.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def ranked(principal: str, area: str, servers: Sequence[str]) -> list[str]:
    """`servers` in placement order for the area: the first ones hold its copies."""

    def score(server: str) -> bytes:
        return hashlib.sha256(f"{principal}\0{area}\0{server}".encode()).digest()

    return sorted(dict.fromkeys(servers), key=score, reverse=True)


def parse_servers(spec: str) -> list[str] | str:
    """`--server`: one HOST:PORT (or unix:PATH), a comma-separated list, or `dns-srv:NAME`
    (returned as the name, to resolve)."""
    if spec.startswith("dns-srv:"):
        name = spec.removeprefix("dns-srv:")
        if not name:
            raise ValueError("dns-srv: needs a name, e.g. dns-srv:_grpc._tcp.netswap.ns.svc.cluster.local")
        return name
    servers = [s.strip() for s in spec.split(",") if s.strip()]
    if not servers:
        raise ValueError("--server needs at least one HOST:PORT")
    if len(set(servers)) != len(servers):
        raise ValueError(f"--server names a server twice: {spec}")
    return servers
