"""Guest runs' wall times, by guest configuration, for conftest's end-of-session summary.

Measured, never asserted: the machines are shared. Each section's runs are
compared with the one recorded as its base (else the first recorded).
"""

from __future__ import annotations

import dataclasses

from tests.guestvm import GuestResult


@dataclasses.dataclass(frozen=True)
class Run:
    seconds: float
    pswpout: int | None
    note: str


SECTIONS: dict[str, dict[str, Run]] = {}
BASES: dict[str, str] = {}


def record(section: str, name: str, result: GuestResult, note: str = "", *, base: bool = False) -> None:
    SECTIONS.setdefault(section, {})[name] = Run(result.seconds, result.pswpout, note)
    if base:
        BASES[section] = name


def lines(section: str) -> list[str]:
    runs = SECTIONS[section]
    base_name = BASES.get(section, next(iter(runs)))
    base = runs[base_name]
    out = []
    for name, run in runs.items():
        ratio = f"({run.seconds / base.seconds:.2f}x)" if name != base_name else "(base)"
        pages = f"pswpout {run.pswpout}" if run.pswpout is not None else ""
        out.append(f"{name:46} {run.seconds:6.1f} s {ratio:9} {pages:15} {run.note}".rstrip())
    return out
