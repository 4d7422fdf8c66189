"""Hand-built encoding of the messages that carry pages, so pages are copied as little as possible.

protobuf's Python API only takes `bytes` for a bytes field: putting pool pages
into a SwapOutRequest would copy them into a bytes object and then again into
the serialized message; parsing one copies the blob out of the received bytes.
Instead the small part of each message (handle, packed slots or a run) goes through
protobuf and the page blob is handled here, as field 3 of SwapOutRequest and
field 1 of SwapInResponse -- a concatenation of encoded fields is itself a
valid encoding, identical to what SerializeToString would produce.

Both ends use it: the client to send SwapOut and read SwapIn replies, the
server to read SwapOut and send SwapIn replies -- as unary calls, or wrapped
in the PageRequest / PageReply messages of PageStream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from netswap.v1 import swap_pb2

_PAGES_TAG = b"\x1a"  # field 3, wire type 2 (length-delimited)


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def slot_fields(slots: Sequence[int], runs: bool) -> dict[str, Any]:
    """The fields of a request that name `slots`: a run (run_start, run_count) when they
    are one -- given as a range -- and the server takes runs (`runs`), else listed."""
    if runs and type(slots) is range and slots.step == 1 and slots:
        return {"run_start": slots.start, "run_count": len(slots)}
    return {"slots": slots}


def _swap_out_parts(
    handle: bytes, slots: Sequence[int], pages: Sequence[memoryview], runs: bool
) -> list[bytes | memoryview]:
    """The pieces of a serialized SwapOutRequest whose page blob is `pages`, not yet joined."""
    head = swap_pb2.SwapOutRequest(handle=handle, **slot_fields(slots, runs)).SerializeToString()
    total = sum(len(p) for p in pages)
    if not total:
        return [head]
    return [head, _PAGES_TAG, varint(total), *pages]


def encode_swap_out(
    handle: bytes, slots: Sequence[int], pages: Sequence[memoryview], runs: bool = False
) -> bytes:
    """A serialized SwapOutRequest whose page blob is the concatenation of `pages`
    (its slots as a run if `runs` allows, see slot_fields)."""
    return b"".join(_swap_out_parts(handle, slots, pages, runs))


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
    raw: bytes | memoryview, wanted: int, message: str
) -> tuple[memoryview, list[memoryview]]:
    """Walk a serialized message: (a view of the last occurrence of length-delimited field
    `wanted` -- empty if absent, as protobuf would read it; every other field's encoding).

    Raises ValueError for a malformed or truncated message.
    """
    buf = memoryview(raw)
    found = buf[0:0]
    rest: list[memoryview] = []
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
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


def decode_swap_in_pages(raw: bytes) -> memoryview:
    """The `pages` field of a serialized SwapInResponse, as a view into `raw`."""
    return split_bytes_field(raw, 1, "SwapInResponse")[0]


Pieces = Sequence[bytes | bytearray | memoryview]


def _field(tag: bytes, pieces: Pieces) -> bytes:
    """A length-delimited field whose value is the concatenation of `pieces` (one copy)."""
    return b"".join((tag, varint(sum(len(p) for p in pieces)), *pieces))


def _bytes_field(tag: bytes, pieces: Pieces) -> bytes:
    """As _field, but left out when empty, as proto3 leaves an empty bytes field out."""
    return _field(tag, pieces) if any(len(p) for p in pieces) else b""


def encode_swap_in_reply(pages: Pieces) -> bytes:
    """A serialized SwapInResponse whose pages are the concatenation of `pages` (one copy)."""
    return _bytes_field(b"\x0a", pages)


def decode_swap_out(raw: bytes | memoryview) -> tuple[swap_pb2.SwapOutRequest, memoryview]:
    """A SwapOutRequest without its pages (handle and slots, parsed by protobuf) and the
    pages as a view into `raw`: the blob is never copied on its way to the store."""
    pages, rest = split_bytes_field(raw, 3, "SwapOutRequest")
    return swap_pb2.SwapOutRequest.FromString(b"".join(rest)), pages


# -- PageStream ------------------------------------------------------------------------

_OP_OF_FIELD = {1: "SwapOut", 2: "SwapIn", 3: "Discard"}  # PageRequest's oneof


def encode_page_swap_out(
    handle: bytes, slots: Sequence[int], pages: Sequence[memoryview], runs: bool = False
) -> bytes:
    """A serialized PageRequest{swap_out}: as encode_swap_out, wrapped, still one copy of the pages."""
    # Always present, even empty: it says which operation this is.
    return _field(b"\x0a", _swap_out_parts(handle, slots, pages, runs))


def encode_page_request(op: swap_pb2.SwapInRequest | swap_pb2.DiscardRequest) -> bytes:
    """A serialized PageRequest carrying a SwapIn or Discard (no pages: plain protobuf)."""
    if isinstance(op, swap_pb2.SwapInRequest):
        return swap_pb2.PageRequest(swap_in=op).SerializeToString()
    return swap_pb2.PageRequest(discard=op).SerializeToString()


PageHead = swap_pb2.SwapOutRequest | swap_pb2.SwapInRequest | swap_pb2.DiscardRequest
PageOp = tuple[str, PageHead, memoryview]


def decode_page_request(raw: bytes) -> PageOp:
    """(operation name, its request, the SwapOut page blob as a view into `raw` -- else empty).

    Raises ValueError unless `raw` is a PageRequest carrying exactly one operation.
    """
    buf = memoryview(raw)
    if len(buf) == 0:
        raise ValueError("PageRequest carries no operation")
    key, pos = _read_varint(buf, 0)
    op = _OP_OF_FIELD.get(key >> 3)
    if op is None or key & 7 != 2:
        raise ValueError(f"PageRequest field {key >> 3} (wire type {key & 7}) is not an operation")
    length, pos = _read_varint(buf, pos)
    if pos + length != len(buf):
        raise ValueError(
            "PageRequest must carry exactly one operation"
            if pos + length < len(buf)
            else "truncated PageRequest"
        )
    inner = buf[pos:]
    if op == "SwapOut":
        head, pages = decode_swap_out(inner)
        return op, head, pages
    request = swap_pb2.SwapInRequest if op == "SwapIn" else swap_pb2.DiscardRequest
    return op, request.FromString(bytes(inner)), buf[0:0]  # slots only: a small copy


def encode_page_reply(pages: Pieces = ()) -> bytes:
    """A serialized PageReply for a request that succeeded (SwapIn: the concatenation of
    `pages`, one copy)."""
    return _bytes_field(_PAGES_TAG, pages)


def encode_page_error(code: int, message: str) -> bytes:
    """A serialized PageReply for a request that failed with gRPC status `code`."""
    return swap_pb2.PageReply(code=code, message=message).SerializeToString()


def decode_page_reply(raw: bytes) -> tuple[int, str, memoryview]:
    """(status code, message, pages as a view into `raw`) of a serialized PageReply."""
    pages, rest = split_bytes_field(raw, 3, "PageReply")
    if not rest:
        return 0, "", pages
    reply = swap_pb2.PageReply.FromString(b"".join(rest))
    return reply.code, reply.message, pages
