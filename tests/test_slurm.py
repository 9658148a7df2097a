"""A within-subject sweep on a real SLURM (single node on loopback, tests/slurm/start.sh).

The sweep goes through ``hydra/launcher=slurm`` (hydra-submitit-launcher) as a SLURM job array;
the array is cancelled after its first task has finished, and the same command run again
trains only the missing folds and aggregates the whole sweep.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from painnet.experiments.jobdir import DONE

SCRIPTS = Path(__file__).parent / "slurm"
FOLDS = 3


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment of a running single-node SLURM; its daemons are stopped afterwards."""
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, PAINNET_SLURM_DIR=str(state))
    started = subprocess.run(
        [str(SCRIPTS / "start.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    try:
        assert started.returncode == 0, f"start.sh failed:\n{started.stderr[-3000:]}"
        match = re.search(r"export SLURM_CONF=(\S+)", started.stdout)
        assert match, f"start.sh printed no SLURM_CONF: {started.stdout!r}"
        env["SLURM_CONF"] = match.group(1)
        yield env
    finally:
        subprocess.run([str(SCRIPTS / "stop.sh")], env=env, timeout=60)


def sweep_command(sweep_dir: Path, data_dir: Path, cache_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "painnet.train",
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.array_parallelism=1",
        "hydra.launcher.timeout_min=10",
        "experiment=within_subject",
        "data=tiny",
        "model=ridge",
        "logger=csv",
        "eval.n_boot=200",
        "eval.plots=false",
        f"paths.data_dir={data_dir}",
        f"paths.cache_dir={cache_dir}",
        "split.subject=01",
        f"split.fold=range({FOLDS})",
        f"hydra.sweep.dir={sweep_dir}",
    ]


def finished(sweep: Path) -> list[Path]:
    """Completion markers of the sweep's finished job folders (written last by a job)."""
    return sorted(p for p in sweep.rglob(DONE) if "aggregate" not in p.parts)


def squeue(env: dict) -> str:
    return subprocess.run(
        ["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True
    ).stdout


@pytest.mark.slow
def test_sweep_runs_as_array_resumes_after_scancel_and_aggregates(
    slurm, tmp_path, data_dir, cache_dir, tiny_root
):
    sweep = tmp_path / "sweep"
    command = sweep_command(sweep, data_dir, cache_dir)
    # Simulate and cache the dataset once here, so array tasks only read it.
    warm = subprocess.run(
        [*command[:3], "data=tiny", "model=ridge", "logger=none", "eval.n_boot=10",
         "eval.plots=false", f"paths.data_dir={data_dir}", f"paths.cache_dir={cache_dir}",
         f"hydra.run.dir={tmp_path / 'warm'}"],
        env=slurm, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert warm.returncode == 0, warm.stderr[-3000:]

    # 1) Submit; cancel the array as soon as its first task has finished.
    first = subprocess.Popen(
        command, env=slurm, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not finished(sweep):
        assert first.poll() is None, f"sweep ended early:\n{first.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no job finished within 10 minutes"
        time.sleep(1)
    queued = squeue(slurm)
    array_ids = {line.split("_")[0] for line in queued.split()}
    array_ids = {i for i in array_ids if i.isdigit()}
    assert array_ids, f"no array left in the queue after one task: {queued!r}"
    subprocess.run(["scancel", *sorted(array_ids)], env=slurm, check=True)
    # The user gives up on this submission too. (This test cluster keeps no accounting
    # database, so submitit's sacct cannot report the cancelled tasks to the waiting process;
    # on a real cluster it stops with an error. Either way the rerun below resumes.)
    first.terminate()
    first.communicate(timeout=120)
    finished_first = finished(sweep)
    assert len(finished_first) < FOLDS, "the cancel came too late to test a resume"
    assert not (sweep / "aggregate").exists(), "a cancelled sweep must not aggregate"
    mtimes = {p: p.stat().st_mtime_ns for p in finished_first}

    # The jobs really ran as tasks of a SLURM array (submitit's folders: <array>_<task>).
    submitit = sweep / ".submitit"
    tasks = sorted(p.name for p in submitit.iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert tasks and {t.split("_")[0] for t in tasks} <= array_ids, tasks

    # 2) The same command again: finished folds are skipped, the rest run, then the aggregate.
    again = subprocess.run(
        command, env=slurm, cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items()), "a finished job reran"
    jobs = finished(sweep)
    assert len(jobs) == FOLDS

    table = pd.read_csv(sweep / "aggregate" / "within_subject.csv", dtype={"subject": str})
    row = table[(table["subject"].str.removeprefix("sub-") == "01")]
    assert len(row) == 1 and row["model"].iloc[0] == "ridge"
    assert -1.0 <= float(row["r_1min"].iloc[0]) <= 1.0
    folds = {json.loads((p.parent / "split.json").read_text())["name"] for p in jobs}
    assert len(folds) == FOLDS
    # The last task leaves the queue moments after its result reached the submitting process.
    deadline = time.monotonic() + 60
    while squeue(slurm).strip() and time.monotonic() < deadline:
        time.sleep(1)
    assert squeue(slurm).strip() == "", "jobs left in the queue"


def launcher(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    return cfg.hydra.launcher


def test_launcher_configs_take_resources_from_config():
    slurm = launcher("hydra/launcher=slurm", "hydra.launcher.partition=cpu")
    assert slurm._target_.endswith("SlurmLauncher")
    assert slurm.partition == "cpu" and slurm.gpus_per_node is None
    assert (slurm.tasks_per_node, slurm.cpus_per_task, slurm.mem_gb) == (1, 4, 16)
    assert slurm.array_parallelism == 32 and slurm.timeout_min == 240
    # GPU jobs: one process per GPU, so DDP inside a job has tasks_per_node == devices.
    gpu = launcher("hydra/launcher=slurm_gpu", "trainer=ddp", "trainer.devices=4")
    assert (gpu.gpus_per_node, gpu.tasks_per_node, gpu.nodes) == (4, 4, 1)
    assert launcher("hydra/launcher=slurm_gpu", "trainer=gpu").gpus_per_node == 1
    local = launcher("hydra/launcher=local")
    assert local._target_.endswith("JoblibLauncher") and local.n_jobs == 2


@pytest.mark.slow
def test_local_launcher_runs_two_jobs_at_once_and_aggregates(
    tmp_path, data_dir, cache_dir, tiny_root
):
    sweep = tmp_path / "sweep"
    command = [
        arg
        for arg in sweep_command(sweep, data_dir, cache_dir)
        if not arg.startswith("hydra.launcher.")
    ]
    command[command.index("hydra/launcher=slurm")] = "hydra/launcher=local"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr
    assert len(finished(sweep)) == FOLDS
    table = pd.read_csv(sweep / "aggregate" / "within_subject.csv", dtype={"subject": str})
    assert table["model"].tolist() == ["ridge"]
