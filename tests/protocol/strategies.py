"""Hypothesis strategies for records and batches."""

from __future__ import annotations

from hypothesis import strategies as st

from protocol.limits import MAX_DISK_BYTES
from protocol.records import Record, Tag, TagKind, Write, Zero

ids = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True).filter(lambda s: s not in {".", ".."})
offsets = st.integers(0, MAX_DISK_BYTES - 2**31)  # room for the longest generated range

writes = st.builds(Write, offsets, st.binary(min_size=1, max_size=300))
zeros = st.builds(Zero, offsets, st.integers(1, 2**30))
names = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_categories=("Cc",)),
    max_size=40,
).filter(lambda s: len(s.encode()) <= 128 and s == s.strip())


@st.composite
def tags(draw: st.DrawFn) -> Tag:
    kind = draw(st.sampled_from(TagKind))
    group = draw(ids) if kind is TagKind.GROUP else ""
    return Tag(kind, draw(st.binary(min_size=16, max_size=16)), draw(names),
               draw(st.integers(0, 2**63 - 1)), group)  # fmt: skip


records: st.SearchStrategy[Record] = st.one_of(writes, zeros, tags())
record_lists = st.lists(records, min_size=1, max_size=12)
