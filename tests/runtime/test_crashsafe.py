"""Crash-safe writes on real files, with failures injected at the system calls."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from runtime.crashsafe import (
    TEMP_NAME_PATTERN,
    create_file_exclusive,
    fsync_dir,
    remove_stale_temps,
    rename_durable,
    temp_name_for,
    unlink_durable,
    write_all,
    write_file_atomic,
)
from runtime.errors import AlreadyExistsError, DurabilityError


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def names_in(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def failing(error: int) -> Callable[..., object]:
    def fail(*_args: object) -> object:
        raise OSError(error, os.strerror(error))

    return fail


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o640])
def test_write_file_atomic_writes_content_and_exact_mode(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "file.bin"
    old_umask = os.umask(0o077)  # the mode is exact, whatever the umask
    try:
        write_file_atomic(target, b"hello", mode=mode)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"hello"
    assert mode_of(target) == mode
    assert names_in(tmp_path) == ["file.bin"]


def test_write_file_atomic_takes_segments(tmp_path: Path) -> None:
    target = tmp_path / "segments"
    write_file_atomic(target, [b"ab", bytearray(b""), memoryview(b"cdef")[1:], b"g"])
    assert target.read_bytes() == b"abdefg"


def test_write_file_atomic_takes_more_segments_than_one_writev(tmp_path: Path) -> None:
    target = tmp_path / "many"
    segments = [bytes([i % 256]) * 3 for i in range(5000)]
    write_file_atomic(target, segments)
    assert target.read_bytes() == b"".join(segments)


def test_write_file_atomic_resumes_after_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_writev = os.writev
    calls: list[int] = []

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        # At most 3 bytes per call, as a signal or a full pipe could cause.
        calls.append(1)
        return real_writev(fd, [bytes(buffers[0][:3])])

    monkeypatch.setattr(os, "writev", short_writev)
    target = tmp_path / "short"
    write_file_atomic(target, [b"0123456789", b"abcdefg"])
    assert target.read_bytes() == b"0123456789abcdefg"
    assert len(calls) >= 6


def test_write_all_at_an_offset_resumes_after_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwritev = os.pwritev
    offsets: list[int] = []

    def short_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        offsets.append(offset)
        return real_pwritev(fd, [bytes(buffers[0][:3])], offset)

    target = tmp_path / "disk"
    target.write_bytes(b"." * 24)
    monkeypatch.setattr(os, "pwritev", short_pwritev)
    fd = os.open(target, os.O_RDWR)
    try:
        write_all(fd, [b"01234", b"", bytearray(b"abcd")], 10)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # the file position is left alone
    finally:
        os.close(fd)
    assert target.read_bytes() == b"." * 10 + b"01234abcd" + b"." * 5
    assert offsets == [10, 13, 15, 18]


def test_write_all_takes_more_buffers_than_one_call_at_an_offset(tmp_path: Path) -> None:
    target = tmp_path / "disk"
    parts = [bytes([i % 256]) * 2 for i in range(3000)]
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        write_all(fd, parts, 7)
    finally:
        os.close(fd)
    assert target.read_bytes() == bytes(7) + b"".join(parts)


def test_write_all_does_not_spin_on_a_write_of_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "pwritev", lambda *_args: 0)
    fd = os.open(tmp_path / "disk", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="at offset 4 wrote nothing") as caught:
            write_all(fd, [b"data"], 4)
    finally:
        os.close(fd)
    assert caught.value.errno == errno.EIO


def test_write_file_atomic_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.write_bytes(b"old content")
    inode_before = target.stat().st_ino
    write_file_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    # A new inode: the old file was replaced by rename, not rewritten in place.
    assert target.stat().st_ino != inode_before
    assert names_in(tmp_path) == ["state"]


def test_failed_fsync_raises_keeps_old_content_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state"
    target.write_bytes(b"old content")
    monkeypatch.setattr(os, "fsync", failing(errno.EIO))
    with pytest.raises(DurabilityError) as caught:
        write_file_atomic(target, b"new content")
    assert caught.value.errno == errno.EIO
    assert caught.value.details == {"errno": "EIO"}
    assert caught.value.http_status == 503
    assert "fsync" in caught.value.message
    assert target.read_bytes() == b"old content"
    assert names_in(tmp_path) == ["state"]


def test_failed_write_raises_with_errno_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "writev", failing(errno.ENOSPC))
    with pytest.raises(DurabilityError) as caught:
        write_file_atomic(tmp_path / "new", b"data")
    assert caught.value.errno == errno.ENOSPC
    assert names_in(tmp_path) == []


def test_failed_directory_fsync_is_a_durability_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def fsync_files_only(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "injected")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_files_only)
    with pytest.raises(DurabilityError, match="fsync directory"):
        write_file_atomic(tmp_path / "new", b"data")


def test_missing_directory_is_a_durability_error(tmp_path: Path) -> None:
    with pytest.raises(DurabilityError) as caught:
        write_file_atomic(tmp_path / "absent" / "file", b"data")
    assert caught.value.errno == errno.ENOENT


def test_create_file_exclusive_creates_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    create_file_exclusive(target, b"key", mode=0o600)
    assert target.read_bytes() == b"key"
    assert mode_of(target) == 0o600
    assert target.stat().st_nlink == 1  # the temp link is gone
    assert names_in(tmp_path) == ["secret"]


@pytest.mark.parametrize("kind", ["file", "directory", "dangling symlink"])
def test_create_file_exclusive_refuses_an_existing_name(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "secret"
    if kind == "file":
        target.write_bytes(b"original bytes")
        target.chmod(0o600)
    elif kind == "directory":
        target.mkdir()
    else:
        target.symlink_to(tmp_path / "nowhere")
    before = target.lstat()
    with pytest.raises(AlreadyExistsError, match="exists already"):
        create_file_exclusive(target, b"replacement", mode=0o600)
    after = target.lstat()
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mode,
        before.st_mtime_ns,
    )
    if kind == "file":
        assert target.read_bytes() == b"original bytes"
    assert not (tmp_path / "nowhere").exists()
    assert names_in(tmp_path) == ["secret"]


def test_create_file_exclusive_failed_fsync_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", failing(errno.EIO))
    with pytest.raises(DurabilityError):
        create_file_exclusive(tmp_path / "secret", b"key", mode=0o600)
    assert names_in(tmp_path) == []


def test_unlink_durable(tmp_path: Path) -> None:
    target = tmp_path / "done"
    target.write_bytes(b"x")
    assert unlink_durable(target) is True
    assert not target.exists()
    assert unlink_durable(target, missing_ok=True) is False
    with pytest.raises(DurabilityError) as caught:
        unlink_durable(target)
    assert caught.value.errno == errno.ENOENT


def test_rename_durable_within_and_across_directories(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"B")
    rename_durable(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == b"A"
    other = tmp_path / "other"
    other.mkdir()
    rename_durable(tmp_path / "b", other / "c")
    assert (other / "c").read_bytes() == b"A"
    assert names_in(tmp_path) == ["other"]


def test_rename_durable_missing_source(tmp_path: Path) -> None:
    with pytest.raises(DurabilityError) as caught:
        rename_durable(tmp_path / "absent", tmp_path / "b")
    assert caught.value.errno == errno.ENOENT


def test_fsync_dir_of_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DurabilityError) as caught:
        fsync_dir(tmp_path / "absent")
    assert caught.value.errno == errno.ENOENT


def test_temp_names_are_recognised_and_distinct() -> None:
    first, second = temp_name_for("state.toml"), temp_name_for("state.toml")
    assert first != second
    assert first.startswith(".state.toml.tmp-")
    assert TEMP_NAME_PATTERN.fullmatch(first)
    long_name = temp_name_for("x" * 255)
    assert len(long_name.encode()) <= 255
    assert TEMP_NAME_PATTERN.fullmatch(long_name)


def test_remove_stale_temps_removes_only_temp_files(tmp_path: Path) -> None:
    stale = [tmp_path / temp_name_for("a"), tmp_path / temp_name_for("b.hrl")]
    for path in stale:
        path.write_bytes(b"partial")
    keep = ["a", ".hidden", "b.tmp-0123456789abcdef", ".c.tmp-short"]
    for name in keep:
        (tmp_path / name).write_bytes(b"keep")
    (tmp_path / temp_name_for("dir")).mkdir()  # not a file: left alone
    removed = remove_stale_temps(tmp_path)
    assert removed == sorted(stale)
    remaining = names_in(tmp_path)
    assert all(name in remaining for name in keep)
    assert len(remaining) == len(keep) + 1
    assert remove_stale_temps(tmp_path) == []


def test_remove_stale_temps_after_a_crash_between_link_and_unlink(tmp_path: Path) -> None:
    # create_file_exclusive links the temp file to the final name, then
    # unlinks the temp name: a crash in between leaves two names for one file.
    final = tmp_path / "ca.key"
    temp = tmp_path / temp_name_for("ca.key")
    temp.write_bytes(b"key")
    os.link(temp, final)
    assert remove_stale_temps(tmp_path) == [temp]
    assert final.read_bytes() == b"key"
    assert final.stat().st_nlink == 1
