"""Nothing silent at the level of runs (issue 13): every stale result and impossible run request
stops with an error naming the config key or file, and leaves no output behind.

Cases: an untrained model (``trainer.max_epochs=0``); a finished run or experiment job rerun with
a changed config; ``evaluate.py`` with a model whose input size does not fit the data; a killed
run's leftovers; a cross-subject split with one participant; two loops in one folder (and a
stale lock taken over); ``evaluate.py`` on an experiment's root folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from painnet.experiments.jobdir import (
    AlreadyRunningError,
    ConfigChangedError,
    RunLock,
    UnfinishedRunError,
)
from painnet.experiments.reevaluate import run_evaluate
from painnet.experiments.runner import run_experiment
from painnet.experiments.single import run_single
from tests.conftest import FAST_TINY as FAST

CONF = str(Path(__file__).resolve().parents[1] / "painnet" / "conf")


@pytest.fixture(scope="module")
def compose_cfg(data_dir, cache_dir):
    def _compose(*overrides, config_name="train"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose(
                config_name=config_name,
                overrides=[
                    f"paths.data_dir={data_dir}",
                    f"paths.cache_dir={cache_dir}",
                    *overrides,
                ],
            )

    return _compose


@pytest.fixture(scope="module")
def trained(compose_cfg, tiny_root, tmp_path_factory) -> dict[str, Path]:
    """One finished run per decoder kind, and one finished experiment (shared, never changed)."""
    root = tmp_path_factory.mktemp("trained")
    runs = {}
    for model in ("convattn", "ridge"):
        out = root / model
        run_single(compose_cfg(*FAST, f"model={model}", f"paths.output_dir={out}"), out)
        runs[model] = out
    exp = root / "experiment"
    cfg = compose_cfg(
        *FAST,
        "experiment=within_subject",
        "model=ridge",
        "study.subjects=[01]",
        "study.folds=[0,1]",
        f"paths.output_dir={exp}",
    )
    run_experiment(cfg, exp)
    runs["experiment"] = exp
    return runs


def evaluate_cfg(run_dir: Path, **extra):
    return OmegaConf.create(
        {
            "run_dir": str(run_dir),
            "ckpt_path": None,
            "overrides": {},
            **extra,
            "eval": {"n_boot": 20, "plots": False},
        }
    )


def snapshot(folder: Path) -> dict[str, int]:
    """Every file below ``folder`` with its modification time (ns)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
    }


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --------------------------------------------------------------------------- the cases


def case_untrained_model(compose_cfg, trained, tmp_path):
    out = tmp_path / "run"
    cfg = compose_cfg(*FAST, "trainer.max_epochs=0", f"paths.output_dir={out}")
    return (lambda: run_single(cfg, out)), ValueError, r"trainer\.max_epochs=0", out


def case_single_run_config_changed(compose_cfg, trained, tmp_path):
    out = trained["ridge"]
    cfg = compose_cfg(*FAST, "model=ridge", "seed=1", f"paths.output_dir={out}")
    return (lambda: run_single(cfg, out)), ConfigChangedError, r"seed: 0 -> 1", out


def case_experiment_config_changed(compose_cfg, trained, tmp_path):
    exp = trained["experiment"]
    cfg = compose_cfg(
        *FAST,
        "experiment=within_subject",
        "model=ridge",
        "study.subjects=[01]",
        "study.folds=[0,1]",
        "trainer.max_epochs=2",
    )
    match = r"trainer\.max_epochs: 1 -> 2"
    return (lambda: run_experiment(cfg, exp)), ConfigChangedError, match, exp


def case_evaluate_deep_window_mismatch(compose_cfg, trained, tmp_path):
    cfg = evaluate_cfg(trained["convattn"], overrides={"data": {"window_s": 3.0}})
    out = tmp_path / "eval"
    return (lambda: run_evaluate(cfg, out)), ValueError, r"best\.ckpt.*data\.window_s=3", out


def case_evaluate_classical_window_mismatch(compose_cfg, trained, tmp_path):
    cfg = evaluate_cfg(trained["ridge"], overrides={"data": {"window_s": 3.0}})
    out = tmp_path / "eval"
    return (lambda: run_evaluate(cfg, out)), ValueError, r"model\.pkl.*data\.window_s=3", out


def case_evaluate_killed_run(compose_cfg, trained, tmp_path):
    # A killed attempt: a checkpoint and staged outputs, but never a DONE.json.
    run = tmp_path / "killed"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, run / "checkpoints" / "best.ckpt")
    (run / ".staging").mkdir()
    out = tmp_path / "eval"
    cfg = evaluate_cfg(run)
    return (lambda: run_evaluate(cfg, out)), UnfinishedRunError, r"DONE\.json", out


def case_evaluate_experiment_root(compose_cfg, trained, tmp_path):
    out = tmp_path / "eval"
    cfg = evaluate_cfg(trained["experiment"])
    match = r"experiment folder.*\n.*loso_sub-01_fold-0"
    return (lambda: run_evaluate(cfg, out)), UnfinishedRunError, match, out


def case_cross_subject_with_one_participant(compose_cfg, trained, tmp_path):
    out = tmp_path / "run"
    cfg = compose_cfg(*FAST, "split=cross_subject", "data.subjects=[01]", f"paths.output_dir={out}")
    return (lambda: run_single(cfg, out)), ValueError, r"split\.test_subjects", out


def case_two_loops_in_one_folder(compose_cfg, trained, tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (exp / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
    cfg = compose_cfg(*FAST, "experiment=within_subject", "model=ridge", "study.folds=[0]")

    def call():
        try:
            run_experiment(cfg, exp)
        finally:
            holder.kill()
            holder.wait()

    return call, AlreadyRunningError, rf"already running \(pid {holder.pid}", exp


CASES = [
    case_untrained_model,
    case_single_run_config_changed,
    case_experiment_config_changed,
    case_evaluate_deep_window_mismatch,
    case_evaluate_classical_window_mismatch,
    case_evaluate_killed_run,
    case_evaluate_experiment_root,
    case_cross_subject_with_one_participant,
    case_two_loops_in_one_folder,
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_a_bad_run_request_fails_clearly_and_leaves_nothing_behind(
    case, compose_cfg, trained, tmp_path
):
    call, error, match, folder = case(compose_cfg, trained, tmp_path)
    before = snapshot(folder)
    with pytest.raises(error, match=match):
        call()
    after = snapshot(folder)
    assert after == before, f"{folder} changed: {sorted(set(after) ^ set(before))}"


# --------------------------------------------------------------------------- the way out


def test_overwrite_retrains_a_run_whose_config_changed(compose_cfg, tiny_root, tmp_path):
    out = tmp_path / "run"
    run_single(compose_cfg(*FAST, "model=ridge", f"paths.output_dir={out}"), out)
    first = json.loads((out / "DONE.json").read_text())
    changed = compose_cfg(
        *FAST, "model=ridge", "seed=1", "on_config_change=overwrite", f"paths.output_dir={out}"
    )
    run_single(changed, out)
    second = json.loads((out / "DONE.json").read_text())
    assert second["config_hash"] != first["config_hash"]
    assert second["identity"]["seed"] == 1 and not (out / ".staging").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": os.uname().nodename}))
    with RunLock(folder) as lock:
        assert lock.owner()["pid"] == os.getpid()
    assert not (folder / ".lock").exists()
