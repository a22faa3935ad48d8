"""Ids and ranges."""

from __future__ import annotations

import pytest

from protocol.errors import BlockreplError, LimitExceededError, MalformedError
from protocol.limits import MAX_DISK_BYTES, check_id, check_range


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
