"""Content-keyed on-disk cache of arrays, written atomically.

An entry is one uncompressed ``.npz`` file named by the SHA-256 of its key (a JSON-able dict:
source file identities, atlas identity, settings, painnet version). Writes go to a temporary file
in the same folder and are moved into place with ``os.replace``, so a killed process leaves at
most a stray ``*.tmp-*`` file, never a half-written entry under a real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

import painnet


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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{key}.tmp-", suffix=".npz")
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
