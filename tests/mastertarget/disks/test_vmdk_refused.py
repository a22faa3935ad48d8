"""VMDKs that must be refused, each with a message that says what and why.

One case per header field and per descriptor rule: the file is made by
qemu-img (or create_disk), then one thing is broken on purpose.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from mastertarget.disks import open_disk
from mastertarget.errors import DiskFormatError, DiskIOError
from tests.mastertarget.disks.tools import MIB, qemu_img, qemu_io

SIZE = 8 * MIB


def _sparse(tmp_path: Path) -> Path:
    path = tmp_path / "disk.vmdk"
    assert qemu_img("create", "-f", "vmdk", path, str(SIZE)).returncode == 0
    return path


def _flat(tmp_path: Path) -> Path:
    path = tmp_path / "disk.vmdk"
    result = qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", path, str(SIZE))
    assert result.returncode == 0
    return path


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def _replace(path: Path, old: bytes, new: bytes) -> None:
    assert len(old) == len(new)
    content = path.read_bytes()
    assert content.count(old) == 1
    _patch(path, content.index(old), new)


def _header_field(fmt: str, offset: int, value: int) -> Callable[[Path], None]:
    return lambda path: _patch(path, offset, struct.pack(fmt, value))


def _directory_entry(value: int) -> Callable[[Path], None]:
    """Set the first entry of both grain directories."""

    def edit(path: Path) -> None:
        rgd, gd = struct.unpack_from("<QQ", path.read_bytes(), 48)
        for sector in (rgd, gd):
            _patch(path, sector * 512, struct.pack("<I", value))

    return edit


def _sparse_pair(path: Path, second: str) -> None:
    """Make ``path`` a twoGbMaxExtentSparse descriptor of two sparse extents."""
    for name in ("disk-s001.vmdk", "disk-s002.vmdk"):
        if not (path.parent / name).exists():
            assert qemu_img("create", "-f", "vmdk", path.parent / name, str(SIZE)).returncode == 0
    path.write_text(
        'version=1\nCID=1\nparentCID=ffffffff\ncreateType="twoGbMaxExtentSparse"\n'
        f'# Extent description\nRW 16384 SPARSE "disk-s001.vmdk"\nRW 16384 SPARSE "{second}"\n'
    )


def _edit_descriptor(old: str, new: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))

    return edit


HEADER_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "magic": (lambda p: _patch(p, 0, b"KDMW"), "binary data"),
    "version 4": (_header_field("<I", 4, 4), "version 1, 2 or 3, found 4"),
    "version 3": (_header_field("<I", 4, 3), "changed-block tracking"),
    "unknown flag": (_header_field("<I", 8, 3 | 1 << 5), "flag bits"),
    "compressed flag": (_header_field("<I", 8, 3 | 1 << 16), "streamOptimized"),
    "compression": (_header_field("<H", 77, 1), "streamOptimized"),
    "newline bytes": (lambda p: _patch(p, 73, b"\n \n\n"), "newline test"),
    "zero capacity": (_header_field("<Q", 12, 0), "positive capacity"),
    "grain not a power of two": (_header_field("<Q", 20, 96), "power of two"),
    "grain too small": (_header_field("<Q", 20, 4), "power of two from 8"),
    "grain too large": (_header_field("<Q", 20, 1 << 16), "to 2048 sectors"),
    "too many table entries": (_header_field("<I", 44, 1024), "1 to 512 entries"),
    "descriptor past the end": (_header_field("<Q", 28, 1 << 20), "descriptor between"),
    "directory past the end": (_header_field("<Q", 56, 1 << 30), "grain directory between"),
    "redundant directory past the end": (
        _header_field("<Q", 48, 1 << 30),
        "redundant grain directory between",
    ),
    "overhead past the end": (_header_field("<Q", 64, 1 << 30), "overHead"),
    "table past the end": (_directory_entry(1 << 24), "truncated or corrupt"),
    "directories disagree": (_header_field("<I", 21 * 512, 0), "agree"),
    "capacity not the descriptor's": (_header_field("<Q", 12, 2 * SIZE // 512), "add up"),
    "createType in the file": (
        lambda p: _replace(p, b'"monolithicSparse"', b'"streamOptimized" '),
        "streamOptimized",
    ),
    "no createType in the file": (
        lambda p: _replace(p, b"createType=", b"createTipe="),
        "createType= line",
    ),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_broken_sparse_header_is_refused(tmp_path: Path, case: str) -> None:
    path = _sparse(tmp_path)
    breaker, message = HEADER_CASES[case]
    breaker(path)
    with pytest.raises(DiskFormatError, match=message) as refused:
        open_disk(path, "vmdk")
    assert str(path) in refused.value.message


DESCRIPTOR_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "unknown createType": (
        _edit_descriptor('"monolithicFlat"', '"twoGbMaxExtentZip"'),
        "unknown 'twoGbMaxExtentZip'",
    ),
    "refused createType": (
        _edit_descriptor('"monolithicFlat"', '"vmfsRawDeviceMap"'),
        "maps a raw device",
    ),
    "no createType": (_edit_descriptor('createType="monolithicFlat"', ""), "createType= line"),
    "no extents": (_edit_descriptor('RW 16384 FLAT "disk-flat.vmdk" 0', ""), "at least one extent"),
    "two extents for monolithic": (
        _edit_descriptor(
            'RW 16384 FLAT "disk-flat.vmdk" 0',
            'RW 8192 FLAT "disk-flat.vmdk" 0\nRW 8192 FLAT "disk-flat.vmdk" 8192',
        ),
        "exactly one extent",
    ),
    "extent larger than its file": (
        _edit_descriptor("RW 16384 FLAT", "RW 16385 FLAT"),
        "expected at least 8389120 bytes",
    ),
    "extent of the wrong type": (
        _edit_descriptor("FLAT", 'SPARSE "x" 0 FLAT'),
        "expected 'key = value' or an extent line",
    ),
    "sparse extent in a flat disk": (
        _edit_descriptor('FLAT "disk-flat.vmdk" 0', 'SPARSE "disk-flat.vmdk"'),
        "expected extent type FLAT",
    ),
    "read-only extent": (_edit_descriptor("RW 16384", "RDONLY 16384"), "access RW"),
    "flat extent without offset": (
        _edit_descriptor('"disk-flat.vmdk" 0', '"disk-flat.vmdk"'),
        "found no offset",
    ),
    "extent in another directory": (
        _edit_descriptor('"disk-flat.vmdk"', '"../etc/disk-flat.vmdk"'),
        "descriptor's own directory",
    ),
    "extent file missing": (_edit_descriptor("disk-flat.vmdk", "gone-flat.vmdk"), "extent file"),
    "extent is the descriptor": (
        _edit_descriptor('"disk-flat.vmdk"', '"disk.vmdk"'),
        "descriptor file itself",
    ),
    "extents overlapping in one file": (
        _edit_descriptor(
            'monolithicFlat"\n\n# Extent description\nRW 16384 FLAT "disk-flat.vmdk" 0',
            'twoGbMaxExtentFlat"\n\n# Extent description\n'
            'RW 8192 FLAT "disk-flat.vmdk" 0\nRW 8192 FLAT "disk-flat.vmdk" 8191',
        ),
        "used twice",
    ),
    "one sparse file as two extents": (
        lambda p: _sparse_pair(p, "disk-s001.vmdk"),
        "used twice",
    ),
    "a parent": (_edit_descriptor("parentCID=ffffffff", "parentCID=1234abcd"), "snapshot delta"),
    "bad CID": (_edit_descriptor("parentCID=ffffffff", "parentCID=zz"), "base-16"),
    "version": (_edit_descriptor("version=1", "version=7"), "version 1, 2 or 3"),
    "garbage line": (_edit_descriptor("#DDB", "this is not a descriptor"), "line 11"),
    "change tracking": (
        _edit_descriptor("#DDB", 'changeTrackPath="disk-ctk.vmdk"'),
        "changed-block tracking",
    ),
    "monolithicSparse in a descriptor file": (
        _edit_descriptor(
            'monolithicFlat"\n\n# Extent description\nRW 16384 FLAT "disk-flat.vmdk" 0',
            'monolithicSparse"\n\n# Extent description\nRW 16384 SPARSE "disk-flat.vmdk"',
        ),
        "one file starting with",
    ),
}


@pytest.mark.parametrize("case", sorted(DESCRIPTOR_CASES))
def test_broken_descriptor_is_refused(tmp_path: Path, case: str) -> None:
    path = _flat(tmp_path)
    breaker, message = DESCRIPTOR_CASES[case]
    breaker(path)
    with pytest.raises(DiskFormatError, match=message):
        open_disk(path, "vmdk")


def test_two_sparse_extents_open_when_they_are_two_files(tmp_path: Path) -> None:
    path = _flat(tmp_path)
    _sparse_pair(path, "disk-s002.vmdk")
    disk = open_disk(path, "vmdk")
    assert disk.size == 2 * SIZE
    disk.close()


def test_stream_optimized_is_refused_with_the_conversion_command(tmp_path: Path) -> None:
    source = _sparse(tmp_path)
    qemu_io(source, "vmdk", "write -P 0x11 0 1M")
    stream = tmp_path / "stream.vmdk"
    result = qemu_img(
        "convert", "-f", "vmdk", "-O", "vmdk", "-o", "subformat=streamOptimized", source, stream
    )
    assert result.returncode == 0, result.stderr
    with pytest.raises(DiskFormatError) as refused:
        open_disk(stream, "vmdk")
    message = refused.value.message
    assert "streamOptimized" in message
    assert "cannot be rewritten in place" in message
    assert "qemu-img convert -O vmdk -o subformat=monolithicSparse" in message

    # The command it names makes a disk that is accepted and holds the data.
    converted = tmp_path / "converted.vmdk"
    result = qemu_img(
        "convert", "-O", "vmdk", "-o", "subformat=monolithicSparse", stream, converted
    )
    assert result.returncode == 0, result.stderr
    disk = open_disk(converted, "vmdk")
    assert disk.read(0, MIB) == b"\x11" * MIB
    disk.close()


def test_a_flat_data_file_opened_as_vmdk_is_refused(tmp_path: Path) -> None:
    path = _flat(tmp_path)
    with pytest.raises(DiskFormatError, match="holds data only"):
        open_disk(tmp_path / "disk-flat.vmdk", "vmdk")
    small = tmp_path / "small-flat.vmdk"
    small.write_bytes(b"\x00" * 4096)
    with pytest.raises(DiskFormatError, match="binary data"):
        open_disk(small, "vmdk")
    assert path.exists()


def test_cowd_and_non_files_are_refused(tmp_path: Path) -> None:
    cowd = tmp_path / "delta.vmdk"
    cowd.write_bytes(b"COWD" + bytes(2044))
    with pytest.raises(DiskFormatError, match="COWD"):
        open_disk(cowd, "vmdk")
    with pytest.raises(DiskFormatError, match="regular file or a block device"):
        open_disk(tmp_path, "vmdk")
    with pytest.raises(DiskIOError, match="No such file"):
        open_disk(tmp_path / "missing.vmdk", "vmdk")
    with pytest.raises(DiskFormatError, match="'raw' or 'vmdk'"):
        open_disk(cowd, "qcow2")  # type: ignore[arg-type]


def test_a_truncated_sparse_file_is_refused_where_a_table_points_past_its_end(
    tmp_path: Path,
) -> None:
    path = _sparse(tmp_path)
    qemu_io(path, "vmdk", "write -P 0x22 0 64k", "write -P 0x33 4M 64k")
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 64 * 1024)  # cut the last grain off
    disk = open_disk(path, "vmdk")
    try:
        with pytest.raises(DiskFormatError, match="truncated or corrupt"):
            disk.read(0, 512)
    finally:
        disk.close()
