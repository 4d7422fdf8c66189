"""Credential context: who is calling, from bearer tokens and client certificates.

Enforcement is interceptors.AuthInterceptor.

The tokens file (TOML) lists the principals. It holds SHA-256 digests, not
tokens, so reading it does not let anyone call the service -- still, it must
not be readable by group or others (it also says who may do what):

    [principals.alice]
    token_sha256 = "<hex sha256 of the token>"   # optional under mutual TLS
    quota_bytes = 1073741824                     # optional: total bytes alice may reserve

Under mutual TLS the principal is the NAME in the client certificate's SAN
URI spiffe://<trust domain>/principal/NAME; a principal may then have no
token at all.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import secrets
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from netswap.common.limits import NAME_PATTERN

# Where the call being handled comes from, for the audit log. Set in the
# call's own task once it is admitted (gate.py).
peer_var: contextvars.ContextVar[str] = contextvars.ContextVar("netswap_peer", default="")


@dataclass(frozen=True)
class Principal:
    name: str
    quota_bytes: int | None


class TokensError(ValueError):
    """The tokens file is missing, malformed or unsafe; the message says where."""


class TokenTable:
    def __init__(self, principals: Mapping[str, Principal], digests: Mapping[str, bytes]) -> None:
        self._principals = dict(principals)
        # Keyed by the token's SHA-256: what a lookup's timing could reveal is
        # where a digest falls in the table, which says nothing of any token.
        self._by_digest = {digest: self._principals[name] for name, digest in digests.items()}

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        text = _read_private(path)
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise TokensError(f"cannot read tokens file {path}: {e}") from e
        table = doc.get("principals")
        if not isinstance(table, dict):
            raise TokensError(f"{path}: expected a [principals.NAME] table")
        principals: dict[str, Principal] = {}
        digests: dict[str, bytes] = {}
        for name, entry in table.items():
            where = f"{path}: principals.{name}"
            if not NAME_PATTERN.fullmatch(name):
                raise TokensError(f"{where}: name must be 1-64 characters of A-Z a-z 0-9 . _ -")
            if not isinstance(entry, dict):
                raise TokensError(f"{where}: expected a table")
            quota = entry.get("quota_bytes")
            if quota is not None and (not isinstance(quota, int) or isinstance(quota, bool) or quota < 0):
                raise TokensError(f"{where}: quota_bytes must be a non-negative integer")
            principals[name] = Principal(name, quota)
            digest_hex = entry.get("token_sha256")
            if digest_hex is None:
                continue  # a principal that can only come in with a client certificate
            try:
                digest = bytes.fromhex(digest_hex) if isinstance(digest_hex, str) else b""
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise TokensError(f"{where}: token_sha256 must be 64 hex digits")
            if digest in digests.values():
                raise TokensError(f"{where}: token_sha256 is also used by another principal")
            digests[name] = digest
        return cls(principals, digests)

    def authenticate(self, token: str) -> Principal | None:
        """The principal whose token this is: one hash and one lookup, whatever the table's size."""
        return self._by_digest.get(hashlib.sha256(token.encode()).digest())

    def names(self) -> frozenset[str]:
        return frozenset(self._principals)

    def has(self, name: str) -> bool:
        return name in self._principals

    def quota_of(self, name: str) -> int | None:
        p = self._principals.get(name)
        return p.quota_bytes if p else None


def _read_private(path: Path) -> str:
    """The tokens file's text, if it is ours alone: owned by this process's user, mode 0600 or
    stricter, not a symlink. One open, then everything from that descriptor, so the file
    checked is the file read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            raw = os.read(fd, max(st.st_size, 1) + 1)
        finally:
            os.close(fd)
    except PermissionError as e:
        raise TokensError(f"cannot read tokens file {path}: {e.strerror}; {_whose(path)}") from e
    except OSError as e:
        raise TokensError(f"cannot read tokens file {path}: {e.strerror}") from e
    if st.st_uid != os.geteuid():
        raise TokensError(
            f"tokens file {path} is owned by uid {st.st_uid}, not by this server's uid {os.geteuid()}"
        )
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokensError(
            f"tokens file {path} is accessible to group or others (mode {stat.S_IMODE(st.st_mode):04o});"
            f" run: chmod 600 {path}"
        )
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise TokensError(f"tokens file {path} is not UTF-8: {e}") from e


def _whose(path: Path) -> str:
    """Why this process may not open `path`: the usual cause is a file made by another user
    (in a container, the host's root instead of the server's UID)."""
    uid = os.geteuid()
    try:
        st = os.stat(path)
    except OSError:
        return f"this server runs as uid {uid} and cannot reach it: check the directories above it"
    return (
        f"it is owned by uid {st.st_uid} (mode {stat.S_IMODE(st.st_mode):04o}) and this server runs as"
        f" uid {uid}: run: chown {uid} {path} && chmod 600 {path}"
    )


class Credentials:
    """The current TokenTable, replaceable at run time (SIGHUP) without a restart."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.table = TokenTable.load(path) if path else TokenTable({}, {})

    def reload(self) -> None:
        """Re-read the tokens file; on any problem keep the table in force and raise."""
        if self.path is not None:
            self.table = TokenTable.load(self.path)

    def quota_of(self, name: str) -> int | None:
        return self.table.quota_of(name)


def new_token() -> tuple[str, str]:
    """A fresh token and the hex SHA-256 to put in the tokens file."""
    token = secrets.token_urlsafe(32)
    return token, hashlib.sha256(token.encode()).hexdigest()


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer ...` entry; None if there is no usable one."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def principal_from_certificate(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """NAME from the peer certificate's SAN URI spiffe://<trust domain>/principal/NAME."""
    for uri in auth_context.get("peer_uri", ()):
        text = uri.decode("utf-8", "replace")
        if not text.startswith("spiffe://"):
            continue
        _, _, path = text[len("spiffe://") :].partition("/")
        kind, _, name = path.partition("/")
        if kind == "principal" and NAME_PATTERN.fullmatch(name):
            return name
    return None
