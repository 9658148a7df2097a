"""Volumes as they land in a folder, in scan order, with gaps declared.

A volume is a file ``*.nii`` or ``*.nii.gz`` whose name ends in its volume number (the last run
of digits: ``vol-00012.nii``, ``001_000005_000012.nii.gz``); numbering starts at
``first_number`` (default 1) and volume ``first_number + t`` is frame ``t``. Hidden files and
names containing ``.tmp`` are ignored (writers should write under such a name and rename).

Waiting for the next volume, the watcher checks for its expected name (same prefix, width and
suffix as the previous volume) every ``poll_s``, and lists the folder every ``scan_s``. The
volume is declared **missing** once a later volume has been present for ``late_s`` seconds; if
it turns up after that, it is skipped with a warning. The stream **ends** when nothing new
arrived for ``idle_s`` seconds, after ``max_volumes``, when ``finished()`` says the writer is
done and nothing is left, or when ``stop`` is set.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SUFFIXES = (".nii.gz", ".nii")
_NUMBER = re.compile(r"(\d+)(?!.*\d)")


@dataclass(frozen=True)
class Arrival:
    """Frame ``volume``: its file, or None when it was declared missing."""

    volume: int
    path: Path | None
    seen_at: float  # time.time() when the watcher found the file (or gave up on it)


def volume_number(name: str) -> int | None:
    """Volume number from a file name, None if the file is no volume."""
    if name.startswith(".") or ".tmp" in name:
        return None
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            match = _NUMBER.search(name[: -len(suffix)])
            return int(match.group(1)) if match else None
    return None


def _next_name(name: str, number: int) -> str | None:
    """``name`` with its volume number replaced by ``number`` (same zero padding)."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            match = _NUMBER.search(stem)
            if not match:
                return None
            digits = match.group(1)
            width = len(digits) if digits.startswith("0") else 1
            return f"{stem[: match.start()]}{number:0{width}d}{stem[match.end() :]}{suffix}"
    return None


class WatchFolder:
    """Iterate over :class:`Arrival` records of a folder, frame 0, 1, 2, … in order."""

    def __init__(
        self,
        folder: str | Path,
        first_number: int = 1,
        late_s: float = 0.5,
        idle_s: float = 30.0,
        poll_s: float = 0.002,
        scan_s: float = 0.05,
        max_volumes: int | None = None,
        stop: threading.Event | None = None,
        finished: Callable[[], bool] | None = None,
    ):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"watch folder not found: {self.folder}")
        self.first_number = int(first_number)
        self.late_s = float(late_s)
        self.idle_s = float(idle_s)
        self.poll_s = float(poll_s)
        self.scan_s = float(scan_s)
        self.max_volumes = max_volumes
        self.stop = stop or threading.Event()
        self.finished = finished
        self._known: dict[int, str] = {}  # volume number -> file name
        self._template: str | None = None
        self._warned_late: set[int] = set()

    def __iter__(self) -> Iterator[Arrival]:
        volume = 0
        last_new = time.time()
        later_since: float | None = None
        last_scan = 0.0
        while not self.stop.is_set():
            if self.max_volumes is not None and volume >= self.max_volumes:
                return
            number = self.first_number + volume
            now = time.time()
            path = self._lookup(number)
            if path is None and now - last_scan >= self.scan_s:
                self._scan(number)
                last_scan = now
                path = self._lookup(number)
            if path is not None:
                self._template = path.name
                yield Arrival(volume, path, time.time())
                volume, later_since, last_new = volume + 1, None, time.time()
                continue
            if any(n > number for n in self._known):
                later_since = later_since or now
                if now - later_since >= self.late_s:
                    yield Arrival(volume, None, now)
                    volume, later_since, last_new = volume + 1, None, now
                    continue
            elif self.finished is not None and self.finished():
                self._scan(number)
                if self._lookup(number) is None and not any(n > number for n in self._known):
                    return
            if now - last_new >= self.idle_s:
                log.info("no new volume for %.1f s: end of the stream", self.idle_s)
                return
            time.sleep(self.poll_s)

    def _lookup(self, number: int) -> Path | None:
        name = self._known.get(number)
        if name is None and self._template is not None:
            guess = _next_name(self._template, number)
            if guess and os.path.exists(self.folder / guess):
                self._known[number] = name = guess
        return None if name is None else self.folder / name

    def _scan(self, expected: int) -> None:
        with os.scandir(self.folder) as entries:
            for entry in entries:
                number = volume_number(entry.name)
                if number is None or number in self._known:
                    continue
                self._known[number] = entry.name
                late = self.first_number <= number < expected
                if late and number not in self._warned_late:
                    self._warned_late.add(number)
                    log.warning(
                        "%s arrived after volume %d was declared missing: skipped",
                        entry.name,
                        number - self.first_number,
                    )
