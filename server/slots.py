"""A request's slots, decided once where the request enters, as a value every layer below takes.

The wire names slots in two ways (swap.proto): listed, or as a run
(run_start, run_count). `from_wire` turns that into a `Run` or a list;
AreaManager checks it against the area and hands the store a `Run` or a
`Scattered`. Both carry `runs`: the (index in the page blob, first slot,
count) pieces the store copies -- one for a run -- so no store looks at the
shape again.
"""

from __future__ import annotations

from collections.abc import Sequence

from netswap.server.errors import InvalidArgument

Piece = tuple[int, int, int]  # (index of its first page in the blob, first slot, page count)


class Run:
    """The slots first .. first + count - 1."""

    __slots__ = ("count", "first")

    def __init__(self, first: int, count: int) -> None:
        self.first = first
        self.count = count

    @property
    def runs(self) -> tuple[Piece]:
        return ((0, self.first, self.count),)

    def __eq__(self, other: object) -> bool:
        return type(other) is Run and (other.first, other.count) == (self.first, self.count)

    def __hash__(self) -> int:
        return hash((self.first, self.count))

    def __repr__(self) -> str:
        return f"Run({self.first}, {self.count})"


class Scattered:
    """Checked slots that are not one run: in request order, split into runs of consecutive slots."""

    __slots__ = ("count", "runs", "slots")

    def __init__(self, slots: list[int]) -> None:
        self.slots = slots
        self.count = len(slots)
        self.runs = tuple(_split(slots))

    def __repr__(self) -> str:
        return f"Scattered({self.slots!r})"


Slots = Run | Scattered


def _split(slots: list[int]) -> list[Piece]:
    out = []
    i, n = 0, len(slots)
    while i < n:
        first = slots[i]
        j = i + 1
        while j < n and slots[j] == first + (j - i):
            j += 1
        out.append((i, first, j - i))
        i = j
    return out


def from_wire(listed: Sequence[int], run_start: int, run_count: int) -> Run | Sequence[int]:
    """A request's slots from its fields: a Run, or the listed slots (checked by the manager)."""
    if run_count:
        if listed:
            raise InvalidArgument("a request names its slots or a run (run_start, run_count), not both")
        return Run(run_start, run_count)
    if run_start:
        raise InvalidArgument(f"run_start {run_start} without run_count: a run needs both")
    return listed
