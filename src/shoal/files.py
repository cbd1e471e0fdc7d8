"""Writing files so that they appear whole or not at all, and telling a full disk from other write failures."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from shoal.errors import BadRequest, InsufficientStorage, NotFound

#: The errors of a disk (or a quota) with no room left for the write.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
MIB = 2**20


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc` is a write that failed for want of space (ENOSPC, or EDQUOT on a quota)."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path` for binary writing; rename it onto `path` only when the block
    finishes without an exception. An interrupted write never leaves half a file (nor the temporary). A full
    disk is InsufficientStorage, any other failure BadRequest."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise NotFound(f"cannot write {target}: directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".shoal-", suffix=".part")
    except OSError as exc:
        raise write_error(target, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        raise write_error(target, exc) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_error(target: str, exc: OSError) -> BadRequest | InsufficientStorage:
    reason = exc.strerror or str(exc)
    if out_of_space(exc):
        return InsufficientStorage(f"cannot write {target}: {reason}")
    return BadRequest(f"cannot write {target}: {reason}")


def low_space_warning(directory: Path, min_free_mb: float) -> str | None:
    """A one-line warning when the file system holding `directory` has less than `min_free_mb` MiB free (None
    when it has enough, or when it cannot be measured: `directory` and its parents are missing)."""
    anchor = Path(directory).expanduser()
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    try:
        free = shutil.disk_usage(anchor).free
    except OSError:
        return None
    if free >= min_free_mb * MIB:
        return None
    return (f"the data dir {directory} has {free / MIB:.0f} MiB free, less than the {min_free_mb:g} MiB "
            f"min_free_disk_mb asks for: new voices may be refused (507)")
