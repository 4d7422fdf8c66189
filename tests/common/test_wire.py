"""The hand-built page messages: byte-identical to protobuf's own encoding both ways, and bounded."""

from __future__ import annotations

from typing import Any

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
    encode_page_discard,
    encode_page_error,
    encode_page_reply,
    encode_page_request,
    encode_page_swap_in,
    encode_page_swap_out,
    encode_swap_in_reply,
    encode_swap_out,
    same_from_wire,
    slot_fields,
    split_page_reply,
    varint,
)
from netswap.common.samepages import SamePages
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


# -- hand-encoded page requests and same-filled pages -------------------------------------

handles_st = st.binary(max_size=40)
slot_names_st = st.one_of(
    slots_st,
    st.builds(lambda first, n: range(first, first + n), st.integers(0, 2**62), st.integers(0, 300)),
)


@st.composite
def same_st(draw: st.DrawFn, max_pages: int = 40) -> SamePages | None:
    """Same-filled pages among up to max_pages: increasing positions, any 8-byte words."""
    positions = (
        st.integers(0, 127) if draw(st.booleans()) else st.integers(0, 2**32 - 1)
    )  # one byte each, or any
    index = sorted(draw(st.sets(positions, max_size=max_pages)))
    if not index:
        return None
    return SamePages(index, b"".join(draw(st.binary(min_size=8, max_size=8)) for _ in index))


def wire_words(same: SamePages | None) -> dict[str, Any]:
    """same as protobuf's fields take it: positions and each word as a little-endian number."""
    if same is None:
        return {}
    return {"same_index": same.index, "same_word": [int.from_bytes(w, "little") for _, w in same]}


@given(handle=handles_st, slots=slot_names_st, runs=st.booleans(), same_pages=st.booleans())
def test_swap_in_and_discard_requests_encoded_by_hand_match_protobuf(
    handle: bytes, slots: list[int] | range, runs: bool, same_pages: bool
) -> None:
    fields = slot_fields(slots, runs)
    swap_in = swap_pb2.SwapInRequest(handle=handle, same_pages=same_pages, **fields)
    assert encode_page_swap_in(handle, slots, runs, same_pages) == encode_page_request(swap_in)
    discard = swap_pb2.DiscardRequest(handle=handle, **fields)
    assert encode_page_discard(handle, slots, runs) == encode_page_request(discard)
    op, head, _ = decode_page_request(
        encode_page_swap_in(handle, slots, runs, same_pages), Bounds.for_batches(300)
    )
    assert (op, head) == (Op.SWAP_IN, swap_in)


@given(
    handle=handles_st, slots=slot_names_st, runs=st.booleans(), same=same_st(),
    pages=st.binary(max_size=9000), cut=st.integers(0, 9000),
)  # fmt: skip
def test_swap_out_with_a_run_and_same_pages_matches_protobuf_byte_for_byte(
    handle: bytes, slots: list[int] | range, runs: bool, same: SamePages | None, pages: bytes, cut: int
) -> None:
    message = swap_pb2.SwapOutRequest(
        handle=handle, pages=pages, **slot_fields(slots, runs), **wire_words(same)
    )
    raw = encode_page_swap_out(handle, slots, pieces_of(pages, cut), runs, same)
    assert raw == swap_pb2.PageRequest(swap_out=message).SerializeToString()
    op, head, blob = decode_page_request(raw, Bounds.for_batches(300))
    assert (op, bytes(blob)) == (Op.SWAP_OUT, pages)
    assert isinstance(head, swap_pb2.SwapOutRequest)
    assert same_from_wire(head.same_index, head.same_word) == same


@given(pages=st.binary(max_size=20000), cut=st.integers(0, 20000), same=same_st())
def test_replies_with_same_pages_match_protobuf_and_decode_back(
    pages: bytes, cut: int, same: SamePages | None
) -> None:
    words = wire_words(same)
    raw = encode_page_reply(pieces_of(pages, cut), same)
    assert raw == swap_pb2.PageReply(pages=pages, **words).SerializeToString()
    assert encode_swap_in_reply(pieces_of(pages, cut), same) == (
        swap_pb2.SwapInResponse(pages=pages, **words).SerializeToString()
    )
    code, message, got, got_same = split_page_reply(raw)
    assert (code, message, bytes(got), got_same) == (0, "", pages, same)
    assert bytes(decode_page_reply(raw)[2]) == pages  # as a caller that asked for no words reads it


def test_same_fields_must_pair_up_and_increase() -> None:
    assert same_from_wire([], []) is None
    assert same_from_wire([0, 5], [1, 2**64 - 1]) == SamePages(
        [0, 5], (1).to_bytes(8, "little") + b"\xff" * 8
    )
    with pytest.raises(ValueError, match="2 same_index for 1 same_word"):
        same_from_wire([0, 1], [0])
    for index in ([3, 3], [4, 2]):
        with pytest.raises(ValueError, match="must increase"):
            same_from_wire(index, [0, 0])
    with pytest.raises(ValueError, match="must increase"):
        split_page_reply(swap_pb2.PageReply(same_index=[2, 1], same_word=[0, 0]).SerializeToString())
