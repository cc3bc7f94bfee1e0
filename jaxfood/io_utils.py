"""Atomic file output: nothing already written is left half-written.

Writers build their output in a temporary sibling and rename it into place once complete, so an
error (or a kill) midway leaves either the old file/directory or none, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (where a new directory would be created)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(directory: Path) -> bool:
    """Whether a file can be created in ``directory`` (os.access is wrong for root and read-only mounts)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".jaxfood-write-probe.", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Checks, before any work, that ``path`` can become or already is a writable directory.

    Raises :class:`~jaxfood.errors.UserError` naming ``flag`` (e.g. ``--out``) when ``path`` is an
    existing file, lies under a file, or cannot be written. Creates nothing.
    """
    from jaxfood.errors import UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory (expected a directory to write into)")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UserError(f"{flag} {path}: {base} is a file, not a directory (expected a directory path)")
    if not _probe_writable(base):
        raise UserError(f"{flag} {path}: directory {base} is not writable (expected a directory you can write to)")
    return path


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Checks, before any work, that a file can be written at ``path`` (not a directory, writable parent)."""
    from jaxfood.errors import UserError

    text, path = os.fspath(path), Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory (expected a file name to write)")
    if text.endswith(os.sep):
        raise UserError(f"{flag} {text}: ends with '{os.sep}' (expected a file name to write)")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise UserError(f"{flag} {path}: {base} is a file, not a directory (expected a file path in a directory)")
    if not _probe_writable(base):
        raise UserError(f"{flag} {path}: directory {base} is not writable (expected a location you can write to)")
    return path


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the file the mode a plain open() would have.
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory; on success each entry moves into ``path`` (created if needed).

    Entries of ``path`` with the same names are replaced; other entries are left alone, so a
    user's existing directory is never wiped. On an exception nothing is moved.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        path.mkdir(parents=True, exist_ok=True)
        for entry in sorted(tmp.iterdir()):
            target = path / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
