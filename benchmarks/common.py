"""Shared helpers: timing, peak memory, child processes, and the result records.

Records (plain dicts, so they go straight into the JSON):

- a *measurement*: ``{"name", "what", "n_repeats", "best_s", "median_s", "peak_mem_mb",
  "rate", "rate_unit", ...}``; ``best_s``/``median_s`` are wall seconds of one repeat,
  ``peak_mem_mb`` the peak resident memory the measured code added (MiB, ``None`` if not
  measured), ``rate`` an optional throughput (e.g. windows/s) computed from ``best_s``;
- a *target*: ``{"name", "description", "measured", "goal", "unit", "ratio", "passed",
  "source"}`` where ``passed`` is ``measured <= goal`` or ``>= goal`` as ``kind`` says (``None``
  when it could not be measured), ``ratio`` is ``measured / goal`` and ``source`` says whether
  the goal comes from the project brief or was set by the benchmarks (with its reason).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT_MARKER = "BENCHMARK-RESULT "
MIB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` successive calls of ``fn`` (no warm-up: call it first)."""
    times = []
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summarize_times(times: list[float]) -> dict[str, float]:
    """Best and median of a list of per-repeat wall seconds."""
    return {
        "n_repeats": len(times),
        "best_s": float(min(times)),
        "median_s": float(statistics.median(times)),
        "all_s": [round(float(t), 6) for t in times],
    }


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> float | None:
    """A ``VmXXX:`` field of /proc/self/status in KiB (None where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory added by a block of code, in MiB.

    On Linux the process's high-water mark is reset first (``/proc/self/clear_refs``, value 5),
    so earlier spikes (imports, warm-up) do not count; the result is ``VmHWM - VmRSS`` at the
    start. Elsewhere it falls back to ``ru_maxrss`` minus the resident size at the start, which
    over-counts if an earlier spike was higher than the block's own peak (``reset`` says which).
    """

    def __enter__(self) -> PeakMemory:
        self.reset = _reset_high_water_mark()
        self.start_kib = _status_kib("VmRSS") or _maxrss_kib()
        self.peak_mb: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        peak_kib = _status_kib("VmHWM") if self.reset else None
        peak_kib = peak_kib if peak_kib is not None else _maxrss_kib()
        self.peak_mb = max(peak_kib - self.start_kib, 0.0) / 1024

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_mem_mb": round(self.peak_mb, 2) if self.peak_mb is not None else None,
            "baseline_rss_mb": round(self.start_kib / 1024, 1),
            "peak_mem_method": "VmHWM reset" if self.reset else "ru_maxrss - start RSS",
        }


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _maxrss_kib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 / 1024 if sys.platform == "darwin" else 1.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# --------------------------------------------------------------------------- records


def measurement(
    name: str,
    what: str,
    times: list[float],
    peak_mem_mb: float | None = None,
    items: float | None = None,
    rate_unit: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A measurement record; ``items`` processed per repeat gives ``rate = items / best_s``."""
    record: dict[str, Any] = {"name": name, "what": what, **summarize_times(times)}
    record["peak_mem_mb"] = None if peak_mem_mb is None else round(float(peak_mem_mb), 2)
    if items is not None:
        record["rate"] = float(items) / record["best_s"]
        record["rate_median"] = float(items) / record["median_s"]
        record["rate_unit"] = rate_unit
    record.update(extra)
    return record


def target(
    name: str,
    description: str,
    measured: float | None,
    goal: float,
    kind: str,
    unit: str,
    source: str,
) -> dict[str, Any]:
    """A target record. ``kind``: ``"max"`` (measured must be <= goal) or ``"min"`` (>=)."""
    if kind not in ("max", "min"):
        raise ValueError(f"target kind must be 'max' or 'min', got {kind!r}")
    ok = measured is not None and goal > 0
    ratio = float(measured) / goal if ok else None
    passed = None if not ok else (measured <= goal if kind == "max" else measured >= goal)
    return {
        "name": name,
        "description": description,
        "measured": None if measured is None else float(measured),
        "goal": float(goal),
        "kind": kind,
        "unit": unit,
        "ratio": ratio,
        "passed": passed,
        "source": source,
    }


# --------------------------------------------------------------------------- children


def run_child(task: str, params: dict[str, Any], timeout_s: float = 1800) -> dict[str, Any]:
    """Run ``benchmarks.child <task>`` in a fresh interpreter and return its result dict.

    The child prints one line ``BENCHMARK-RESULT <json>``; anything else it prints is ignored
    (but shown in the error if it fails).
    """
    cmd = [sys.executable, "-m", "benchmarks.child", task, json.dumps(params)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env.setdefault("WANDB_MODE", "disabled")
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = (proc.stderr or proc.stdout)[-3000:]
    raise RuntimeError(f"benchmark child {task!r} failed (exit {proc.returncode}):\n{tail}")


def emit_result(result: dict[str, Any]) -> None:
    """Child side of :func:`run_child`: print the result line."""
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
