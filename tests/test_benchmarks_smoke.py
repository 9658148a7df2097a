"""The benchmark runner works end to end (``python -m benchmarks --quick``).

This checks that every stage runs and reports what it promises; it asserts no speed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import PeakMemory, target
from benchmarks.runner import STAGES, parse_args

REPO = Path(__file__).resolve().parents[1]
TARGET_FIELDS = {
    "name",
    "description",
    "measured",
    "goal",
    "kind",
    "unit",
    "ratio",
    "passed",
    "source",
}
MEASUREMENT_FIELDS = {"name", "what", "n_repeats", "best_s", "median_s", "peak_mem_mb"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> dict:
    """Run the whole quick benchmark once in a subprocess, as a user would."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    report = json.loads((out / "latest.json").read_text())
    report["_stdout"] = proc.stdout
    return report


def test_every_stage_reports_positive_timings(quick_report):
    assert set(quick_report["stages"]) == set(STAGES)
    for name, stage in quick_report["stages"].items():
        assert "error" not in stage, f"{name}: {stage.get('error')}"
        assert stage["what"] and stage["sizes"]
        assert stage["wall_s"] > 0
        assert stage["measurements"], name
        for m in stage["measurements"]:
            assert set(m) >= MEASUREMENT_FIELDS, (name, m["name"])
            assert m["best_s"] > 0 and m["median_s"] >= m["best_s"], (name, m["name"])


def test_targets_are_present_and_decided(quick_report):
    stages = quick_report["stages"]
    extract_targets = {t["name"] for t in stages["extract"]["targets"]}
    for fmt in (".nii.gz", ".nii"):
        assert {
            f"painnet/floor {fmt}",
            f"speed-up vs nilearn {fmt}",
            f"memory vs nilearn {fmt}",
        } <= extract_targets
    assert [t["name"] for t in stages["windows"]["targets"]] == ["windows vs training"]
    all_targets = [t for s in stages.values() for t in s["targets"]]
    for t in all_targets:
        assert set(t) >= TARGET_FIELDS, t
        assert t["measured"] is not None and t["measured"] > 0, t
        assert t["passed"] in (True, False)
        assert math.isclose(t["ratio"], t["measured"] / t["goal"])


def test_extraction_contenders_agree_and_memory_is_measured(quick_report):
    stage = quick_report["stages"]["extract"]
    names = {m["name"] for m in stage["measurements"]}
    assert names >= {"floor .nii", "nilearn .nii", "painnet .nii", "floor zlib .nii.gz"}
    assert names >= {"nilearn .nii.gz", "painnet .nii.gz", "painnet zlib .nii.gz"}
    for m in stage["measurements"]:
        assert m["peak_mem_mb"] is not None and m["peak_mem_mb"] >= 0
    for check in stage["checks"].values():  # painnet and nilearn computed the same means
        assert check["same_shape"] and check["max_abs_diff"] < 1e-2


def test_training_stage_has_rates_loso_and_estimate(quick_report):
    stage = quick_report["stages"]["train"]
    step = next(m for m in stage["measurements"] if m["name"] == "train step CPU fp32")
    assert step["rate_unit"] == "samples/s" and step["rate"] > 0
    loso = [m for m in stage["measurements"] if m["name"].startswith("LOSO deep")]
    assert loso and loso[0]["n_folds"] >= 1  # quick mode runs a tiny LOSO on CPU
    estimate = stage["loso_estimate_cpu"]
    assert estimate["estimate"] is True and estimate["total_s"] > 0


def test_report_describes_machine_and_command(quick_report):
    assert quick_report["command"].startswith("python -m benchmarks --quick --out ")
    machine = quick_report["machine"]
    for key in ("cpu_model", "cpu_count", "ram_gb", "versions", "load_average_start", "gpu"):
        assert key in machine
    assert {"torch", "numpy", "nilearn"} <= set(machine["versions"])
    assert quick_report["date_utc"]
    assert "painnet benchmarks: measurements" in quick_report["_stdout"]


def test_peak_memory_sees_an_allocation():
    import numpy as np

    with PeakMemory() as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
    assert mem.peak_mb >= 48


def test_target_records_pass_and_miss():
    assert target("t", "d", 2.0, 3.0, "max", "s", "brief")["passed"] is True
    assert target("t", "d", 4.0, 3.0, "max", "s", "brief")["passed"] is False
    assert target("t", "d", 4.0, 3.0, "min", "x", "brief")["passed"] is True
    assert target("t", "d", None, 3.0, "min", "x", "brief")["passed"] is None
    with pytest.raises(ValueError, match="kind"):
        target("t", "d", 1.0, 3.0, "between", "x", "brief")


def test_cli_rejects_unknown_stage():
    with pytest.raises(SystemExit):
        parse_args(["--stages", "extract,nonsense"])
    assert parse_args(["--quick"]).measure_loso == "yes"
    assert parse_args([]).measure_loso == "auto"
