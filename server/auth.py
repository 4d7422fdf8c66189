"""Credential context: bearer tokens -> principals, and the principal of the call in hand.

Enforcement is interceptors.AuthInterceptor.

The tokens file (TOML) names each principal with the SHA-256 of its token, so
the file itself holds no secret that would let a reader call the service:

    [principals.alice]
    token_sha256 = "<hex sha256 of the token>"
    quota_bytes = 1073741824          # optional: total bytes alice may reserve
"""

from __future__ import annotations

import contextvars
import hashlib
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from netswap.common.limits import NAME_PATTERN

# The authenticated principal of the call being handled. Set by the auth
# interceptor's wrapper around the handler, in the handler's own task.
principal_var: contextvars.ContextVar[str] = contextvars.ContextVar("netswap_principal")


def current_principal() -> str:
    """The caller of the RPC being handled (only valid inside a SwapService handler)."""
    return principal_var.get()


@dataclass(frozen=True)
class Principal:
    name: str
    quota_bytes: int | None


class TokensError(ValueError):
    """The tokens file is missing, malformed or unsafe; the message says where."""


class TokenTable:
    def __init__(self, principals: dict[bytes, Principal]) -> None:
        self._by_digest = principals
        self._by_name = {p.name: p for p in principals.values()}

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise TokensError(f"cannot read tokens file {path}: {e}") from e
        table = doc.get("principals")
        if not isinstance(table, dict):
            raise TokensError(f"{path}: expected a [principals.NAME] table")
        principals: dict[bytes, Principal] = {}
        for name, entry in table.items():
            where = f"{path}: principals.{name}"
            if not NAME_PATTERN.fullmatch(name):
                raise TokensError(f"{where}: name must be 1-64 characters of A-Z a-z 0-9 . _ -")
            if not isinstance(entry, dict):
                raise TokensError(f"{where}: expected a table")
            digest_hex = entry.get("token_sha256")
            try:
                digest = bytes.fromhex(digest_hex) if isinstance(digest_hex, str) else b""
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise TokensError(f"{where}: token_sha256 must be 64 hex digits")
            quota = entry.get("quota_bytes")
            if quota is not None and (not isinstance(quota, int) or quota < 0):
                raise TokensError(f"{where}: quota_bytes must be a non-negative integer")
            if digest in principals:
                raise TokensError(f"{where}: token_sha256 is also used by another principal")
            principals[digest] = Principal(name, quota)
        return cls(principals)

    def authenticate(self, token: str) -> Principal | None:
        # Looked up by SHA-256 of the token, as hashed API keys are: what the
        # lookup's timing could reveal is about a digest the caller can compute
        # anyway, not about any stored token.
        return self._by_digest.get(hashlib.sha256(token.encode()).digest())

    def has(self, name: str) -> bool:
        return name in self._by_name

    def quota_of(self, name: str) -> int | None:
        p = self._by_name.get(name)
        return p.quota_bytes if p else None


def new_token() -> tuple[str, str]:
    """A fresh token and the hex SHA-256 to put in the tokens file."""
    token = secrets.token_urlsafe(32)
    return token, hashlib.sha256(token.encode()).hexdigest()


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    return None
