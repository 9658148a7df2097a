"""Write a file atomically: readers see the previous file or the new one whole, never a part.

Every writer puts its bytes in a temporary file next to the target and moves it into place
with ``os.replace`` (atomic within one file system). A write that fails -- an exception, a
``KeyboardInterrupt`` -- removes its temporary and leaves the target as it was.

Temporaries are named ``.<name>.tmp-<pid>-<random><suffixes>``: hidden (the real-time folder
watcher and globbing readers skip names starting with ``.`` or holding ``.tmp``), owned by one
writer (created exclusively, so concurrent writers of one target never share one), and ending
in the target's suffixes, so that libraries choosing a format from the name (nibabel,
matplotlib, pandas' compression) write what they would write to the target itself.

Nothing here calls ``fsync``: like a plain ``open(...).write``, a file survives a process kill
but not necessarily a power loss.

:func:`atomic_path` serves writers that need a path (``nib.save``, ``fig.savefig``); the
``write_*_atomic`` functions are its shorthands for bytes, text, JSON and pandas tables.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "write_bytes_atomic",
    "write_csv_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


def _temporary_name(path: str | os.PathLike) -> Path:
    """A fresh temporary path for ``path``: same folder, hidden, same suffixes (not created)."""
    path = Path(path)
    token = secrets.token_hex(4)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{token}{''.join(path.suffixes)}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mkdir: bool = False) -> Iterator[Path]:
    """Yield an empty temporary file next to ``path`` to write to; on a normal exit it replaces
    ``path``, on an exception it is removed and ``path`` is left untouched.

    mkdir: create missing parent folders first (else a missing folder raises
    FileNotFoundError, as ``open`` would).
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temporary_name(path)
        try:  # exclusive: never another writer's temporary; mode as ``open`` gives (umask)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, mkdir: bool = False) -> Path:
    """``Path(path).write_bytes(data)``, atomically; returns the path."""
    with atomic_path(path, mkdir=mkdir) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(
    path: str | os.PathLike, text: str, *, encoding: str = "utf-8", mkdir: bool = False
) -> Path:
    """``Path(path).write_text(text)``, atomically; returns the path."""
    with atomic_path(path, mkdir=mkdir) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, record: Any, *, mkdir: bool = False) -> Path:
    """``record`` as JSON -- one-space indent, no trailing newline, NaN/inf refused
    (ValueError, before anything is written) -- atomically; returns the path.

    This is the format of the run folders' ``DONE.json``; values must already be JSON types
    (:func:`painnet.experiments.jobdir.write_json_atomic` converts numpy values first).
    """
    text = json.dumps(record, indent=1, allow_nan=False)
    return write_text_atomic(path, text, mkdir=mkdir)


def write_csv_atomic(
    path: str | os.PathLike, table, *, index: bool = False, mkdir: bool = False, **to_csv
) -> Path:
    """``table.to_csv(path, index=index, **to_csv)`` for a pandas DataFrame, atomically
    (comma-separated unless ``sep=`` says otherwise; compression as inferred from ``path``);
    returns the path."""
    with atomic_path(path, mkdir=mkdir) as tmp:
        table.to_csv(tmp, index=index, **to_csv)
    return Path(path)
