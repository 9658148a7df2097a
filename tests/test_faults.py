"""kill -9 at random points, then rerun: the final outputs equal those of an uninterrupted run.

A single run (``train.py``), a loop experiment and a multirun sweep (rerun with its jobs in
another order) are killed with SIGKILL after a random delay (seeded), rerun in the same folder,
and compared with an uninterrupted run: same published files, same predictions, same metrics;
finished sweep jobs are not trained again. All through the real CLI, hence slow.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from painnet.evaluation.table import read_table

REPO = Path(__file__).resolve().parents[1]
FAST = (
    "data=tiny",
    "logger=csv",
    "eval.n_boot=20",
    "eval.plots=false",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
)
IGNORED = {".hydra", "train.log", "csv"}  # Hydra's own files; the CSV log has timings

pytestmark = pytest.mark.slow


def command(data_dir, cache_dir, *args) -> list[str]:
    paths = (f"paths.data_dir={data_dir}", f"paths.cache_dir={cache_dir}")
    flags = [a for a in args if a.startswith("-")]  # e.g. -m: before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    return [sys.executable, "-m", "painnet.train", *flags, *FAST, *paths, *overrides]


def env() -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def run(cmd) -> float:
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return time.monotonic() - start


def run_killed(cmd, seed: int, duration: float) -> float:
    """Start ``cmd`` and SIGKILL it after a seeded random share of ``duration``."""
    delay = random.Random(seed).uniform(0.3, 0.95) * duration
    child = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        child.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        child.kill()  # SIGKILL: no cleanup of any kind runs
        child.wait()
    return delay


def outputs(folder: Path) -> dict[str, Path]:
    """Published outputs of a run folder (Hydra's files and logs left out)."""
    found = {}
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and not (set(rel.parts) & IGNORED) and "_launch" not in rel.parts:
            found[str(rel)] = path
    return found


def assert_same_run(a: Path, b: Path) -> None:
    files_a, files_b = outputs(a), outputs(b)
    assert sorted(files_a) == sorted(files_b)
    assert not any(".staging" in f or f.endswith(".lock") for f in files_b)
    for name in files_a:
        if name.endswith("predictions.csv"):
            x, y = read_table(files_a[name]), read_table(files_b[name])
            pd.testing.assert_frame_equal(
                x.drop(columns="prediction"), y.drop(columns="prediction")
            )
            np.testing.assert_allclose(x.prediction, y.prediction, rtol=1e-5, atol=1e-7)
        elif name.endswith("DONE.json"):
            da, db = (json.loads(files[name].read_text()) for files in (files_a, files_b))
            assert da["config_hash"] == db["config_hash"]
            for key, value in da["metrics"].items():
                assert db["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True)


@pytest.fixture(scope="module")
def reference(tiny_root, data_dir, cache_dir, tmp_path_factory):
    """Uninterrupted runs, and how long each took (the range of kill points)."""
    root = tmp_path_factory.mktemp("reference")
    single = command(data_dir, cache_dir, "model=convattn", f"hydra.run.dir={root / 'single'}")
    loop = command(
        data_dir,
        cache_dir,
        "experiment=within_subject",
        "model=ridge",
        f"hydra.run.dir={root / 'loop'}",
    )
    return {
        "single": (root / "single", run(single)),
        "loop": (root / "loop", run(loop)),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_killed_single_run_reruns_to_the_uninterrupted_outputs(
    seed, reference, data_dir, cache_dir, tmp_path
):
    ref, duration = reference["single"]
    out = tmp_path / "single"
    cmd = command(data_dir, cache_dir, "model=convattn", f"hydra.run.dir={out}")
    run_killed(cmd, seed, duration)
    assert not (out / "DONE.json").exists() or outputs(out).keys() == outputs(ref).keys()
    run(cmd)
    assert_same_run(ref, out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_killed_loop_reruns_to_the_uninterrupted_outputs(
    seed, reference, data_dir, cache_dir, tmp_path
):
    ref, duration = reference["loop"]
    out = tmp_path / "loop"
    cmd = command(
        data_dir, cache_dir, "experiment=within_subject", "model=ridge", f"hydra.run.dir={out}"
    )
    run_killed(cmd, seed, duration)
    run(cmd)  # the dead loop's lock is stale: taken over
    assert_same_run(ref, out)


def test_a_killed_sweep_resumes_in_another_order_without_retraining(
    tiny_root, data_dir, cache_dir, tmp_path
):
    def sweep(folder: Path, folds: str) -> list[str]:
        return command(
            data_dir,
            cache_dir,
            "-m",
            "experiment=within_subject",
            "model=ridge",
            "split.subject=01,02",
            f"split.fold={folds}",
            f"hydra.sweep.dir={folder}",
        )

    ref = tmp_path / "reference"
    duration = run(sweep(ref, "0,1,2"))
    out = tmp_path / "sweep"
    run_killed(sweep(out, "0,1,2"), seed=3, duration=duration)
    finished = {p.parent: p.stat().st_mtime_ns for p in out.glob("*/*/DONE.json")}
    run(sweep(out, "2,1,0"))  # reordered: job numbers differ, identities do not
    for marker, stamp in finished.items():
        assert (marker / "DONE.json").stat().st_mtime_ns == stamp, f"{marker} retrained"
    assert_same_run(ref, out)
    table = pd.read_csv(out / "aggregate" / "within_subject.csv", dtype={"subject": str})
    expected = pd.read_csv(ref / "aggregate" / "within_subject.csv", dtype={"subject": str})
    pd.testing.assert_frame_equal(table, expected)
