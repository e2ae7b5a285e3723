"""Files graphprune writes appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from .errors import GraphPruneError, UsageError


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise GraphPruneError(f"cannot write {path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".graphprune-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike):
    """A new temporary directory beside `directory` to fill, renamed to it when the block succeeds and removed
    when it fails: a crash never leaves half a directory. `directory` must not exist."""
    directory = os.fspath(directory)
    if os.path.lexists(directory):
        raise UsageError(f"{directory} exists: give a new directory (nothing is overwritten)")
    tmp = tempfile.mkdtemp(prefix=".graphprune-", dir=os.path.dirname(os.path.abspath(directory)))
    try:
        yield tmp
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
