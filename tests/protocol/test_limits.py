"""Ids, ranges and the sizes that follow from the formats."""

from __future__ import annotations

import pytest

from protocol.compression import Compression
from protocol.errors import BlockreplError, LimitExceededError, MalformedError
from protocol.hrl import HRL_HEADER, HrlHeader
from protocol.limits import (
    HRL_HEADER_BYTES,
    MAX_DISK_BYTES,
    MAX_HRL_FILE_BYTES,
    MAX_HRL_PLAINTEXT,
    check_id,
    check_range,
)


@pytest.mark.parametrize("good", ["a", "vm01-disk_0.vmdk", "x" * 64, "..."])
def test_good_ids(good: str) -> None:
    assert check_id("disk", good) == good


@pytest.mark.parametrize("bad", ["", "x" * 65, ".", "..", "a/b", "a b", "é", "a\0", "../etc"])
def test_bad_ids(bad: str) -> None:
    with pytest.raises(MalformedError, match="disk id must match"):
        check_id("disk", bad)


def test_ranges_stay_below_the_largest_disk() -> None:
    check_range(MAX_DISK_BYTES - 1, 1, max_length=10, what="w")
    with pytest.raises(LimitExceededError, match="end at or before"):
        check_range(MAX_DISK_BYTES - 1, 2, max_length=10, what="w")
    with pytest.raises(LimitExceededError, match="at most 10"):
        check_range(0, 11, max_length=10, what="w")
    with pytest.raises(MalformedError):
        check_range(-1, 1, max_length=10, what="w")


def test_errors_carry_codes_and_details() -> None:
    error = LimitExceededError("too big", details={"max_payload_bytes": 5})
    assert isinstance(error, BlockreplError)
    assert (error.code, error.http_status) == ("too-large", 413)
    assert error.to_json() == {"error": "too-large", "message": "too big", "max_payload_bytes": 5}


def test_the_largest_hrl_file_is_the_format_around_the_largest_plaintext() -> None:
    # limits.py cannot import hrl.py (hrl.py imports it): the sizes it names
    # are checked against the format here.
    assert HRL_HEADER.size == HRL_HEADER_BYTES
    largest = HrlHeader(
        disk_id="d", generation=1, first_seq=1, record_count=1, key_id=1,
        first_capture_ns=0, last_capture_ns=0, receive_ns=0,
        plaintext_len=MAX_HRL_PLAINTEXT, stored_len=MAX_HRL_PLAINTEXT,
        kdf_salt=bytes(32), plaintext_xxh3_128=bytes(16), data_len=0,
        compression=Compression.NONE,
    )  # fmt: skip
    largest.pack()  # a header the format allows
    assert largest.file_len == MAX_HRL_FILE_BYTES
    assert MAX_HRL_FILE_BYTES == 208 + 64 * 2**20 + 16  # docs/api.md says so
