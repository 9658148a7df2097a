"""Content-keyed on-disk cache of arrays, written atomically.

An entry is one uncompressed ``.npz`` file named by the SHA-256 of its key (a JSON-able dict:
source file identities, atlas identity, settings, painnet version). Writes go to a temporary file
in the same folder and are moved into place with ``os.replace``, so a killed process leaves at
most a stray temporary file, never a half-written entry under a real name.

Temporaries are named ``<key>.tmp-<host>-<pid>-<random>.npz``: the first write of an
:class:`ArrayCache` removes those whose owner process is gone (same host, pid no longer running),
and any temporary older than :data:`STALE_AFTER_S` (other hosts, or an unknown owner). The same
rule (:func:`is_stale_temporary`) cleans the simulator's ``sim-*.tmp-<host>-<pid>/`` folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

import painnet

log = logging.getLogger(__name__)

# A temporary this old is stale whoever owns it: no cache entry or dataset takes a day to write.
STALE_AFTER_S = 24 * 3600.0
HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"
_TEMP_TAG = re.compile(r"\.tmp-(?:(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)(?:-|$)|(?P<legacy>\d+)$)")


def temp_tag(pid: int | None = None) -> str:
    """``tmp-<host>-<pid>``: marks a temporary with the process that owns it."""
    return f"tmp-{HOST}-{os.getpid() if pid is None else pid}"


def pid_running(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def is_stale_temporary(path: Path, now: float | None = None) -> bool:
    """Whether ``path`` is a temporary (``*.tmp-…``) that nobody will finish.

    Stale: its owner pid (this host) is no longer running, or it is older than
    ``STALE_AFTER_S`` (owner on another host, or unknown). Never one of this process's own.
    """
    if ".tmp-" not in path.name:
        return False
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_AFTER_S:
        return True
    match = _TEMP_TAG.search(path.name)
    if match is None:  # no owner in the name (older painnet): only the age rule applies
        return False
    pid = match["pid"] or match["legacy"]
    if match["host"] not in (None, HOST) or pid is None:
        return False
    pid = int(pid)
    return pid != os.getpid() and not pid_running(pid)


def remove_stale(paths) -> list[Path]:
    """Remove every stale temporary among ``paths`` (files or folders); returns those removed."""
    removed = []
    for path in paths:
        path = Path(path)
        if not is_stale_temporary(path):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another process cleaned it first
            continue
        log.info("removed stale temporary %s (its writer is gone)", path)
        removed.append(path)
    return removed


def file_identity(path: str | Path | None) -> dict | None:
    """Identity of a source file: resolved path, size and modification time (ns).

    Cheap for multi-GB BOLD files; any rewrite of the file changes size or mtime and so the key.
    """
    if path is None:
        return None
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(**parts) -> str:
    """SHA-256 of the parts (and the painnet version) as canonical JSON."""
    payload = json.dumps({**parts, "painnet": painnet.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class ArrayCache:
    """A folder of cached array bundles."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._swept = False

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporaries left by killed writers (see :func:`is_stale_temporary`)."""
        self._swept = True
        if not self.root.is_dir():
            return []
        return remove_stale(self.root.glob("*/*.tmp-*"))

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays of an entry, or None when absent or unreadable (then it is recomputed)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as bundle:
                return {name: bundle[name] for name in bundle.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            warnings.warn(f"{path}: unreadable cache entry ignored ({err})", stacklevel=2)
            return None

    def save(self, key: str, arrays: Mapping[str, np.ndarray]) -> Path:
        """Write an entry atomically; returns its path."""
        path = self.path(key)
        if not self._swept:
            self.remove_stale_temporaries()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{key}.{temp_tag()}-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def get_or_compute(
        self, key: str, compute: Callable[[], Mapping[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        cached = self.load(key)
        if cached is not None:
            return cached
        arrays = dict(compute())
        self.save(key, arrays)
        return arrays
