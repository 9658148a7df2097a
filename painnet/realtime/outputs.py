"""Where estimates go: an appended TSV, an optional UDP message, the live page's memory.

The TSV is written one whole line per volume with one ``write`` and a flush, so stopping at any
moment (Ctrl-C) leaves every processed volume's row and no partial line. Columns:
``volume`` (frame index, 0 = first volume), ``time_s`` (its onset), ``estimate`` (``n/a`` when
none), ``censored`` (0/1: the frame is not kept), ``status`` (ok, warmup, dropped, censored,
missing, corrupt), ``latency_ms`` (from the file's modification time to the estimate) and
``file``.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
from pathlib import Path

from painnet.realtime.stream import Estimate

log = logging.getLogger(__name__)

COLUMNS = ("volume", "time_s", "estimate", "censored", "status", "latency_ms", "file")


def _cell(value: float, digits: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, digits)


class TsvWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._fh.write("\t".join(COLUMNS) + "\n")
        self._fh.flush()

    def write(self, est: Estimate, latency_ms: float | None, file: str) -> None:
        row = (
            str(est.volume),
            format(est.time_s, ".3f"),
            _cell(est.estimate, ".10g"),
            str(int(est.censored)),
            est.status,
            _cell(latency_ms if latency_ms is not None else math.nan, ".2f"),
            file or "n/a",
        )
        self._fh.write("\t".join(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class UdpSender:
    """One JSON datagram per estimate: ``{"volume", "time_s", "estimate", "censored",
    "status"}`` (``estimate`` null when none)."""

    def __init__(self, address: str):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--udp must be HOST:PORT, got {address!r}")
        self.target = (host, int(port))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._warned = False

    def send(self, est: Estimate) -> None:
        message = {
            "volume": est.volume,
            "time_s": round(est.time_s, 3),
            "estimate": None if math.isnan(est.estimate) else est.estimate,
            "censored": est.censored,
            "status": est.status,
        }
        try:
            self._sock.sendto(json.dumps(message).encode(), self.target)
        except OSError as err:
            if not self._warned:
                log.warning("UDP to %s:%d failed (%s); going on", *self.target, err)
                self._warned = True

    def close(self) -> None:
        self._sock.close()


class LiveState:
    """Rows for the live page (thread-safe)."""

    def __init__(self, title: str, tr: float):
        self.title = title
        self.tr = tr
        self._rows: list[list] = []
        self._lock = threading.Lock()
        self.finished = False

    def add(self, est: Estimate) -> None:
        row = [
            est.volume,
            round(est.time_s, 3),
            None if math.isnan(est.estimate) else round(est.estimate, 5),
            int(est.censored),
            est.status,
        ]
        with self._lock:
            self._rows.append(row)

    def snapshot(self, since: int = 0) -> dict:
        with self._lock:
            rows = self._rows[since:]
            total = len(self._rows)
        return {
            "title": self.title,
            "tr": self.tr,
            "columns": ["volume", "time_s", "estimate", "censored", "status"],
            "rows": rows,
            "next": total,
            "finished": self.finished,
        }
