"""A run folder's life cycle: lock, stage, publish atomically, mark finished.

Every run -- a single ``train.py`` run or one job of an experiment -- writes into
``<dir>/.staging/`` and, once everything (checkpoint, predictions, metrics, plots, logs) is
there, moves it into ``<dir>`` and writes the completion marker ``DONE.json`` last. A run
killed at any point therefore leaves no published output that could be scored: without
``DONE.json`` a folder is unfinished, its leftovers are removed by the next attempt, and
``evaluate.py`` refuses it.

``DONE.json`` holds the hash of the job's resolved config (:mod:`painnet.experiments.identity`),
the metrics, the hyperparameters chosen by the decoder, and the model and split names. A
finished folder is reused only when the hash matches; otherwise :class:`ConfigChangedError`
lists the differing keys, unless ``on_config_change=overwrite``.

``<dir>/.lock`` holds the pid and host of the process working in the folder: a second process
gets :class:`AlreadyRunningError` ("already running (pid …)"); a lock whose process is gone
(killed) is taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import yaml

from painnet import atomic
from painnet.evaluation.table import json_value

DONE = "DONE.json"
LOCK = ".lock"
STAGING = ".staging"
RESOLVED_CONFIG = "job.yaml"
# Entries of a run folder that are not outputs of the run (Hydra's own files, the lock).
KEPT = {".hydra", LOCK, STAGING}
# Prefix of the scratch folders of DDP ranks 1..N-1 (``.rank<k>``): they train and predict
# alongside rank 0, publish nothing and remove their folder when done.
RANK_SCRATCH = ".rank"
ON_CONFIG_CHANGE = ("error", "overwrite")


class AlreadyRunningError(RuntimeError):
    """Another live process works in the same folder."""


class ConfigChangedError(ValueError):
    """A finished run exists in the folder, made with a different config."""


class UnfinishedRunError(FileNotFoundError):
    """The folder holds no finished run (no DONE.json)."""


# --------------------------------------------------------------------------- lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock of a folder for one process (a file ``.lock`` with pid and host)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self.held = False

    def owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _stale(self, owner: dict | None) -> bool:
        if owner is None:
            return True  # unreadable: a writer died between create and write
        if owner.get("host") != socket.gethostname():
            return False  # cannot tell; another machine's process may be alive
        return not _alive(int(owner.get("pid", -1)))

    def acquire(self, wait_s: float = 0.0, poll_s: float = 0.5) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self.owner()
                if owner and owner.get("pid") == os.getpid():
                    raise AlreadyRunningError(f"{self.directory}: locked by this process") from None
                if self._stale(owner):
                    atomic.write_text_atomic(self.path, record)  # take over the dead process's lock
                    if (self.owner() or {}).get("pid") == os.getpid():
                        self.held = True
                        return self
                    continue
                if time.monotonic() >= deadline:
                    raise AlreadyRunningError(
                        f"{self.directory} is already running (pid {owner.get('pid')} on "
                        f"{owner.get('host')}); wait for it to end, or remove {self.path} if "
                        "that process is gone"
                    ) from None
                time.sleep(poll_s)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(record)
            self.held = True
            return self

    def release(self) -> None:
        if self.held and (self.owner() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- marker


def read_done(directory: str | Path) -> dict | None:
    path = Path(directory) / DONE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def is_finished(directory: str | Path) -> bool:
    return (Path(directory) / DONE).is_file()


def _plain(value):
    """Nested values made JSON-safe (numpy scalars and arrays, tuples, NaN → None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return json_value(value)


def write_json_atomic(path: Path, record: dict) -> None:
    """``record`` (numpy values converted, NaN → null) as JSON at ``path``, atomically."""
    atomic.write_json_atomic(path, _plain(record))


def write_done(directory: Path, record: dict) -> None:
    """The completion marker, written last (atomically)."""
    write_json_atomic(Path(directory) / DONE, record)


def reuse_or_clear(directory: Path, identity: dict, config_hash: str, policy: str) -> dict | None:
    """The finished record of ``directory`` if its config hash matches, else None after
    clearing the folder for a new run (``policy=overwrite``) or ConfigChangedError."""
    if policy not in ON_CONFIG_CHANGE:
        raise ValueError(f"on_config_change must be one of {ON_CONFIG_CHANGE}, got {policy!r}")
    done = read_done(directory)
    if done is None:
        return None
    if done.get("config_hash") == config_hash:
        return done
    if policy == "error":
        from painnet.experiments.identity import config_diff

        diff = config_diff(done.get("identity") or {}, identity)
        shown = "\n  ".join(diff[:20]) + ("\n  …" if len(diff) > 20 else "")
        raise ConfigChangedError(
            f"{directory} holds a finished run made with a different config; changed keys:\n  "
            f"{shown or '(hash differs)'}\nRerun in another folder, or set "
            "on_config_change=overwrite to replace it"
        )
    clear_outputs(directory)
    return None


def clear_outputs(directory: Path) -> None:
    """Remove every output of a run folder (marker first), keeping Hydra's files and logs."""
    directory = Path(directory)
    (directory / DONE).unlink(missing_ok=True)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name in KEPT or entry.suffix == ".log" or entry.name.startswith(RANK_SCRATCH):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# --------------------------------------------------------------------------- staging


def fresh_staging(directory: Path) -> Path:
    """An empty ``<directory>/.staging`` (a killed attempt's leftovers removed)."""
    staging = Path(directory) / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, directory: Path) -> None:
    """Move every entry of ``staging`` into ``directory`` (replacing a previous attempt's)."""
    for entry in sorted(staging.iterdir()):
        target = directory / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


def save_config(config: dict, path: Path) -> None:
    atomic.write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
