"""`netswap-server areas list|destroy`: the operator's view of a file store, with the server stopped.

An area belongs to the principal that made it. A principal removed from the
tokens file leaves its areas behind (the server never deletes data on its
own), and a principal later added under the same name would get them: list
them here, and destroy what should go.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from netswap.common.sizes import format_size
from netswap.server.auth import TokensError, TokenTable
from netswap.server.store import AreaKey, Backing, FileStore
from netswap.server.store.file import StoreBusy, hold


def parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="netswap-server areas",
        description="List or destroy the areas of a file store. The server must be stopped.",
    )
    sub = top.add_subparsers(dest="action", required=True)
    for name, what in (("list", "list every area, and whose owner the tokens file no longer names"),
                       ("destroy", "destroy a principal's areas (all, or one with --area)")):  # fmt: skip
        p = sub.add_parser(name, help=what)
        p.add_argument(
            "--store",
            default=environ.get("NETSWAP_STORE", ""),
            help="file:DIR of the store [env NETSWAP_STORE]",
        )
        p.add_argument(
            "--tokens",
            type=Path,
            default=environ.get("NETSWAP_TOKENS") or None,
            help="tokens file, to tell orphans apart [env NETSWAP_TOKENS]",
        )
        p.add_argument("--principal", required=name == "destroy", help="only this principal's areas")
        p.add_argument("--area", help="only this area (with --principal)")
    return top


class Refused(Exception):
    """What the operator is told, and the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def main(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int:
    args = parser(environ).parse_args(argv)
    try:
        root = _root(args)
        known = TokenTable.load(args.tokens).has if args.tokens else None
        lock = hold(root)
    except (Refused, TokensError, StoreBusy) as e:
        print(f"netswap-server areas: {e}", file=sys.stderr)
        return e.status if isinstance(e, Refused) else 1
    try:
        store = FileStore(root)
        found = _matching(store, args.principal, args.area)
        if args.action == "list":
            _list(found, known)
            return 0
        if not found:
            print("netswap-server areas: no such area", file=sys.stderr)
            return 1
        for key, backing in found:
            pages, size = backing.stored_pages(), backing.size_bytes
            store.destroy(key, backing)
            print(f"destroyed {key.owner}/{key.name}: {format_size(size)}, {pages} pages stored")
        return 0
    finally:
        os.close(lock)


def _root(args: argparse.Namespace) -> Path:
    if not args.store.startswith("file:") or not args.store[5:]:
        raise Refused("--store must be file:DIR (memory areas end with their server)", 2)
    if args.area and not args.principal:
        raise Refused("--area needs --principal", 2)
    root = Path(args.store[5:])
    if not root.is_dir():
        raise Refused(f"no file store at {root}")
    return root


def _matching(store: FileStore, principal: str | None, area: str | None) -> list[tuple[AreaKey, Backing]]:
    found = []
    for key, backing in store.existing():
        if principal in (None, key.owner) and area in (None, key.name):
            found.append((key, backing))
        else:
            backing.close()
    return found


def _list(found: list[tuple[AreaKey, Backing]], known: Callable[[str], bool] | None) -> None:
    print(f"{'PRINCIPAL':20} {'AREA':20} {'SIZE':>10} {'PAGES STORED':>12}  OWNER")
    for key, backing in found:
        owner = "?" if known is None else "configured" if known(key.owner) else "ORPHANED"
        print(
            f"{key.owner:20} {key.name:20} {format_size(backing.size_bytes):>10} {backing.stored_pages():>12}  {owner}"
        )
        backing.close()
