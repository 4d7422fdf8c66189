"""Hand-built encoding for the two messages that carry pages, so pages are copied once.

protobuf's Python API only takes `bytes` for a bytes field: putting pool pages
into a SwapOutRequest would copy them into a bytes object and then again into
the serialized message. Instead the small header (handle, packed slots) is
serialized by protobuf and the page blob is appended as field 3 -- a
concatenation of encoded fields is itself a valid encoding, identical to what
SerializeToString would produce. SwapIn replies are decoded to a memoryview of
the received bytes, so the pages are copied once, straight into their target.
"""

from __future__ import annotations

from collections.abc import Sequence

from netswap.v1 import swap_pb2

_PAGES_TAG = b"\x1a"  # field 3, wire type 2 (length-delimited)


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_swap_out(handle: bytes, slots: Sequence[int], pages: Sequence[memoryview]) -> bytes:
    """A serialized SwapOutRequest whose page blob is the concatenation of `pages`."""
    head = swap_pb2.SwapOutRequest(handle=handle, slots=slots).SerializeToString()
    total = sum(len(p) for p in pages)
    if not total:
        return head
    return b"".join((head, _PAGES_TAG, varint(total), *pages))


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("malformed varint in SwapInResponse")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def decode_swap_in_pages(raw: bytes) -> memoryview:
    """The `pages` field of a serialized SwapInResponse, as a view into `raw`."""
    buf = memoryview(raw)
    pages = buf[0:0]
    pos = 0
    while pos < len(buf):
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
            if field == 1:
                pages = buf[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire} in SwapInResponse")
        if pos > len(buf):
            raise ValueError("truncated SwapInResponse")
    return pages
