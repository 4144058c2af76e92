"""Atomic file writes (a reader never sees a half-written file, a failure leaves none), and
checks that name the user's path when a file cannot be written or read."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qgraph.core.errors import ModelFileError, ModelFileNotFoundError, OutputPathError


def check_writable(path: str | os.PathLike) -> None:
    """Raise :class:`OutputPathError` naming ``path`` unless a file can be written there.

    ``path`` must not be a directory, and the nearest existing folder on its way must be a
    folder (a file standing where a folder is needed is named) in which a file can be
    created: a temporary file is made and removed there, which is the one test that also
    holds for root and for read-only mounts.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(f"cannot write '{path}': it is a directory; give a file name inside it")
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputPathError(f"cannot write '{path}': '{folder}' is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".qgraph-probe.", dir=folder)
    except OSError as exc:
        raise OutputPathError(f"cannot write '{path}': cannot create files in '{folder}' ({exc.strerror or exc})") from exc
    os.close(fd)
    os.unlink(probe)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The rename is atomic on POSIX within one file system; on error the temporary file is
    removed and ``path`` is left as it was. A path that cannot be written raises
    :class:`OutputPathError` naming ``path`` (not the temporary file).
    """
    check_writable(path)
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputPathError(f"cannot write '{path}': {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode(target))
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise OutputPathError(f"cannot write '{path}': {exc.strerror or exc}") from exc
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _default_mode(target: Path) -> int:
    """The mode ``open(target, "w")`` would give: the existing file's, else 0o666 less umask.

    ``mkstemp`` creates files as 0o600, which would make every written model private.
    """
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_head(path: str | os.PathLike, kind: str, size: int = 64) -> tuple[bytes, int]:
    """The first ``size`` bytes of the ``kind`` file (``"ExecuTorch program"``) at ``path`` and
    its length; :class:`ModelFileNotFoundError` when it does not exist, :class:`ModelFileError`
    when it is a directory, empty or unreadable."""
    target = Path(path)
    if not target.exists():
        raise ModelFileNotFoundError(f"no {kind} at '{path}': the file does not exist")
    if target.is_dir():
        raise ModelFileError(f"'{path}' is a directory, not an {kind} file")
    try:
        with open(target, "rb") as f:
            head = f.read(size)
        length = target.stat().st_size
    except OSError as exc:
        raise ModelFileError(f"cannot read the {kind} '{path}': {exc.strerror or exc}") from exc
    if length == 0:
        raise ModelFileError(f"'{path}' is empty (0 bytes), not an {kind}; write it again")
    return head, length
