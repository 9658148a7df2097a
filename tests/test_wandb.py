"""W&B holds the study: an offline within-subject run, read back from its own run log."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from painnet.experiments.tracking import artifact_name, read_offline_run


def offline_runs(root):
    return {run.run["job_type"]: run for run in map(read_offline_run, root.rglob("offline-run-*"))}


@pytest.mark.slow
def test_offline_runs_hold_config_metrics_tables_plots_predictions_and_aggregate(
    tmp_path, data_dir, cache_dir, tiny_root
):
    out = tmp_path / "within"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env["WANDB_DIR"] = str(tmp_path)  # wandb's own scratch files stay in the test folder
    done = subprocess.run(
        [
            sys.executable, "-m", "painnet.train",
            "experiment=within_subject", "data=tiny", "model=convattn", "study.subjects=['01']",
            "study.folds=[0]", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
            "logger=wandb", "eval.n_boot=100", f"paths.data_dir={data_dir}",
            f"paths.cache_dir={cache_dir}", f"hydra.run.dir={out}",
        ],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    runs = offline_runs(out)
    assert set(runs) == {"convattn", "aggregate"}, {k: r.directory for k, r in runs.items()}

    job = runs["convattn"]
    assert job.run["project"] == "painnet"
    assert "within_subject" in job.run["group"] and "01" in job.run["group"]
    assert job.config["model"]["net"]["_target_"].endswith("ConvAttnDecoder")
    assert job.config["data"]["simulate"]["preset"] == "tiny"
    assert job.config["painnet/model"] == "convattn"
    keys = job.logged_keys()
    for stage in ("train/", "val/", "test/"):
        assert any(k.startswith(stage) for k in keys), (stage, sorted(keys))
    assert -1.0 <= job.summary["test/r_1min"] <= 1.0
    # The binned predictions as a wandb.Table, with the frames' bins and the ratings.
    (table_file,) = job.media("test/binned_1min")
    table = json.loads(table_file.read_text())  # wandb's table JSON: columns + data
    assert {"rating", "prediction"} <= set(table["columns"]) and table["data"]
    plots = [k for k in keys if k.startswith("plots/")]
    assert plots and all(p.is_file() for k in plots for p in job.media(k))
    (artifact,) = [a for a in job.artifacts if a["type"] == "predictions"]
    assert artifact["files"] == ["predictions.csv"]
    assert artifact["name"] == artifact_name("predictions", job.run["name"])

    aggregate = runs["aggregate"]
    assert "aggregate/within_subject" in aggregate.logged_keys()
    (summary_table,) = aggregate.media("aggregate/within_subject")
    assert summary_table.is_file()


def test_artifact_names_are_valid_for_wandb():
    assert artifact_name("predictions", "convattn/sub-01_fold-0 (a)") == (
        "predictions-convattn-sub-01_fold-0-a"
    )


def test_a_folder_without_a_run_log_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run-\\*.wandb"):
        read_offline_run(tmp_path)
    (tmp_path / "run-x.wandb").write_bytes(b"not a log")
    with pytest.raises(ValueError, match="not a W&B run log"):
        read_offline_run(tmp_path)
