"""Same-filled pages: a page whose bytes are one 8-byte word repeated travels as that word.

swap.proto's same_index / same_word: the positions of such pages among a
request's (or reply's) pages, in increasing order, and each page's word --
its first 8 bytes, so the words of n pages are 8 * n bytes. The page blob
leaves them out. Most are zero pages (a process's untouched or cleared
memory), as zram's same_pages counts them.

Finding them must not cost a Python loop per page on every batch: the first
byte of each page is compared with its ninth through strided views (a C
loop), and only the pages where they agree -- about one in 256 of random
pages -- are compared whole.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from netswap.common.limits import PAGE_SIZE

WORD = 8
ZERO_WORD = bytes(WORD)
_ZERO_PAGE = bytes(PAGE_SIZE)


@dataclass(slots=True)
class SamePages:
    """Same-filled pages of a batch: `index` (increasing) and their `words`, 8 bytes each."""

    index: list[int]
    words: bytes

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """(index, word) of each page."""
        words = self.words
        for n, i in enumerate(self.index):
            yield i, words[n * WORD : (n + 1) * WORD]


def page_of(word: bytes, page_size: int = PAGE_SIZE) -> bytes:
    """The page that is `word` repeated (the zero page is shared, not made)."""
    return _ZERO_PAGE if word == ZERO_WORD and page_size == PAGE_SIZE else word * (page_size // WORD)


def repeat_into(view: memoryview, word: bytes) -> None:
    """Fill `view` (a whole number of words) with `word`, in place: no page is made."""
    if word == ZERO_WORD and len(view) <= PAGE_SIZE:
        view[:] = _ZERO_PAGE[: len(view)]
        return
    view[:WORD] = word
    done = WORD
    while done < len(view):  # doubling: a dozen copies a page
        n = min(done, len(view) - done)
        view[done : done + n] = view[:n]
        done += n


def find(
    pieces: Sequence[memoryview], page_size: int = PAGE_SIZE
) -> tuple[list[memoryview], SamePages | None]:
    """Split whole pages, given as `pieces` in order, into the pages to send (as slices of the
    pieces, still in order) and the same-filled ones; (pieces, None) when there are none."""
    index: list[int] = []
    words: list[bytes] = []
    kept: list[memoryview] = []
    base = 0  # index of the piece's first page in the batch
    per_page = page_size // WORD
    for piece in pieces:
        count = len(piece) // page_size
        # A page can only be same-filled if its first byte is its ninth.
        candidates = itertools.compress(
            range(count), map(operator.eq, piece[0::page_size], piece[WORD::page_size])
        )
        start = 0  # first page of the piece not yet kept or found same
        found = len(index)
        words_of = piece.cast("Q")  # a page is same-filled if it equals itself a word on: no copy
        for i in candidates:
            at = i * per_page
            if words_of[at : at + per_page - 1] != words_of[at + 1 : at + per_page]:
                continue
            word = piece[i * page_size : i * page_size + WORD].tobytes()
            if i > start:
                kept.append(piece[start * page_size : i * page_size])
            index.append(base + i)
            words.append(word)
            start = i + 1
        if len(index) == found:
            kept.append(piece)  # none in this piece: kept whole
        elif start < count:
            kept.append(piece[start * page_size :])
        base += count
    if not index:
        return list(pieces), None
    return kept, SamePages(index, b"".join(words))


def fill(
    into: Sequence[memoryview], pages: memoryview, same: SamePages | None, page_size: int = PAGE_SIZE
) -> None:
    """Write a batch's pages into the buffers of `into` (their concatenation, in order): the
    same-filled ones from their words, the others from `pages` (the blob that left them out)."""
    if same is None:
        pos = 0
        for view in into:
            view[:] = pages[pos : pos + len(view)]
            pos += len(view)
        return
    if len(into) == 1:  # one buffer, as a read-ahead window is
        view, taken, done = into[0], 0, 0
        for i, word in [*same, (len(view) // page_size, b"")]:
            if i > done:
                view[done * page_size : i * page_size] = pages[
                    taken * page_size : (taken + i - done) * page_size
                ]
                taken += i - done
            if word:
                repeat_into(view[i * page_size : (i + 1) * page_size], word)
            done = i + 1
        return
    ends = list(itertools.accumulate(len(view) // page_size for view in into))
    taken = 0  # pages of the blob used so far
    done = 0  # pages of the batch written so far
    for i, word in [*same, (ends[-1] if ends else 0, b"")]:
        if i > done:  # pages done .. i-1 come from the blob
            _copy(into, ends, done, pages[taken * page_size : (taken + i - done) * page_size], page_size)
            taken += i - done
        if word:
            k = bisect.bisect_right(ends, i)  # the view holding page i
            offset = (i - (ends[k - 1] if k else 0)) * page_size
            repeat_into(into[k][offset : offset + page_size], word)
        done = i + 1


def _copy(into: Sequence[memoryview], ends: list[int], at: int, src: memoryview, page_size: int) -> None:
    """Copy whole pages `src` into the concatenation of `into` from its page `at` on."""
    k = bisect.bisect_right(ends, at)  # the view holding page `at`
    while src:
        view = into[k]
        offset = (at - (ends[k - 1] if k else 0)) * page_size
        n = min(len(view) - offset, len(src))
        view[offset : offset + n] = src[:n]
        src = src[n:]
        at += n // page_size
        k += 1
