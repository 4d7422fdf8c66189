"""Human sizes ("64MiB") for flags and output. Binary units only: swap is sized in pages."""

import argparse
import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"\s*(\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """Parse "4096", "64MiB", "1G" (binary units) into bytes; ValueError says what is wrong."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: use a number of bytes or a binary unit (KiB, MiB, GiB, TiB)"
        )
    return int(match.group(1)) * _UNITS[unit]


def format_size(n: int) -> str:
    """The largest binary unit that shows `n` exactly, e.g. 1073741824 -> "1GiB"."""
    for suffix, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n and n % factor == 0:
            return f"{n // factor}{suffix}"
    return f"{n}B"


def size_arg(text: str) -> int:
    """parse_size as an argparse `type=`: errors become usage errors."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
