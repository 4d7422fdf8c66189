"""The hand-built page messages: byte-identical to protobuf's own encoding both ways, and bounded."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netswap.common.pagewire import (
    CONTROL,
    PAGE_REPLY_PAGES,
    SWAP_IN_REPLY_PAGES,
    SWAP_OUT_PAGES,
    Bounds,
    Op,
    decode_page_reply,
    decode_page_request,
    decode_small,
    decode_swap_out,
    encode_page_error,
    encode_page_reply,
    encode_page_request,
    encode_page_swap_out,
    encode_swap_in_reply,
    encode_swap_out,
    slot_fields,
    varint,
)
from netswap.v1 import swap_pb2

slots_st = st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=40)
BOUNDS = Bounds.for_batches(256)


def pieces_of(data: bytes, cut: int) -> list[memoryview]:
    cut = min(cut, len(data))
    return [memoryview(data)[:cut], memoryview(data)[cut:]]


def test_tags_are_the_descriptors() -> None:
    # field 3 of SwapOutRequest, 1 of SwapInResponse, 3 of PageReply; all length-delimited
    assert (SWAP_OUT_PAGES, SWAP_IN_REPLY_PAGES, PAGE_REPLY_PAGES) == (b"\x1a", b"\x0a", b"\x1a")


@given(
    handle=st.binary(max_size=40), slots=slots_st, pages=st.binary(max_size=9000), cut=st.integers(0, 9000)
)
def test_swap_out_encoding_matches_protobuf(handle: bytes, slots: list[int], pages: bytes, cut: int) -> None:
    theirs = swap_pb2.SwapOutRequest(handle=handle, slots=slots, pages=pages).SerializeToString()
    assert encode_swap_out(handle, slots, [memoryview(pages)]) == theirs
    assert encode_swap_out(handle, slots, pieces_of(pages, cut)) == theirs  # gathered: the same bytes
    wrapped = swap_pb2.PageRequest(
        swap_out=swap_pb2.SwapOutRequest(handle=handle, slots=slots, pages=pages)
    ).SerializeToString()
    assert encode_page_swap_out(handle, slots, pieces_of(pages, cut)) == wrapped


@given(
    handle=st.binary(max_size=40),
    first=st.integers(0, 2**63),
    n=st.integers(0, 300),
    runs=st.booleans(),
)
def test_a_range_goes_as_a_run_when_the_server_takes_runs(
    handle: bytes, first: int, n: int, runs: bool
) -> None:
    slots = range(first, first + n)
    pages = bytes(n)  # its length is not the encoder's business
    parsed = swap_pb2.SwapOutRequest.FromString(encode_swap_out(handle, slots, [memoryview(pages)], runs))
    if runs and n:
        assert (parsed.run_start, parsed.run_count, list(parsed.slots)) == (first, n, [])
    else:  # an older server, or nothing to name: listed, as before runs existed
        assert (parsed.run_start, parsed.run_count, list(parsed.slots)) == (0, 0, list(slots))
    assert (parsed.handle, parsed.pages) == (handle, pages)


def test_only_a_range_of_step_one_is_a_run() -> None:
    assert slot_fields(range(3, 7), True) == {"run_start": 3, "run_count": 4}
    assert slot_fields([3, 4, 5, 6], True) == {"slots": [3, 4, 5, 6]}  # a list is sent as given
    assert slot_fields(range(3, 9, 2), True) == {"slots": range(3, 9, 2)}
    assert slot_fields(range(3, 7), False) == {"slots": range(3, 7)}


@given(handle=st.binary(max_size=40), slots=slots_st, pages=st.binary(max_size=9000))
def test_server_side_swap_out_decoding_matches_protobuf(
    handle: bytes, slots: list[int], pages: bytes
) -> None:
    raw = swap_pb2.SwapOutRequest(handle=handle, slots=slots, pages=pages).SerializeToString()
    head, blob = decode_swap_out(raw, BOUNDS)
    assert (head.handle, list(head.slots), bytes(blob)) == (handle, slots, pages)
    # field order is free in protobuf: pages first parses the same
    reordered = b"".join(
        swap_pb2.SwapOutRequest(**{k: v}).SerializeToString()  # type: ignore[arg-type]
        for k, v in (("pages", pages), ("slots", slots), ("handle", handle))
    )
    head, blob = decode_swap_out(reordered, BOUNDS)
    assert (head.handle, list(head.slots), bytes(blob)) == (handle, slots, pages)


@given(
    op=st.sampled_from([Op.SWAP_IN, Op.DISCARD]),
    handle=st.binary(max_size=40),
    slots=slots_st,
    run=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
)
def test_page_requests_without_pages_decode_as_protobuf(
    op: Op, handle: bytes, slots: list[int], run: tuple[int, int]
) -> None:
    cls = swap_pb2.SwapInRequest if op is Op.SWAP_IN else swap_pb2.DiscardRequest
    inner = cls(handle=handle, slots=slots, run_start=run[0], run_count=run[1])
    raw = encode_page_request(inner)
    field = "swap_in" if op is Op.SWAP_IN else "discard"
    assert raw == swap_pb2.PageRequest(**{field: inner}).SerializeToString()  # type: ignore[arg-type]
    got, head, pages = decode_page_request(raw, BOUNDS)
    assert (got, head, bytes(pages)) == (op, inner, b"")
    assert decode_small(cls, inner.SerializeToString(), BOUNDS) == inner


@given(handle=st.binary(max_size=40), slots=slots_st, pages=st.binary(max_size=9000))
def test_page_swap_out_decodes_as_protobuf(handle: bytes, slots: list[int], pages: bytes) -> None:
    raw = encode_page_swap_out(handle, slots, [memoryview(pages)])
    op, head, blob = decode_page_request(raw, BOUNDS)
    assert op is Op.SWAP_OUT
    assert isinstance(head, swap_pb2.SwapOutRequest)
    assert (head.handle, list(head.slots), bytes(blob)) == (handle, slots, pages)


@given(pages=st.binary(max_size=20000), cut=st.integers(0, 20000))
def test_reply_encodings_match_protobuf(pages: bytes, cut: int) -> None:
    assert (
        encode_swap_in_reply(pieces_of(pages, cut))
        == swap_pb2.SwapInResponse(pages=pages).SerializeToString()
    )
    assert encode_page_reply(pieces_of(pages, cut)) == swap_pb2.PageReply(pages=pages).SerializeToString()


@given(code=st.integers(0, 16), message=st.text(max_size=200), pages=st.binary(max_size=5000))
def test_page_reply_decoding_matches_protobuf(code: int, message: str, pages: bytes) -> None:
    raw = swap_pb2.PageReply(code=code, message=message, pages=pages).SerializeToString()
    got_code, got_message, got_pages = decode_page_reply(raw)
    assert (got_code, got_message, bytes(got_pages)) == (code, message, pages)
    assert (
        encode_page_error(code, message) == swap_pb2.PageReply(code=code, message=message).SerializeToString()
    )


@given(pages=st.binary(max_size=2000), junk=st.binary(max_size=30))
def test_reply_decoding_skips_unknown_fields(pages: bytes, junk: bytes) -> None:
    raw = swap_pb2.PageReply(pages=pages).SerializeToString()
    # an unknown field (number 9, length-delimited) before and a varint field (10) after
    extra = b"\x4a" + varint(len(junk)) + junk
    assert bytes(decode_page_reply(extra + raw + b"\x50\x96\x01")[2]) == pages


def test_empty_reply_is_no_pages_and_truncation_is_an_error() -> None:
    assert decode_page_reply(b"") == (0, "", memoryview(b""))
    raw = swap_pb2.PageReply(pages=b"x" * 100).SerializeToString()
    with pytest.raises(ValueError, match="truncated"):
        decode_page_reply(raw[:-1])


def test_more_fields_than_any_valid_request_are_refused_before_protobuf_sees_them() -> None:
    bounds = Bounds.for_batches(4)
    many = b"\x10\x00" * 1_000_000  # a million one-byte slot fields, unpacked
    with pytest.raises(ValueError, match=f"more than {bounds.fields} fields"):
        decode_swap_out(many, bounds)
    with pytest.raises(ValueError, match=f"more than {bounds.fields} fields"):
        decode_small(swap_pb2.SwapInRequest, b"\x10\x00" * (bounds.fields + 1), bounds)
    with pytest.raises(ValueError, match="more than 16 fields"):
        decode_small(swap_pb2.SwapOnRequest, b"\x50\x00" * 17, CONTROL)
    # exactly as many as a valid one may hold: parsed
    slots = decode_small(swap_pb2.SwapInRequest, b"\x10\x01" * bounds.fields, bounds).slots
    assert list(slots) == [1] * bounds.fields
    with pytest.raises(ValueError, match="bytes without its pages"):
        decode_swap_out(b"\x0a" + varint(bounds.head_bytes) + bytes(bounds.head_bytes), bounds)
