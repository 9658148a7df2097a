"""One model, one split: train → predict the held-out runs → evaluate → write outputs.

This is what ``train.py`` runs. Deep models (a LightningModule config) train with Lightning;
classical models (an estimator with ``fit(runs)`` / ``predict_run(run)``) fit on the training
and validation sessions (they run their own inner CV). Both end in the same prediction table and
are scored by :func:`painnet.evaluation.report.evaluate_predictions`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import lightning as L
import pandas as pd
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from painnet.data.datamodule import PainDataModule
from painnet.evaluation.report import evaluate_predictions, print_metrics
from painnet.experiments.predictions import table_from_batches, table_from_frame_predictions
from painnet.experiments.tracking import finish_loggers, log_results

log = logging.getLogger(__name__)

DONE_MARKER = "metrics.json"


def is_deep(model_cfg: DictConfig) -> bool:
    return issubclass(get_class(model_cfg._target_), L.LightningModule)


SHORT_NAMES = {"ConvAttnDecoder": "convattn", "EdgePCR": "edge_pcr", "WindowRidge": "ridge"}


def model_name(cfg: DictConfig) -> str:
    """Name of the model in tables and plots: ``model_name`` if set, else the config's short name."""
    if cfg.get("model_name"):
        return str(cfg.model_name)
    target = cfg.model.net._target_ if "net" in cfg.model else cfg.model._target_
    name = SHORT_NAMES.get(target.rsplit(".", 1)[-1], target.rsplit(".", 1)[-1])
    if cfg.get("finetune"):
        name += f"_ft-{cfg.finetune.get('mode', 'all')}"
    return name


def build_datamodule(cfg: DictConfig, split: DictConfig | dict | None = None) -> PainDataModule:
    dm = instantiate(cfg.data, split=split if split is not None else cfg.split, _recursive_=False)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def build_task(cfg: DictConfig, dm: PainDataModule):
    return instantiate(cfg.model, n_parcels=dm.n_parcels, n_frames=dm.window_frames)


def build_trainer(cfg: DictConfig, output_dir: Path, with_loggers: bool = True) -> L.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not cfg.trainer.get("enable_progress_bar", True):
        # Lightning refuses a progress-bar callback when the bar is switched off.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = (
        [instantiate(c) for c in (cfg.get("logger") or {}).values() if c] if with_loggers else []
    )
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(output_dir),
    )


def run_single(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Train and evaluate one model on one split; returns the flat metrics."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True)
    dm = build_datamodule(cfg)
    split = dm.split
    name = model_name(cfg)
    log.info(
        "split %s: train %s | val %s | test %s", split.name, split.train, split.val, split.test
    )

    if is_deep(cfg.model):
        table, trainer = _train_deep(cfg, dm, output_dir, name)
        loggers = trainer.loggers
    else:
        table = _fit_classical(cfg, dm, output_dir, name)
        loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]

    table.to_csv(output_dir / "predictions.csv", index=False)
    (output_dir / "split.json").write_text(
        json.dumps({"name": split.name, "train": split.train, "val": split.val, "test": split.test})
    )
    eval_cfg = cfg.get("eval") or {}
    # Evaluate into a staging folder and publish metrics.json last: its presence marks a
    # finished job (experiment runners skip those on a rerun), so it must not exist early.
    staging = output_dir / ".evaluation"
    shutil.rmtree(staging, ignore_errors=True)
    metrics = evaluate_predictions(
        table,
        out_dir=staging,
        n_boot=int(eval_cfg.get("n_boot", 10_000)),
        seed=int(cfg.seed),
        plots=bool(eval_cfg.get("plots", True)),
    )
    _publish(staging, output_dir, last=DONE_MARKER)
    log_results(loggers, metrics, output_dir, OmegaConf.to_container(cfg, resolve=True))
    finish_loggers(loggers)
    os.replace(staging / DONE_MARKER, output_dir / DONE_MARKER)
    staging.rmdir()
    print_metrics(metrics, title=f"{name} · {split.name}")
    return metrics


def _publish(staging: Path, output_dir: Path, last: str) -> None:
    """Move every file of ``staging`` into ``output_dir`` except ``last``."""
    for path in staging.iterdir():
        if path.name != last:
            os.replace(path, output_dir / path.name)


def _train_deep(cfg: DictConfig, dm: PainDataModule, output_dir: Path, name: str):
    task = build_task(cfg, dm)
    if cfg.get("finetune"):
        from painnet.experiments.finetune import prepare_finetuning

        prepare_finetuning(cfg, task, dm, output_dir)
    trainer = build_trainer(cfg, output_dir)
    trainer.fit(task, datamodule=dm)
    ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    batches = trainer.predict(task, datamodule=dm, ckpt_path=ckpt or None)
    if ckpt:
        log.info(
            "best checkpoint: %s (val/r = %s)", ckpt, trainer.checkpoint_callback.best_model_score
        )
    table = table_from_batches(dm.runs, batches, dm.split.name, name)
    return table, trainer


def _fit_classical(
    cfg: DictConfig, dm: PainDataModule, output_dir: Path, name: str
) -> pd.DataFrame:
    model = instantiate(cfg.model)
    fit_runs = [dm.runs[i] for i in dm.runs_in("train") + dm.runs_in("val")]
    model.fit(fit_runs)
    test_runs = [dm.runs[i] for i in dm.runs_in("test")]
    predictions = {run.key: model.predict_run(run) for run in test_runs}
    with open(output_dir / "model.pkl", "wb") as fh:
        pickle.dump(model, fh)
    return table_from_frame_predictions(
        test_runs, predictions, dm.window_frames, dm.split.name, name
    )
