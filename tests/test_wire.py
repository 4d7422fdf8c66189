"""The hand-built page messages are byte-identical to protobuf's own encoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netswap.common.pagewire import (
    decode_swap_in_pages,
    decode_swap_out,
    encode_swap_in_reply,
    encode_swap_out,
    slot_fields,
    varint,
)
from netswap.v1 import swap_pb2

slots_st = st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=40)


@given(handle=st.binary(max_size=40), slots=slots_st, pages=st.binary(max_size=9000))
def test_swap_out_encoding_matches_protobuf(handle: bytes, slots: list[int], pages: bytes) -> None:
    ours = encode_swap_out(handle, slots, [memoryview(pages)])
    theirs = swap_pb2.SwapOutRequest(handle=handle, slots=slots, pages=pages).SerializeToString()
    assert ours == theirs
    parsed = swap_pb2.SwapOutRequest.FromString(ours)
    assert (parsed.handle, list(parsed.slots), parsed.pages) == (handle, slots, pages)
    # gathered from pieces: the same bytes
    cut = len(pages) // 3
    pieces = [memoryview(pages)[:cut], memoryview(pages)[cut:]]
    assert encode_swap_out(handle, slots, pieces) == theirs


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


@given(pages=st.binary(max_size=20000), junk=st.binary(max_size=30))
def test_swap_in_decoding_reads_protobuf_and_skips_unknown_fields(pages: bytes, junk: bytes) -> None:
    raw = swap_pb2.SwapInResponse(pages=pages).SerializeToString()
    assert decode_swap_in_pages(raw) == pages
    # an unknown field (number 9, length-delimited) before and a varint field (10) after
    extra = b"\x4a" + varint(len(junk)) + junk
    assert decode_swap_in_pages(extra + raw + b"\x50\x96\x01") == pages


def test_empty_reply_is_no_pages() -> None:
    assert len(decode_swap_in_pages(b"")) == 0


def test_truncated_reply_is_an_error() -> None:
    raw = swap_pb2.SwapInResponse(pages=b"x" * 100).SerializeToString()
    with pytest.raises(ValueError, match="truncated"):
        decode_swap_in_pages(raw[:-1])


@given(handle=st.binary(max_size=40), slots=slots_st, pages=st.binary(max_size=9000))
def test_server_side_swap_out_decoding_matches_protobuf(
    handle: bytes, slots: list[int], pages: bytes
) -> None:
    raw = swap_pb2.SwapOutRequest(handle=handle, slots=slots, pages=pages).SerializeToString()
    head, blob = decode_swap_out(raw)
    assert (head.handle, list(head.slots), bytes(blob)) == (handle, slots, pages)
    # field order is free in protobuf: pages first parses the same
    reordered = b"".join(
        swap_pb2.SwapOutRequest(**{k: v}).SerializeToString()  # type: ignore[arg-type]
        for k, v in (("pages", pages), ("slots", slots), ("handle", handle))
    )
    head, blob = decode_swap_out(reordered)
    assert (head.handle, list(head.slots), bytes(blob)) == (handle, slots, pages)


@given(pages=st.binary(max_size=20000))
def test_swap_in_reply_encoding_matches_protobuf(pages: bytes) -> None:
    expected = swap_pb2.SwapInResponse(pages=pages).SerializeToString()
    assert encode_swap_in_reply([pages]) == expected
    cut = len(pages) // 3  # pieces joined are the same field
    assert encode_swap_in_reply([pages[:cut], memoryview(pages)[cut:]]) == expected
