"""Writing files so that an interrupted run never leaves a half-written one (every layer may use this)."""

from __future__ import annotations

import os
import tempfile

__all__ = ["atomic_write"]


def atomic_write(path, write) -> None:
    """Run write(file) on a temporary file in the target's folder, then rename it over `path`.

    A crash, SIGKILL or Ctrl-C during the write leaves the previous file intact (and at worst a stray
    ``.NAME.*.tmp``), never a truncated `path`. The new file gets the permissions a plain open() would.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:  # mkstemp inside the try: an interrupt right after it still removes the temporary file
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
        raise
