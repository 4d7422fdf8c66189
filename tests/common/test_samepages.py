"""Same-filled pages: found in any pieces of a batch, and filled back into any buffers."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from netswap.common.samepages import SamePages, fill, find, page_of
from tests.helpers import PS

# What a page can be: random bytes, zeros, a repeated word, or one that only starts like a
# repeated word (first byte equal to the ninth, or the first two words equal) and is not.
KINDS = ("random", "zero", "word", "almost")


def page(kind: str, n: int) -> bytes:
    word = (n * 0x9E3779B97F4A7C15 % 2**64 | 1).to_bytes(8, "little")
    if kind == "zero":
        return bytes(PS)
    if kind == "word":
        return word * (PS // 8)
    if kind == "almost":
        return word * (PS // 8 - 1) + bytes(8)  # same all the way but for the last word
    return os.urandom(PS)


def cut(blob: bytes | bytearray, counts: list[int]) -> list[memoryview]:
    """The blob as consecutive views of counts[i] pages each (the rest in a last one)."""
    view, out, at = memoryview(blob), [], 0
    for n in counts:
        if at < len(blob):
            out.append(view[at : at + n * PS])
            at += n * PS
    if at < len(blob):
        out.append(view[at:])
    return [v for v in out if len(v)]


@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=24),
    pieces=st.lists(st.integers(1, 6), max_size=8),
    buffers=st.lists(st.integers(1, 6), max_size=8),
)
def test_found_pages_are_exactly_the_same_filled_ones_and_fill_back(
    kinds: list[str], pieces: list[int], buffers: list[int]
) -> None:
    pages = [page(k, n) for n, k in enumerate(kinds)]
    blob = b"".join(pages)
    kept, same = find(cut(blob, pieces))
    expected = [n for n, k in enumerate(kinds) if k in ("zero", "word")]
    if not expected:
        assert same is None
        assert b"".join(kept) == blob
    else:
        assert same is not None
        assert same.index == expected
        assert [w for _, w in same] == [pages[n][:8] for n in expected]
        assert b"".join(kept) == b"".join(p for n, p in enumerate(pages) if n not in expected)
    # and back, into buffers cut anywhere on page boundaries
    out = bytearray(len(blob))
    fill(cut(out, buffers), memoryview(b"".join(kept)), same)
    assert out == blob


def test_nothing_same_keeps_the_pieces_as_given() -> None:
    pieces = [memoryview(os.urandom(3 * PS)), memoryview(os.urandom(PS))]
    kept, same = find(pieces)
    assert same is None and kept == pieces


def test_the_zero_page_is_shared_and_a_word_page_is_the_word_repeated() -> None:
    assert page_of(bytes(8)) is page_of(bytes(8)) == bytes(PS)
    assert page_of(b"abcdefgh") == b"abcdefgh" * 512
    assert list(SamePages([2, 7], b"a" * 8 + b"b" * 8)) == [(2, b"a" * 8), (7, b"b" * 8)]
