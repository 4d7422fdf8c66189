"""DNS SRV lookups (RFC 2782), enough to find the servers a Kubernetes headless Service publishes.

The standard library has no SRV resolver, and this is the only DNS the client
needs: one question, the answers' targets and ports. The query goes over
UDP (with EDNS0, so a few dozen servers fit) to the first nameserver of
/etc/resolv.conf, or to the one given.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

SRV = 33
IN = 1


class SrvError(Exception):
    """The name could not be resolved to servers; the message says why."""


@dataclass(frozen=True, order=True)
class Target:
    priority: int
    weight: int
    port: int
    host: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def nameserver(resolv_conf: Path = Path("/etc/resolv.conf")) -> str:
    """The first `nameserver` of resolv.conf, as HOST:53."""
    try:
        for line in resolv_conf.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                host = fields[1]
                return f"[{host}]:53" if ":" in host else f"{host}:53"
    except OSError as e:
        raise SrvError(f"cannot read {resolv_conf}: {e.strerror}") from e
    raise SrvError(f"no nameserver in {resolv_conf}")


def query(name: str, ident: int) -> bytes:
    """A DNS query for the SRV records of `name`, with an EDNS0 record for 4 KiB answers."""
    header = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 1)  # recursion desired; 1 question, 1 additional
    labels = b"".join(bytes([len(p)]) + p for p in name.rstrip(".").encode("idna").split(b".")) + b"\0"
    opt = b"\0" + struct.pack(">HHIH", 41, 4096, 0, 0)  # OPT: root name, type 41, 4096-byte payload
    return header + labels + struct.pack(">HH", SRV, IN) + opt


_LABEL = re.compile(rb"[A-Za-z0-9_-]{1,63}")
MAX_NAME = 255


def _name(msg: bytes, pos: int) -> tuple[str, int]:
    """A (possibly compressed) domain name at `pos`: (the name, where what follows it starts).

    Pointers must point backwards (so they cannot loop), names are at most 255
    bytes and labels are host name labels: anything else is a malformed answer."""
    labels: list[str] = []
    size = 0
    after = -1  # where the name ends in the message: after its first pointer, if any
    while True:
        if pos >= len(msg):
            raise SrvError("malformed DNS answer (a name runs past its end)")
        length = msg[pos]
        if length & 0xC0 == 0xC0:
            if pos + 2 > len(msg):
                raise SrvError("malformed DNS answer (a cut pointer)")
            target = int.from_bytes(msg[pos : pos + 2], "big") & 0x3FFF
            if target >= pos:
                raise SrvError("malformed DNS answer (a pointer forwards)")
            if after < 0:
                after = pos + 2
            pos = target
            continue
        if length & 0xC0:
            raise SrvError("malformed DNS answer (an unknown label type)")
        pos += 1
        if length == 0:
            return ".".join(labels), after if after >= 0 else pos
        label = msg[pos : pos + length]
        size += length + 1
        if len(label) != length or size > MAX_NAME or not _LABEL.fullmatch(label):
            raise SrvError("malformed DNS answer (a name that is not a host name)")
        labels.append(label.decode("ascii"))
        pos += length


def parse(msg: bytes, ident: int) -> list[Target]:
    """The SRV targets of an answer to query(..., ident); SrvError for anything malformed."""
    try:
        return _parse(msg, ident)
    except struct.error as e:
        raise SrvError(f"malformed DNS answer ({e})") from None


def _parse(msg: bytes, ident: int) -> list[Target]:
    if len(msg) < 12:
        raise SrvError("malformed DNS answer (short)")
    got, flags, questions, answers, _, _ = struct.unpack(">HHHHHH", msg[:12])
    if got != ident:
        raise SrvError("DNS answer to another question")
    if flags & 0x0200:
        raise SrvError("DNS answer truncated: too many servers for one UDP answer")
    rcode = flags & 0xF
    if rcode:
        what = {
            2: "the nameserver failed (SERVFAIL)",
            3: "no such name (NXDOMAIN)",
            5: "the nameserver refused (REFUSED)",
        }
        raise SrvError(what.get(rcode, f"DNS error (rcode {rcode})"))
    pos = 12
    for _ in range(questions):
        _, pos = _name(msg, pos)
        pos += 4
    targets = []
    for _ in range(answers):
        _, pos = _name(msg, pos)
        rtype, _, _, length = struct.unpack(">HHIH", msg[pos : pos + 10])
        pos += 10
        if pos + length > len(msg):
            raise SrvError("malformed DNS answer (a record runs past its end)")
        if rtype == SRV:
            priority, weight, port = struct.unpack(">HHH", msg[pos : pos + 6])
            host, _ = _name(msg, pos + 6)
            targets.append(Target(priority, weight, port, host))
        pos += length
    return sorted(targets)


async def resolve(name: str, server: str | None = None, timeout: float = 3.0) -> list[Target]:
    """The SRV targets of `name`, asking `server` (HOST:PORT; default: resolv.conf's first)."""
    where = server or nameserver()
    host, _, port = where.rpartition(":")
    ident = secrets.randbelow(1 << 16)
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()

    class Protocol(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            if not answer.done():
                answer.set_result(data)

        def error_received(self, exc: Exception) -> None:
            if not answer.done():
                answer.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(Protocol, remote_addr=(host.strip("[]"), int(port)))
    try:
        for _ in range(3):  # UDP: ask again if the answer is lost
            transport.sendto(query(name, ident))
            try:
                data = await asyncio.wait_for(asyncio.shield(answer), timeout / 3)
                break
            except TimeoutError:
                continue
        else:
            raise SrvError(f"no answer from the nameserver {where} within {timeout:g}s")
    except OSError as e:
        raise SrvError(f"cannot ask the nameserver {where}: {e}") from e
    finally:
        transport.close()
    targets = parse(data, ident)
    if not targets:
        raise SrvError(f"{name} has no SRV records")
    return targets
