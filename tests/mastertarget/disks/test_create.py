"""create_disk: new targets laid out as qemu-img lays them out, durable, never over a file."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from mastertarget.disks import create_disk, open_disk
from mastertarget.errors import DiskExistsError, DiskFormatError, DiskSizeError
from tests.mastertarget.disks.tools import MIB, assert_checks, qemu_img

SIZE = 24 * MIB + 512


def _descriptor_lines(text: str, name_map: dict[str, str]) -> list[str]:
    """Descriptor lines with the random CID masked and file names mapped."""
    lines = []
    for raw_line in text.split("\0", 1)[0].splitlines():
        line = "CID=<random>" if raw_line.startswith("CID=") else raw_line
        for ours, theirs in name_map.items():
            line = line.replace(ours, theirs)
        lines.append(line)
    return lines


def test_sparse_is_laid_out_as_qemu_img_does(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.vmdk", tmp_path / "theirs.vmdk"
    create_disk(ours, "vmdk-sparse", SIZE).close()
    result = qemu_img("create", "-f", "vmdk", "-o", "adapter_type=lsilogic", theirs, str(SIZE))
    assert result.returncode == 0, result.stderr
    mine, reference = ours.read_bytes(), theirs.read_bytes()
    assert len(mine) == len(reference)
    assert mine[:512] == reference[:512]  # the header
    descriptor_end = 21 * 512
    assert mine[descriptor_end:] == reference[descriptor_end:]  # directories and tables
    assert _descriptor_lines(mine[512:descriptor_end].decode(), {"ours": "theirs"}) == (
        _descriptor_lines(reference[512:descriptor_end].decode(), {})
    )
    assert "No errors" in assert_checks(ours)


def test_flat_is_laid_out_as_qemu_img_does(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.vmdk", tmp_path / "theirs.vmdk"
    create_disk(ours, "vmdk-flat", SIZE).close()
    result = qemu_img(
        "create", "-f", "vmdk", "-o", "subformat=monolithicFlat,adapter_type=lsilogic",
        theirs, str(SIZE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ours-flat.vmdk").stat().st_size == SIZE
    assert _descriptor_lines(ours.read_text(), {"ours": "theirs"}) == _descriptor_lines(
        theirs.read_text(), {}
    )
    info = json.loads(qemu_img("info", "--output=json", ours).stdout)
    assert info["virtual-size"] == SIZE
    assert info["format-specific"]["data"]["create-type"] == "monolithicFlat"


@pytest.mark.parametrize(
    ("fmt", "files"),
    [
        ("raw", ["disk.vmdk"]),
        ("vmdk-sparse", ["disk.vmdk"]),
        ("vmdk-flat", ["disk.vmdk", "disk-flat.vmdk"]),
    ],
)
def test_created_files_are_private_complete_and_alone(
    tmp_path: Path, fmt: str, files: list[str]
) -> None:
    disk = create_disk(tmp_path / "disk.vmdk", fmt, SIZE)  # type: ignore[arg-type]
    assert disk.size == SIZE
    disk.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no temp file left
    for name in files:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    reopened = open_disk(tmp_path / "disk.vmdk", "raw" if fmt == "raw" else "vmdk")
    assert reopened.size == SIZE
    assert reopened.read(SIZE - 512, 512) == bytes(512)
    reopened.close()


@pytest.mark.parametrize(
    ("fmt", "existing"),
    [
        ("raw", "disk.vmdk"),
        ("vmdk-sparse", "disk.vmdk"),
        ("vmdk-flat", "disk.vmdk"),
        ("vmdk-flat", "disk-flat.vmdk"),
    ],
)
def test_create_never_touches_an_existing_file(tmp_path: Path, fmt: str, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"precious")
    with pytest.raises(DiskExistsError, match=f"expected no file at .*{existing}"):
        create_disk(tmp_path / "disk.vmdk", fmt, SIZE)  # type: ignore[arg-type]
    assert [p.name for p in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_bytes() == b"precious"


def test_create_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / "disk.img").symlink_to(tmp_path / "elsewhere.img")
    with pytest.raises(DiskExistsError):
        create_disk(tmp_path / "disk.img", "raw", SIZE)
    assert not (tmp_path / "elsewhere.img").exists()


@pytest.mark.parametrize("size", [0, -512, 1000, SIZE + 1])
@pytest.mark.parametrize("fmt", ["raw", "vmdk-sparse", "vmdk-flat"])
def test_sizes_that_are_not_whole_sectors_are_refused(tmp_path: Path, fmt: str, size: int) -> None:
    with pytest.raises(DiskSizeError, match=f"multiple of 512 bytes .* found {size}"):
        create_disk(tmp_path / "disk.vmdk", fmt, size)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_sizes_above_the_format_limit_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DiskSizeError, match="at most 2198486384640 bytes"):
        create_disk(tmp_path / "disk.vmdk", "vmdk-sparse", 4 << 40)
    with pytest.raises(DiskSizeError, match="at most 70368744177664 bytes"):
        create_disk(tmp_path / "disk.img", "raw", 128 << 40)
    assert list(tmp_path.iterdir()) == []


def test_unknown_formats_and_unwritable_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DiskFormatError, match="'raw', 'vmdk-sparse' or 'vmdk-flat'"):
        create_disk(tmp_path / "disk.qcow2", "qcow2", SIZE)  # type: ignore[arg-type]
    with pytest.raises(DiskFormatError, match="without quotes"):
        create_disk(tmp_path / 'bad"name.vmdk', "vmdk-sparse", SIZE)
    assert list(tmp_path.iterdir()) == []
