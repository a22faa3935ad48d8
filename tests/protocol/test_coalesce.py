"""Coalescing consecutive batches: the merged batch holds the same records, in order."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.batch import BatchDecoder, lay_out_batch
from protocol.coalesce import merge, merged_flags, runs
from protocol.errors import LimitExceededError, MalformedError
from protocol.limits import MAX_RECORDS_PER_BATCH
from protocol.records import NO_FLAGS, Buffer, Record, StreamFlags, Write

from .strategies import record_lists

PASS = StreamFlags.RESYNC
END = StreamFlags.RESYNC | StreamFlags.RESYNC_END
flag_values = st.sampled_from([NO_FLAGS, PASS, END])


def _batches(
    record_runs: list[list[Record]], flags: list[StreamFlags], *, first_seq: int = 7
) -> list[list[Buffer]]:
    """Consecutive batches, each split into pieces at random points."""
    out: list[list[Buffer]] = []
    seq = first_seq
    rng = random.Random(len(record_runs))
    for index, (records, flag) in enumerate(zip(record_runs, flags, strict=True)):
        batch = lay_out_batch(
            disk_id="d0", generation=3, first_seq=seq, records=records,
            first_capture_ns=1000 + index, last_capture_ns=2000 + index, flags=flag,
        )  # fmt: skip
        whole = b"".join(batch.segments)
        cuts = sorted(rng.sample(range(1, len(whole)), k=min(3, len(whole) - 1)))
        out.append([whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)])
        seq += len(records)
    return out


def _decode(buffers: list[Buffer]) -> list[Record]:
    decoder = BatchDecoder()
    for piece in buffers:
        decoder.feed(piece)
    decoder.feed_eof()
    (batch,) = list(decoder.events())
    return list(batch.records)


@given(st.lists(record_lists, min_size=1, max_size=6), st.data())
def test_a_merge_holds_every_record_in_order(
    record_runs: list[list[Record]], data: st.DataObject
) -> None:
    flag = data.draw(st.sampled_from([NO_FLAGS, PASS]))
    flags = [flag] * len(record_runs)
    if flag is PASS and data.draw(st.booleans()):
        flags[-1] = END
    merged = merge(_batches(record_runs, flags))
    assert merged.header.first_seq == 7
    assert merged.header.record_count == sum(len(r) for r in record_runs)
    assert merged.header.flags == flags[-1]
    assert (merged.header.first_capture_ns, merged.header.last_capture_ns) == (
        1000,
        2000 + len(record_runs) - 1,
    )
    # the decoder checks the header and the payload digest
    assert _decode(merged.segments) == [r for run in record_runs for r in run]


@given(st.lists(flag_values, min_size=1, max_size=12), st.integers(1, 5))
def test_runs_merge_only_what_may_merge(flags: list[StreamFlags], per_run: int) -> None:
    batches = _batches([[Write(4096 * i, b"x" * 100)] for i in range(len(flags))], flags)
    headers = [merge([b]).header for b in batches]
    lengths = runs(headers, max_payload=2**30, max_records=per_run)
    assert sum(lengths) == len(headers)
    start = 0
    for length in lengths:
        assert length <= per_run
        merge(batches[start : start + length])  # what runs() put together may merge
        if length < per_run and start + length < len(batches):
            # and a run ends early only where the next batch may not join it
            with pytest.raises(MalformedError, match="cannot be merged"):
                merge(batches[start : start + length + 1])
        start += length


def test_a_batch_outside_a_pass_never_merges_into_one_inside() -> None:
    assert merged_flags(NO_FLAGS, PASS) is None
    assert merged_flags(NO_FLAGS, END) is None
    assert merged_flags(END, NO_FLAGS) is None
    assert merged_flags(END, PASS) is None
    assert merged_flags(PASS, NO_FLAGS) is None
    assert merged_flags(PASS, END) == END
    batches = _batches([[Write(0, b"a")], [Write(0, b"b")]], [NO_FLAGS, PASS])
    with pytest.raises(MalformedError, match="cannot be merged"):
        merge(batches)


def test_only_consecutive_batches_of_one_stream_merge() -> None:
    one = _batches([[Write(0, b"a")]], [NO_FLAGS], first_seq=1)
    later = _batches([[Write(0, b"b")]], [NO_FLAGS], first_seq=3)
    with pytest.raises(MalformedError, match="seq 2 to merge next, found d0 generation 3 seq 3"):
        merge([*one, *later])
    with pytest.raises(MalformedError, match="at least one batch"):
        merge([])


def test_runs_keep_within_the_bounds_and_a_big_batch_alone() -> None:
    sizes = [100, 100, 5000, 100, 100, 100]
    batches = _batches([[Write(0, b"x" * n)] for n in sizes], [NO_FLAGS] * len(sizes))
    headers = [merge([b]).header for b in batches]
    bound = headers[0].payload_len * 2
    assert runs(headers, max_payload=bound, max_records=100) == [2, 1, 2, 1]


def test_a_merge_over_the_format_limit_is_refused() -> None:
    many: list[Record] = [Write(i, b"x") for i in range(MAX_RECORDS_PER_BATCH // 2 + 1)]
    with pytest.raises(LimitExceededError, match="merged batch may hold"):
        merge(_batches([many, many], [NO_FLAGS, NO_FLAGS]))
