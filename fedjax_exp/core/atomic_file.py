"""Atomic file replacement: write to a temporary file beside the target, then rename it.

Readers of ``target`` see either nothing (or the previous file) or the complete new file,
never a half-written one: ``os.replace`` within one directory is atomic on POSIX, and a failed
or interrupted write (including Ctrl-C) deletes the temporary file. Used by every writer of
dataset files (SQLite, TFF h5, downloads) and of a run's small JSON files (status, record).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any

__all__ = ["AtomicFile", "atomic_write_text"]


class AtomicFile:
    """A temporary ``*.partial`` file that either replaces ``target`` or is deleted.

    Write to :attr:`tmp` by name, then :meth:`commit` (move into place) or :meth:`discard`.
    As a context manager it commits on a clean exit and discards on any exception::

        with AtomicFile(path) as out:
            out.tmp.write_bytes(data)

    Args:
        target: the file to create or replace; its directory is created if needed.
        overwrite: allow replacing an existing ``target`` (default: FileExistsError at once,
            before anything is written).
    """

    def __init__(self, target: str | os.PathLike[str], overwrite: bool = True):
        self.target = pathlib.Path(target)
        if not overwrite and self.target.exists():
            raise FileExistsError(
                f"{str(self.target)!r} already exists; delete it or pass overwrite=True"
            )
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as the target, so the final rename never crosses file systems; the
        # leading dot hides it and the suffix says what it is if a crash leaves it behind.
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.target.name}.", suffix=".partial", dir=self.target.parent
        )
        os.close(fd)
        self.tmp = pathlib.Path(tmp)

    def commit(self) -> None:
        """Moves the finished temporary file to ``target``."""
        _chmod_like_new_file(self.tmp)
        os.replace(self.tmp, self.target)

    def discard(self) -> None:
        """Deletes the temporary file; ``target`` is left untouched."""
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()


def _chmod_like_new_file(path: pathlib.Path) -> None:
    """mkstemp creates files 0600; give the final file the mode a plain open() would."""
    umask = os.umask(0)  # The only portable way to read the umask is to set it...
    os.umask(umask)  # ...and put it straight back.
    os.chmod(path, 0o666 & ~umask)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically: readers see the old file or all of it."""
    with AtomicFile(path) as out:
        out.tmp.write_text(text, encoding="utf-8")
