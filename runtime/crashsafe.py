"""Crash-safe file writes: the checklist of docs/design.md as small functions.

Checklist items implemented here:

1. New file: temp file in the same directory -> write -> fsync(file) ->
   ``os.replace`` -> fsync(directory): :func:`write_file_atomic`.
2. Every create, unlink or rename is durable only after fsync of its directory:
   :func:`fsync_dir`, :func:`unlink_durable`, :func:`rename_durable`.
3. A caller may ack, delete upstream or advance a marker only after these
   functions returned: they return only after every fsync returned 0.
4. A failed fsync means the data is gone: every failure raises
   :class:`~runtime.errors.DurabilityError` at once; nothing here retries.

Temp files are named ``.NAME.tmp-<16 hex digits>`` so that
:func:`remove_stale_temps` can clear the ones a crash left behind, and so that
no reader that lists a directory takes one for a finished file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from runtime.crashpoints import fsync_fault
from runtime.errors import AlreadyExistsError, DurabilityError

BytesLike = bytes | bytearray | memoryview
StrPath = str | os.PathLike[str]

#: The random part of a temp name: 64 bits make a clash between two writers in
#: one directory as unlikely as it needs to be, and O_EXCL catches one anyway.
TEMP_TOKEN_BYTES: Final = 8
#: Longest part of the final name kept in a temp name: most file systems allow
#: 255 bytes per name, and the dot, ``.tmp-`` and the token take 22 of them.
MAX_TEMP_STEM_CHARS: Final = 200
#: What a temp name looks like, for recovery at start-up.
TEMP_NAME_PATTERN: Final = re.compile(r"\..*\.tmp-[0-9a-f]{16}", re.DOTALL)
#: Most buffers one writev(2) takes (IOV_MAX; 1024 on Linux). More segments
#: than this are written in several calls.
MAX_IOVECS: Final = 1024


def temp_name_for(final_name: str) -> str:
    """A fresh temp file name for ``final_name``, recognised by :func:`remove_stale_temps`."""
    stem = final_name[:MAX_TEMP_STEM_CHARS]
    return f".{stem}.tmp-{secrets.token_hex(TEMP_TOKEN_BYTES)}"


def fsync_dir(path: StrPath) -> None:
    """Make the creates, unlinks and renames in directory ``path`` durable.

    Raises:
        DurabilityError: the directory could not be opened or fsync failed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _durability("open directory for fsync", path, exc) from exc
    try:
        fsync_fault(path)
        os.fsync(fd)
    except OSError as exc:
        raise _durability("fsync directory", path, exc) from exc
    finally:
        os.close(fd)


def write_file_atomic(
    path: StrPath, data: BytesLike | Sequence[BytesLike], *, mode: int = 0o644
) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file whole.

    The temp file is created with O_EXCL and with permissions no wider than
    ``mode`` from the first instant, then set to exactly ``mode``: a 0600
    secret is never readable by others, not even briefly.

    Args:
        path: the final file.
        data: the content, whole or as segments (written with writev(2), no copy).
        mode: the permission bits of the final file (the umask does not apply).

    Raises:
        DurabilityError: any step failed (``errno`` says why). The temp file is
            gone, and the old file, if any, is unchanged unless only the final
            directory fsync failed (then either file may survive a crash).
    """
    write_file_synced(path, data, mode=mode)
    fsync_dir(Path(path).parent)


def write_file_synced(
    path: StrPath, data: BytesLike | Sequence[BytesLike], *, mode: int = 0o644
) -> None:
    """Replace ``path`` with ``data``, fsynced, but leave the directory fsync to the caller.

    For group commits: many files are written this way, then each directory
    that gained one is fsynced once with :func:`fsync_dir`. Nothing written
    here may be acknowledged before that directory fsync returned.

    Raises:
        DurabilityError: any step failed; the temp file is gone.
    """
    final = Path(path)
    temp = _write_temp(final, data, mode)
    try:
        os.replace(temp, final)
    except OSError as exc:
        _remove_quietly(temp)
        raise _durability("rename temp file over", final, exc) from exc


def create_file_exclusive(
    path: StrPath, data: BytesLike | Sequence[BytesLike], *, mode: int
) -> None:
    """Create ``path`` with ``data``, durably, and never replace a file that exists.

    The content is written and fsynced under a temp name, then hard-linked to
    the final name: link(2) fails if the name exists, even when another process
    creates it at the same moment, and the final name never shows a partial file.

    Args:
        path: the file to create.
        data: the content, whole or as segments.
        mode: the permission bits of the new file (the umask does not apply).

    Raises:
        AlreadyExistsError: ``path`` exists (as a file, directory or symlink);
            it was not touched.
        DurabilityError: any other step failed. ``path`` was not created,
            unless only the last steps (removing the temp name, the directory
            fsync) failed; a temp file that could not be removed is left for
            :func:`remove_stale_temps`.
    """
    final = Path(path)
    temp = _write_temp(final, data, mode)
    try:
        os.link(temp, final, follow_symlinks=False)
    except FileExistsError:
        _remove_quietly(temp)
        raise AlreadyExistsError(
            f"{final} exists already; it was left unchanged", details={"path": str(final)}
        ) from None
    except OSError as exc:
        _remove_quietly(temp)
        raise _durability("link new file to", final, exc) from exc
    try:
        os.unlink(temp)
    except OSError as exc:
        raise _durability("remove temp file", temp, exc) from exc
    fsync_dir(final.parent)


def unlink_durable(path: StrPath, *, missing_ok: bool = False) -> bool:
    """Remove ``path`` and make the removal durable.

    A file found missing still gets its directory fsynced when ``missing_ok``:
    recovery after a crash may find an unlink done but not yet durable.

    Returns:
        True if this call removed the file, False if it was already gone.

    Raises:
        DurabilityError: the unlink or the directory fsync failed, or the file
            is missing and ``missing_ok`` is false.
    """
    target = Path(path)
    try:
        os.unlink(target)
        removed = True
    except FileNotFoundError as exc:
        if not missing_ok:
            raise _durability("unlink", target, exc) from exc
        removed = False
    except OSError as exc:
        raise _durability("unlink", target, exc) from exc
    fsync_dir(target.parent)
    return removed


def rename_durable(src: StrPath, dst: StrPath) -> None:
    """Rename ``src`` to ``dst`` (replacing it) and make the rename durable.

    Both directories are fsynced when they differ: the new name must be
    durable before the old one may disappear for good.

    Raises:
        DurabilityError: the rename or a directory fsync failed.
    """
    source, target = Path(src), Path(dst)
    try:
        os.replace(source, target)
    except OSError as exc:
        raise _durability(f"rename {source} to", target, exc) from exc
    fsync_dir(target.parent)
    if _real_dir(source.parent) != _real_dir(target.parent):
        fsync_dir(source.parent)


def remove_stale_temps(directory: StrPath) -> list[Path]:
    """Remove the temp files that a crash left in ``directory``; call it at start-up.

    Only regular files whose names match :data:`TEMP_NAME_PATTERN` are removed.
    Must not run while another writer uses the directory: its temp file would
    be removed under it.

    Returns:
        The paths removed, sorted.

    Raises:
        DurabilityError: the directory could not be listed, or a removal failed.
    """
    folder = Path(directory)
    removed: list[Path] = []
    try:
        with os.scandir(folder) as entries:
            stale = [
                entry.name
                for entry in entries
                if TEMP_NAME_PATTERN.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
            ]
    except OSError as exc:
        raise _durability("list directory", folder, exc) from exc
    for name in sorted(stale):
        try:
            os.unlink(folder / name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _durability("remove stale temp file", folder / name, exc) from exc
        removed.append(folder / name)
    if removed:
        fsync_dir(folder)
    return removed


def _write_temp(final: Path, data: BytesLike | Sequence[BytesLike], mode: int) -> Path:
    """Write and fsync ``data`` into a new temp file beside ``final``; return its path."""
    temp = final.parent / temp_name_for(final.name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        # The umask can only narrow ``mode`` here; fchmod then sets it exactly.
        fd = os.open(temp, flags, mode)
    except OSError as exc:
        raise _durability("create a temp file for", final, exc) from exc
    try:
        os.fchmod(fd, mode)
        write_all(fd, [data] if isinstance(data, bytes | bytearray | memoryview) else data)
        fsync_fault(final)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        _remove_quietly(temp)
        raise _durability(f"write and fsync {temp.name} for", final, exc) from exc
    try:
        os.close(fd)
    except OSError as exc:
        # close(2) can report a deferred write error (NFS): the data is not safe.
        _remove_quietly(temp)
        raise _durability(f"close {temp.name} for", final, exc) from exc
    return temp


def write_all(fd: int, parts: Sequence[BytesLike], offset: int | None = None) -> None:
    """Write every byte of ``parts``, back to back, resuming after short writes.

    No part is copied: the buffers go to writev(2), or to pwritev(2) at
    ``offset`` (the file position is then left alone), at most
    :data:`MAX_IOVECS` of them per call.

    Args:
        fd: an open file or block device.
        parts: the buffers, in order; empty ones are skipped.
        offset: where the first byte goes; None for the file position.

    Raises:
        OSError: a call failed, or wrote nothing (EIO): a regular file or a
            device never takes zero bytes of a non-empty write, and a loop
            must not spin on one that does.
    """
    pending = [view for view in (memoryview(part).cast("B") for part in parts) if view.nbytes]
    position = offset
    while pending:
        batch = pending[:MAX_IOVECS]
        written = os.writev(fd, batch) if position is None else os.pwritev(fd, batch, position)
        if written <= 0:
            where = "" if position is None else f" at offset {position}"
            raise OSError(errno.EIO, f"write{where} wrote nothing")
        if position is not None:
            position += written
        while written:
            head = pending[0]
            if written >= head.nbytes:
                written -= head.nbytes
                pending.pop(0)
            else:
                pending[0] = head[written:]
                written = 0


def _remove_quietly(temp: Path) -> None:
    """Remove a temp file during cleanup; the error being raised matters more."""
    # A temp file that cannot be removed now is left for remove_stale_temps.
    with contextlib.suppress(OSError):
        os.unlink(temp)


def _real_dir(path: Path) -> tuple[int, int]:
    """Identity (device, inode) of a directory, to tell whether two paths name the same one."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _durability("stat directory", path, exc) from exc
    return (info.st_dev, info.st_ino)


def _durability(action: str, path: StrPath, exc: OSError) -> DurabilityError:
    """A DurabilityError saying which step failed on which path, with the errno."""
    reason = exc.strerror or str(exc)
    return DurabilityError(
        f"could not {action} {os.fspath(path)}: {reason}; the data was not made durable",
        errno=exc.errno,
        path=os.fspath(path),
    )
