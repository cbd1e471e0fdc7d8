"""Writing files so that they appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterator

from shoal.errors import BadRequest, NotFound


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path` for binary writing; rename it onto `path` only when the block
    finishes without an exception. An interrupted write never leaves half a file (nor the temporary)."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise NotFound(f"cannot write {target}: directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".shoal-", suffix=".part")
    except OSError as exc:
        raise BadRequest(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        raise BadRequest(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
