"""train.py and evaluate.py end to end, composed from the real configs, on the tiny dataset."""

import json

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from painnet.experiments.reevaluate import run_evaluate
from painnet.experiments.single import run_single

FLAT_KEYS = [f"{m}_{b}" for b in ("1min", "2min", "run", "session") for m in ("r", "auc")]


def test_fast_dev_run_wires_everything(make_cfg, tiny_root, tmp_path):
    cfg = make_cfg(
        "data=tiny",
        "trainer=debug",
        "logger=none",
        "callbacks=none",
        "eval.n_boot=100",
        "eval.plots=false",
    )
    metrics = run_single(cfg, tmp_path / "out")
    assert set(FLAT_KEYS) <= set(metrics)
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert list(table.columns[:8]) == [
        "subject",
        "session",
        "run",
        "frame",
        "time_s",
        "rating",
        "prediction",
        "split",
    ]
    assert set(table.session.astype(str).str.zfill(2)) == {"01"}  # fold 0 holds out session 01


@pytest.mark.parametrize("model", ["convattn", "ridge"])
def test_a_short_real_run_writes_every_output(make_cfg, tiny_root, tmp_path, model):
    out = tmp_path / "out"
    cfg = make_cfg(
        "data=tiny",
        f"model={model}",
        "logger=csv",
        "trainer.max_epochs=2",
        "eval.n_boot=200",
        output_dir=out,
    )
    metrics = run_single(cfg, out)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["r_1min"] == pytest.approx(metrics["r_1min"], nan_ok=True)
    for name in (
        "predictions.csv",
        "metrics.csv",
        "split.json",
        "scatter_1min.png",
        "roc_1min.png",
    ):
        assert (out / name).is_file(), name
    assert list(out.glob("timecourse_sub-01_ses-01.png"))
    if model == "convattn":
        assert (out / "checkpoints" / "best.ckpt").is_file()
        logged = pd.read_csv(out / "csv" / "metrics.csv")
        # val/r_1min: what the checkpoint and early stopping select on (callbacks/default.yaml)
        logged_names = {"train/loss_epoch", "val/loss", "val/r", "val/r_1min", "test/r_1min"}
        assert logged_names <= set(logged.columns)
    else:
        assert (out / "model.pkl").is_file()


def test_evaluate_reproduces_the_training_run(make_cfg, tiny_root, tmp_path):
    out = tmp_path / "train"
    cfg = make_cfg(
        "data=tiny",
        "logger=none",
        "trainer.max_epochs=1",
        "eval.n_boot=100",
        "eval.plots=false",
        output_dir=out,
    )
    (out / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    trained = run_single(cfg, out)

    eval_cfg = OmegaConf.create(
        {
            "run_dir": str(out),
            "ckpt_path": None,
            "overrides": {},
            "eval": {"n_boot": 100, "plots": False},
        }
    )
    again = run_evaluate(eval_cfg, tmp_path / "eval")
    first = pd.read_csv(out / "predictions.csv")
    second = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    np.testing.assert_allclose(first.prediction, second.prediction, rtol=1e-5)
    assert again["r_1min"] == pytest.approx(trained["r_1min"], nan_ok=True)


def test_wandb_offline_run_holds_metrics_and_config(make_cfg, tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "out"
    cfg = make_cfg(
        "data=tiny",
        "logger=wandb",
        "trainer.max_epochs=1",
        "eval.n_boot=100",
        "eval.plots=false",
        output_dir=out,
    )
    run_single(cfg, out)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The run's record stream (what `wandb sync` uploads) is uncompressed protobuf: the logged
    # metric names and config keys appear in it verbatim.
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    for name in (
        b"test/r_1min",
        b"test/auc_1min",
        b"val/r_1min",
        b"train/loss",
        b"window_s",
        b"ConvAttnDecoder",
    ):
        assert name in records, name
    assert list((runs[0] / "files" / "media" / "table").rglob("*.table.json"))
