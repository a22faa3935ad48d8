"""The VMDK text descriptor: what kind of disk it is and where its extents live.

Specified in VMware's "Virtual Disk Format 1.1", section "The Descriptor
File". A descriptor is lines of text:

    # Disk DescriptorFile             comments start with '#'
    version=1
    CID=fffffffe                      content id, 32-bit hex
    parentCID=ffffffff                ffffffff: no parent (not a delta disk)
    createType="monolithicSparse"
    RW 131072 SPARSE "disk.vmdk"      ACCESS SECTORS TYPE "FILE"
    RW 131072 FLAT "disk-flat.vmdk" 0 ... OFFSET (sectors) for FLAT
    ddb.adapterType = "lsilogic"      the disk database: kept, not interpreted

A monolithicSparse file embeds it in its sparse header's descriptor area; the
other kinds keep it in a small file of its own that names the extent files.

Parsing is strict: a line that is none of the above, an unknown or refused
createType, an extent of the wrong type for the createType, or a parent,
is refused with what was expected and what was found.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Final

from mastertarget.errors import DiskFormatError

#: Largest descriptor read: a twoGbMaxExtent descriptor of a 2 TiB disk has
#: 1024 extent lines (about 40 KiB); qemu reads at most 1 MiB too. Anything
#: larger is not a descriptor and is not read into memory.
MAX_DESCRIPTOR_BYTES: Final = 1 << 20
#: Descriptor versions qemu and VMware write (qemu's probe accepts these).
DESCRIPTOR_VERSIONS: Final = frozenset({1, 2, 3})
#: parentCID of a disk without a parent.
NO_PARENT_CID: Final = 0xFFFFFFFF

#: createType -> the extent types it may list. These are the kinds written in place.
WRITABLE_CREATE_TYPES: Final[dict[str, frozenset[str]]] = {
    "monolithicSparse": frozenset({"SPARSE"}),
    "twoGbMaxExtentSparse": frozenset({"SPARSE"}),
    "monolithicFlat": frozenset({"FLAT"}),
    "twoGbMaxExtentFlat": frozenset({"FLAT"}),
    # ESXi's thick and thin disks on VMFS: a descriptor and one -flat.vmdk.
    "vmfs": frozenset({"VMFS", "FLAT"}),
}
#: createTypes known but not written here, with the reason and what to do.
#: How to turn a VMDK that is not written in place into one that is.
CONVERT_HINT: Final = "qemu-img convert -O vmdk -o subformat=monolithicSparse SOURCE TARGET.vmdk"
_RDM: Final = "it maps a raw device; replicate to the device with format 'raw'"
REFUSED_CREATE_TYPES: Final[dict[str, str]] = {
    "streamOptimized": (
        "its grains are deflate-compressed and appended as a stream, so they "
        f"cannot be rewritten in place; convert it first: {CONVERT_HINT}"
    ),
    "vmfsSparse": f"it is a snapshot delta over a parent disk; consolidate it or {CONVERT_HINT}",
    "seSparse": f"it is a space-efficient snapshot delta over a parent disk; {CONVERT_HINT}",
    "vmfsRaw": _RDM,
    "vmfsRawDeviceMap": _RDM,
    "vmfsPassthroughRawDeviceMap": _RDM,
    "fullDevice": "it maps a host device; replicate to the device with format 'raw'",
    "partitionedDevice": "it maps host partitions; replicate to a device with format 'raw'",
    "custom": f"its layout is not defined by the format; {CONVERT_HINT}",
}
#: Extent types that hold data of their own and are written in place.
FLAT_EXTENT_TYPES: Final = frozenset({"FLAT", "VMFS"})

_EXTENT_LINE: Final = re.compile(
    r"(?P<access>RW|RDONLY|NOACCESS)\s+(?P<sectors>\d+)\s+(?P<type>[A-Z]+)"
    r'(?:\s+"(?P<file>[^"]*)")?(?:\s+(?P<offset>\d+))?\s*'
)
_KEY_LINE: Final = re.compile(r"(?P<key>[A-Za-z][A-Za-z0-9_.]*)\s*=\s*(?P<value>.*?)\s*")


@dataclass(frozen=True, slots=True)
class ExtentLine:
    """One extent line: ``ACCESS SECTORS TYPE "FILE" [OFFSET]``."""

    access: str
    sectors: int
    kind: str
    filename: str
    #: where the extent's data starts in its file, in sectors (FLAT/VMFS only)
    offset_sectors: int


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A parsed descriptor. ``fields`` and ``ddb`` keep every key as found, in order."""

    version: int
    cid: int
    create_type: str
    extents: tuple[ExtentLine, ...]
    fields: tuple[tuple[str, str], ...]
    ddb: tuple[tuple[str, str], ...]

    @property
    def sectors(self) -> int:
        """The virtual size in sectors: the extents' sizes added up."""
        return sum(extent.sectors for extent in self.extents)


def parse_descriptor(raw: bytes, source: str) -> Descriptor:
    """Parse and check a descriptor (text, possibly NUL-padded).

    Args:
        raw: the descriptor bytes; anything from the first NUL on is padding.
        source: where it came from, for error messages.

    Raises:
        DiskFormatError: it is not a descriptor, or describes a disk that is
            not written in place here (see :data:`REFUSED_CREATE_TYPES`).
    """
    text = _decode(raw.split(b"\0", 1)[0], source)
    fields: list[tuple[str, str]] = []
    ddb: list[tuple[str, str]] = []
    extents: list[ExtentLine] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        extent = _EXTENT_LINE.fullmatch(stripped)
        if extent is not None:
            extents.append(_extent(extent, source, number))
            continue
        pair = _KEY_LINE.fullmatch(stripped)
        if pair is None:
            raise DiskFormatError(
                f"{source} line {number}: expected 'key = value' or an extent line "
                f"'RW SECTORS TYPE \"FILE\"', found {stripped[:80]!r}"
            )
        key, value = pair["key"], _unquote(pair["value"])
        (ddb if key.startswith("ddb.") else fields).append((key, value))
    values = dict(fields)
    version = _number(values, "version", source, base=10)
    if version not in DESCRIPTOR_VERSIONS:
        raise DiskFormatError(f"{source}: expected descriptor version 1, 2 or 3, found {version}")
    create_type = _required(values, "createType", source)
    _check_create_type(create_type, source)
    parent = _number(values, "parentCID", source, base=16)
    if parent != NO_PARENT_CID or "parentFileNameHint" in values:
        hint = values.get("parentFileNameHint")
        found = f"parentCID={parent:08x}" + (f' parentFileNameHint="{hint}"' if hint else "")
        raise DiskFormatError(
            f"{source}: expected a disk without a parent (parentCID=ffffffff), found {found}: "
            f"it is a snapshot delta; consolidate it or {CONVERT_HINT}"
        )
    if "changeTrackPath" in values:
        raise DiskFormatError(
            f"{source}: changed-block tracking is on (changeTrackPath="
            f"{values['changeTrackPath']!r}); writes here would not be tracked and a "
            "backup relying on it would miss them: turn tracking off (remove the line) first"
        )
    _check_extents(create_type, extents, source)
    return Descriptor(
        version=version,
        cid=_number(values, "CID", source, base=16),
        create_type=create_type,
        extents=tuple(extents),
        fields=tuple(fields),
        ddb=tuple(ddb),
    )


def render_descriptor(create_type: str, extent_lines: list[str], size: int) -> bytes:
    """The descriptor qemu-img writes for a new disk, with adapter type lsilogic.

    Same lines and order as qemu's ``vmdk_co_do_create``; the geometry is the
    one VMware uses for SCSI adapters (255 heads, 63 sectors per track).

    Args:
        create_type: ``monolithicSparse`` or ``monolithicFlat``.
        extent_lines: the extent lines, without newlines.
        size: the virtual size in bytes.
    """
    heads, sectors_per_track = 255, 63
    cylinders = size // (heads * sectors_per_track * 512)
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={secrets.randbits(32):08x}",
        f"parentCID={NO_PARENT_CID:08x}",
        f'createType="{create_type}"',
        "",
        "# Extent description",
        *extent_lines,
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        'ddb.virtualHWVersion = "4"',
        f'ddb.geometry.cylinders = "{cylinders}"',
        f'ddb.geometry.heads = "{heads}"',
        f'ddb.geometry.sectors = "{sectors_per_track}"',
        'ddb.adapterType = "lsilogic"',
        'ddb.toolsVersion = "2147483647"',
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def check_extent_name(name: str) -> None:
    """Refuse a file name that a descriptor line cannot hold.

    Raises:
        DiskFormatError: the name is empty or holds a quote, a newline or a NUL.
    """
    if not name or any(char in name for char in '"\n\r\0'):
        raise DiskFormatError(
            f"expected a file name without quotes or line breaks for a VMDK extent, found {name!r}"
        )


def _decode(raw: bytes, source: str) -> str:
    """Descriptor text in its declared encoding (VMware writes ``encoding=``; default UTF-8)."""
    declared = re.search(rb'^\s*encoding\s*=\s*"([^"]+)"', raw, re.MULTILINE)
    codec = declared.group(1).decode("ascii", "replace") if declared else "utf-8"
    try:
        return raw.decode(codec)
    except (LookupError, UnicodeDecodeError) as exc:
        raise DiskFormatError(
            f"{source}: expected descriptor text in encoding {codec!r}, "
            f"found bytes that are not: {exc}"
        ) from None


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _required(values: dict[str, str], key: str, source: str) -> str:
    if key not in values:
        raise DiskFormatError(
            f"{source}: expected a VMDK descriptor with a {key}= line, found none"
        )
    return values[key]


def _number(values: dict[str, str], key: str, source: str, *, base: int) -> int:
    text = _required(values, key, source)
    try:
        return int(text, base)
    except ValueError:
        raise DiskFormatError(
            f"{source}: expected {key} to be a base-{base} number, found {text!r}"
        ) from None


def _check_create_type(create_type: str, source: str) -> None:
    if create_type in WRITABLE_CREATE_TYPES:
        return
    if create_type in REFUSED_CREATE_TYPES:
        raise DiskFormatError(
            f"{source}: createType {create_type!r} is not written in place: "
            f"{REFUSED_CREATE_TYPES[create_type]}"
        )
    raise DiskFormatError(
        f"{source}: expected createType one of {sorted(WRITABLE_CREATE_TYPES)}, "
        f"found unknown {create_type!r}"
    )


def _extent(match: re.Match[str], source: str, number: int) -> ExtentLine:
    kind, filename, offset = match["type"], match["file"], match["offset"]
    if filename is None:
        raise DiskFormatError(
            f"{source} line {number}: expected an extent with a file name, found a "
            f"{kind} extent without one (ZERO extents are not written in place)"
        )
    if kind in FLAT_EXTENT_TYPES:
        if kind == "FLAT" and offset is None:
            raise DiskFormatError(
                f"{source} line {number}: expected 'RW SECTORS FLAT \"FILE\" OFFSET', "
                "found no offset"
            )
    elif offset is not None:
        raise DiskFormatError(
            f"{source} line {number}: expected no offset after a {kind} extent, found {offset}"
        )
    return ExtentLine(
        access=match["access"],
        sectors=int(match["sectors"]),
        kind=kind,
        filename=filename,
        offset_sectors=int(offset) if offset is not None else 0,
    )


def _check_extents(create_type: str, extents: list[ExtentLine], source: str) -> None:
    if not extents:
        raise DiskFormatError(f"{source}: expected at least one extent line, found none")
    if create_type.startswith("monolithic") and len(extents) != 1:
        raise DiskFormatError(
            f"{source}: expected exactly one extent for createType {create_type!r}, "
            f"found {len(extents)}"
        )
    allowed = WRITABLE_CREATE_TYPES[create_type]
    for index, extent in enumerate(extents):
        where = f"{source} extent {index + 1} ({extent.filename!r})"
        if extent.access != "RW":
            raise DiskFormatError(f"{where}: expected access RW, found {extent.access}")
        if extent.kind not in allowed:
            raise DiskFormatError(
                f"{where}: expected extent type {' or '.join(sorted(allowed))} for createType "
                f"{create_type!r}, found {extent.kind}"
            )
        if extent.sectors <= 0:
            raise DiskFormatError(f"{where}: expected a positive size in sectors, found 0")
        if "/" in extent.filename or "\\" in extent.filename or extent.filename in {".", ".."}:
            raise DiskFormatError(
                f"{where}: expected a file name in the descriptor's own directory, found a path; "
                "a descriptor may not point writes at files elsewhere"
            )
