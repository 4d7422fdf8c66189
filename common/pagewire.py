"""Hand-built encoding of the messages that carry pages, so pages are copied as little as possible.

protobuf's Python API only takes `bytes` for a bytes field: putting pool pages
into a SwapOutRequest would copy them into a bytes object and then again into
the serialized message; parsing one copies the blob out of the received bytes.
Instead the small part of each message (handle, packed slots or a run) goes
through protobuf and the page blob is handled here -- a concatenation of
encoded fields is itself a valid encoding, identical to what
SerializeToString would produce. Field numbers and tags come from the
generated descriptors, so this file cannot drift from swap.proto.

The decoders take untrusted bytes: they refuse (ValueError) a message that
holds more fields, or a small part larger, than any valid request could,
before protobuf parses anything, so a hostile message costs O(limit) whatever
its size.

Both ends use it: the client to send SwapOut and read SwapIn replies, the
server to read SwapOut and send SwapIn replies -- as unary calls, or wrapped
in the PageRequest / PageReply messages of PageStream.
"""

from __future__ import annotations

import enum
import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from netswap.common.limits import MESSAGE_OVERHEAD
from netswap.common.samepages import WORD, SamePages
from netswap.v1 import swap_pb2

_VARINT, _LEN = 0, 2  # wire types


def varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def _field(message: Descriptor, name: str) -> FieldDescriptor:
    return message.fields_by_name[name]


def _tag(message: Descriptor, name: str, wire: int = _LEN) -> bytes:
    """The key of a field (length-delimited unless `wire` says), as its message's descriptor defines it."""
    return varint(_field(message, name).number << 3 | wire)


_SWAP_OUT = swap_pb2.SwapOutRequest.DESCRIPTOR
_SWAP_IN_REPLY = swap_pb2.SwapInResponse.DESCRIPTOR
_PAGE_REQUEST = swap_pb2.PageRequest.DESCRIPTOR
_PAGE_REPLY = swap_pb2.PageReply.DESCRIPTOR

SWAP_OUT_PAGES = _tag(_SWAP_OUT, "pages")
SWAP_IN_REPLY_PAGES = _tag(_SWAP_IN_REPLY, "pages")
PAGE_REQUEST_SWAP_OUT = _tag(_PAGE_REQUEST, "swap_out")
PAGE_REQUEST_SWAP_IN = _tag(_PAGE_REQUEST, "swap_in")
PAGE_REQUEST_DISCARD = _tag(_PAGE_REQUEST, "discard")
PAGE_REPLY_PAGES = _tag(_PAGE_REPLY, "pages")


class _Keys:
    """The keys of a message's fields that name slots and same-filled pages (those it has)."""

    def __init__(self, message: Any) -> None:
        d = message.DESCRIPTOR
        self.message = message
        has = d.fields_by_name
        self.handle = _tag(d, "handle") if "handle" in has else b""
        self.run_start = _tag(d, "run_start", _VARINT) if "run_start" in has else b""
        self.run_count = _tag(d, "run_count", _VARINT) if "run_count" in has else b""
        self.same_index = _tag(d, "same_index") if "same_index" in has else b""  # packed, as proto3 packs
        self.same_word = _tag(d, "same_word") if "same_word" in has else b""
        self.same_pages = _tag(d, "same_pages", _VARINT) if "same_pages" in has else b""


_OUT_KEYS = _Keys(swap_pb2.SwapOutRequest)
_IN_KEYS = _Keys(swap_pb2.SwapInRequest)
_DISCARD_KEYS = _Keys(swap_pb2.DiscardRequest)
_REPLY_KEYS = _Keys(swap_pb2.PageReply)
_IN_REPLY_KEYS = _Keys(swap_pb2.SwapInResponse)


class Op(enum.Enum):
    """The operations a PageRequest carries, named as the unary methods are."""

    SWAP_OUT = "SwapOut"
    SWAP_IN = "SwapIn"
    DISCARD = "Discard"

    __hash__ = object.__hash__  # members are singletons (see client.nbd.batcher.Kind)


# The members as module constants for the hot path (see client.nbd.batcher.READ).
SWAP_OUT, SWAP_IN, DISCARD = Op.SWAP_OUT, Op.SWAP_IN, Op.DISCARD


_OP_OF_FIELD = {
    _field(_PAGE_REQUEST, "swap_out").number: Op.SWAP_OUT,
    _field(_PAGE_REQUEST, "swap_in").number: Op.SWAP_IN,
    _field(_PAGE_REQUEST, "discard").number: Op.DISCARD,
}
_HEAD_OF_OP = {Op.SWAP_IN: swap_pb2.SwapInRequest, Op.DISCARD: swap_pb2.DiscardRequest}


@dataclass(frozen=True)
class Bounds:
    """The most a valid request holds: fields, and bytes besides its page blob."""

    fields: int
    head_bytes: int

    @classmethod
    def for_batches(cls, max_batch_pages: int) -> Bounds:
        """A page request's: its slots, same_index and same_word listed one field each
        (protobuf also reads repeated numbers unpacked), and a handful of other fields."""
        return cls(
            fields=3 * max_batch_pages + 8, head_bytes=MESSAGE_OVERHEAD + max_batch_pages * (22 + 6 + 9)
        )


CONTROL = Bounds(fields=16, head_bytes=1 << 20)  # SwapOn, SwapOff, ListAreas


def slot_fields(slots: Sequence[int], runs: bool) -> dict[str, Any]:
    """The fields of a request that name `slots`: a run (run_start, run_count) when they
    are one -- given as a range -- and the server takes runs (`runs`), else listed."""
    if runs and type(slots) is range and slots.step == 1 and slots:
        return {"run_start": slots.start, "run_count": len(slots)}
    return {"slots": slots}


Pieces = Sequence[bytes | bytearray | memoryview]


# -- encoding: field by field in field-number order, as protobuf serializes -------------


def _handle(keys: _Keys, handle: bytes) -> bytes:
    return b"".join((keys.handle, varint(len(handle)), handle)) if handle else b""


def _slots(keys: _Keys, slots: Sequence[int], runs: bool) -> tuple[bytes, bytes]:
    """(the listed slots' field, the run's fields) naming `slots` (see slot_fields)."""
    if runs and type(slots) is range and slots.step == 1 and slots:
        start = keys.run_start + varint(slots.start) if slots.start else b""
        return b"", b"".join((start, keys.run_count, varint(len(slots))))
    if not slots:
        return b"", b""
    # A packed list of numbers: protobuf's C encoder, which is all this message holds.
    return keys.message(slots=slots).SerializeToString(), b""


def _same(keys: _Keys, same: SamePages | None) -> bytes:
    """The same_index and same_word fields of `same` (nothing for none)."""
    if not same:
        return b""
    index = same.index  # increasing: one byte each when the last takes one
    packed = bytes(index) if index[-1] < 0x80 else b"".join(map(varint, index))
    return b"".join(
        (keys.same_index, varint(len(packed)), packed, keys.same_word, varint(len(same.words)), same.words)
    )


def _swap_out_parts(
    handle: bytes, slots: Sequence[int], pages: Pieces, runs: bool, same: SamePages | None = None
) -> list[Any]:
    """The pieces of a serialized SwapOutRequest whose page blob is `pages`, not yet joined."""
    listed, run = _slots(_OUT_KEYS, slots, runs)
    head = _handle(_OUT_KEYS, handle) + listed
    tail = run + _same(_OUT_KEYS, same)
    total = sum(len(p) for p in pages)
    if not total:
        return [head, tail]
    return [head, SWAP_OUT_PAGES, varint(total), *pages, tail]


def encode_swap_out(handle: bytes, slots: Sequence[int], pages: Pieces, runs: bool = False) -> bytes:
    """A serialized SwapOutRequest whose page blob is the concatenation of `pages`
    (its slots as a run if `runs` allows, see slot_fields)."""
    return b"".join(_swap_out_parts(handle, slots, pages, runs))


def encode_page_swap_out(
    handle: bytes, slots: Sequence[int], pages: Pieces, runs: bool = False, same: SamePages | None = None
) -> bytes:
    """A serialized PageRequest{swap_out}: as encode_swap_out, wrapped, still one copy of the pages;
    `same` lists the same-filled pages that `pages` leaves out."""
    # Always present, even empty: it says which operation this is.
    return _field_of(PAGE_REQUEST_SWAP_OUT, _swap_out_parts(handle, slots, pages, runs, same))


def encode_page_swap_in(
    handle: bytes, slots: Sequence[int], runs: bool = False, same_pages: bool = False
) -> bytes:
    """A serialized PageRequest{swap_in}; `same_pages` lets the reply carry same-filled pages as words."""
    listed, run = _slots(_IN_KEYS, slots, runs)
    same = _IN_KEYS.same_pages + b"\x01" if same_pages else b""
    inner = b"".join((_handle(_IN_KEYS, handle), listed, run, same))
    return b"".join((PAGE_REQUEST_SWAP_IN, varint(len(inner)), inner))


def encode_page_discard(handle: bytes, slots: Sequence[int], runs: bool = False) -> bytes:
    """A serialized PageRequest{discard}."""
    listed, run = _slots(_DISCARD_KEYS, slots, runs)
    inner = b"".join((_handle(_DISCARD_KEYS, handle), listed, run))
    return b"".join((PAGE_REQUEST_DISCARD, varint(len(inner)), inner))


def encode_page_request(op: swap_pb2.SwapInRequest | swap_pb2.DiscardRequest) -> bytes:
    """A serialized PageRequest carrying a SwapIn or Discard given as a message (plain protobuf)."""
    if isinstance(op, swap_pb2.SwapInRequest):
        return swap_pb2.PageRequest(swap_in=op).SerializeToString()
    return swap_pb2.PageRequest(discard=op).SerializeToString()


def encode_swap_in_reply(pages: Pieces, same: SamePages | None = None) -> bytes:
    """A serialized SwapInResponse whose pages are the concatenation of `pages` (one copy), and
    the same-filled pages `same` that it leaves out."""
    return _bytes_field(SWAP_IN_REPLY_PAGES, pages, _same(_IN_REPLY_KEYS, same))


def encode_page_reply(pages: Pieces = (), same: SamePages | None = None) -> bytes:
    """A serialized PageReply for a request that succeeded (SwapIn: the concatenation of
    `pages`, one copy, and the same-filled pages `same` that it leaves out)."""
    return _bytes_field(PAGE_REPLY_PAGES, pages, _same(_REPLY_KEYS, same))


def encode_page_error(code: int, message: str) -> bytes:
    """A serialized PageReply for a request that failed with gRPC status `code`."""
    return swap_pb2.PageReply(code=code, message=message).SerializeToString()


def _field_of(tag: bytes, pieces: Pieces) -> bytes:
    """A length-delimited field whose value is the concatenation of `pieces` (one copy)."""
    return b"".join((tag, varint(sum(len(p) for p in pieces)), *pieces))


def _bytes_field(tag: bytes, pieces: Pieces, after: bytes = b"") -> bytes:
    """As _field_of, but left out when empty, as proto3 leaves an empty bytes field out;
    then the encoded fields `after`."""
    if len(pieces) == 1:  # one piece, as most replies are
        if not pieces[0]:
            return after
        return b"".join((tag, varint(len(pieces[0])), pieces[0], after))
    total = sum(len(p) for p in pieces)
    return b"".join((tag, varint(total), *pieces, after)) if total else after


# -- decoding ---------------------------------------------------------------------------


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("malformed varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def split_bytes_field(
    raw: bytes | memoryview, wanted: int, message: str, max_fields: int | None = None
) -> tuple[memoryview, list[memoryview]]:
    """Walk a serialized message: (a view of the last occurrence of length-delimited field
    `wanted` -- empty if absent, as protobuf would read it; every other field's encoding).

    Raises ValueError for a malformed or truncated message, and, as soon as it
    has seen them, for more than `max_fields` fields.
    """
    buf = memoryview(raw)
    found = buf[0:0]
    rest: list[memoryview] = []
    pos = 0
    seen = 0
    while pos < len(buf):
        seen += 1
        if max_fields is not None and seen > max_fields:
            raise ValueError(f"{message} holds more than {max_fields} fields, more than any valid one")
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos)
            if field == wanted:
                found = buf[pos : pos + length]
                pos += length
                if pos > len(buf):
                    raise ValueError(f"truncated {message}")
                continue
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire} in {message}")
        if pos > len(buf):
            raise ValueError(f"truncated {message}")
        rest.append(buf[start:pos])
    return found, rest


_SWAP_OUT_PAGES_FIELD = _field(_SWAP_OUT, "pages").number


def decode_swap_out(raw: bytes | memoryview, bounds: Bounds) -> tuple[swap_pb2.SwapOutRequest, memoryview]:
    """A SwapOutRequest without its pages (handle and slots, parsed by protobuf) and the
    pages as a view into `raw`: the blob is never copied on its way to the store."""
    pages, rest = split_bytes_field(raw, _SWAP_OUT_PAGES_FIELD, "SwapOutRequest", bounds.fields)
    _check_head(sum(map(len, rest)), "SwapOutRequest", bounds)  # before any copy
    return swap_pb2.SwapOutRequest.FromString(b"".join(rest)), pages


def _check_head(size: int, message: str, bounds: Bounds) -> None:
    if size > bounds.head_bytes:
        raise ValueError(f"{message} is {size} bytes without its pages, more than any valid one")


def decode_small(message: Any, raw: bytes | memoryview, bounds: Bounds) -> Any:
    """`raw` parsed as `message` (a generated class without a page blob), within `bounds`."""
    name = message.DESCRIPTOR.name
    if len(raw) > bounds.head_bytes:
        raise ValueError(f"{name} is {len(raw)} bytes, more than any valid one")
    if len(raw) > 2 * bounds.fields:  # a field takes two bytes at least: fewer cannot hold too many
        split_bytes_field(raw, 0, name, bounds.fields)
    return message.FromString(bytes(raw))


PageHead = swap_pb2.SwapOutRequest | swap_pb2.SwapInRequest | swap_pb2.DiscardRequest


def decode_page_request(raw: bytes | memoryview, bounds: Bounds) -> tuple[Op, PageHead, memoryview]:
    """(operation, its request, the SwapOut page blob as a view into `raw` -- else empty).

    Raises ValueError unless `raw` is a PageRequest carrying exactly one operation
    within `bounds`.
    """
    buf = memoryview(raw)
    if len(buf) == 0:
        raise ValueError("PageRequest carries no operation")
    key, pos = _read_varint(buf, 0)
    op = _OP_OF_FIELD.get(key >> 3)
    if op is None or key & 7 != _LEN:
        raise ValueError(f"PageRequest field {key >> 3} (wire type {key & 7}) is not an operation")
    length, pos = _read_varint(buf, pos)
    if pos + length != len(buf):
        raise ValueError(
            "PageRequest must carry exactly one operation"
            if pos + length < len(buf)
            else "truncated PageRequest"
        )
    inner = buf[pos:]
    if op is SWAP_OUT:
        head, pages = decode_swap_out(inner, bounds)
        return op, head, pages
    parsed = decode_small(_HEAD_OF_OP[op], inner, bounds)  # slots only: a small copy
    return op, parsed, buf[0:0]


_PAGE_REPLY_PAGES_FIELD = _field(_PAGE_REPLY, "pages").number


def decode_page_reply(raw: bytes) -> tuple[int, str, memoryview]:
    """(status code, message, pages as a view into `raw`) of a serialized PageReply."""
    code, message, pages, _ = split_page_reply(raw)
    return code, message, pages


def split_page_reply(raw: bytes) -> tuple[int, str, memoryview, SamePages | None]:
    """(status code, message, pages as a view into `raw`, the same-filled pages they leave
    out) of a serialized PageReply. Raises ValueError if it is malformed."""
    buf = memoryview(raw)
    pos = 0
    pages = buf[0:0]
    if len(buf) > 1 and buf[0] == PAGE_REPLY_PAGES[0]:  # pages first, as this module writes them
        length, pos = _read_varint(buf, 1)
        pages, pos = buf[pos : pos + length], pos + length
        if pos == len(buf):  # and nothing else, as most replies are
            return 0, "", pages, None
    same = _same_as_written(buf, pos)
    if same is not None:
        return 0, "", pages, same
    pages, rest = split_bytes_field(buf, _PAGE_REPLY_PAGES_FIELD, "PageReply")
    if not rest:
        return 0, "", pages, None
    reply = swap_pb2.PageReply.FromString(b"".join(rest))
    return reply.code, reply.message, pages, same_from_wire(reply.same_index, reply.same_word)


def _same_as_written(buf: memoryview, pos: int) -> SamePages | None:
    """The rest of a reply from `pos`, if it is exactly same_index and same_word as _same()
    writes them with positions under 128 (one byte each); else None, for the full parse."""
    keys = _REPLY_KEYS
    if buf[pos : pos + 1] != keys.same_index:
        return None
    count, at = _read_varint(buf, pos + 1)
    index = list(buf[at : at + count])
    at += count
    if buf[at : at + 1] != keys.same_word or max(index, default=0x80) >= 0x80:
        return None
    size, at = _read_varint(buf, at + 1)
    if (
        at + size != len(buf)
        or size != WORD * len(index)
        or any(a >= b for a, b in itertools.pairwise(index))
    ):
        return None
    return SamePages(index, bytes(buf[at:]))


def same_from_wire(index: Sequence[int], words: Sequence[int]) -> SamePages | None:
    """The same-filled pages of a message's same_index and same_word (None for none).
    Raises ValueError unless they pair up and the positions increase."""
    if len(index) != len(words):
        raise ValueError(f"{len(index)} same_index for {len(words)} same_word")
    if not index:
        return None
    listed = list(index)
    if any(a >= b for a, b in itertools.pairwise(listed)):
        raise ValueError("same_index must increase")
    return SamePages(listed, struct.pack(f"<{len(words)}Q", *words))
