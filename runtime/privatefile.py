"""Reading a file that holds a secret: the data key ring, a vCenter password.

Like ssh with a private key, a secret file that group or others may read or
change is refused, with the chmod that fixes it: a secret that anyone on the
host could have read is no longer one. The mode checked is that of the file
read (``fstat`` of the open file), also when the name is a symlink, as secret
stores mount files that way.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from protocol.errors import BlockreplError

#: Bits that must be clear on a secret file: any access by group or others.
FORBIDDEN_MODE_BITS: Final = 0o077


def read_private_file(
    path: str | Path, *, what: str, why: str, max_bytes: int, error: type[BlockreplError]
) -> bytes:
    """The bytes of the secret file at ``path``, after checking who may access it.

    Args:
        path: the file.
        what: how messages name it (``"key file"``).
        why: why others must not read it, for the mode message.
        max_bytes: the largest file accepted; anything larger is not such a file.
        error: the error raised, with a message naming the file.

    Raises:
        error: the file cannot be opened, is not a regular file, is accessible
            by group or others, or is larger than ``max_bytes``.
    """
    source = Path(path)
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise error(f"cannot open {what} {source}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {source}: expected a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & FORBIDDEN_MODE_BITS:
            raise error(
                f"{what} {source} has mode {mode:04o}: expected no access for group or others"
                f" ({why}); fix it with: chmod 600 {source}"
            )
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{what} {source} is larger than {max_bytes} bytes: not a {what}")
    return data
