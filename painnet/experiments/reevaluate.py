"""Re-evaluate a trained model: predict its held-out sessions again and score them.

The training run's own config (``<run_dir>/.hydra/config.yaml``) rebuilds the data, split and
model, so the prediction table is identical to the one training wrote unless ``overrides``
change something (e.g. ``data.root`` to score a participant's later sessions).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from painnet.evaluation.report import evaluate_predictions, print_metrics
from painnet.experiments.predictions import table_from_batches, table_from_frame_predictions
from painnet.experiments.single import build_datamodule, build_task, is_deep, model_name


def training_config(run_dir: Path, overrides: dict | None, output_dir: Path) -> DictConfig:
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not a train.py run folder (no saved config)")
    cfg = OmegaConf.load(config_file)
    cfg = OmegaConf.merge(cfg, overrides or {}, {"paths": {"output_dir": str(output_dir)}})
    return cfg


def run_evaluate(cfg: DictConfig, output_dir: str | Path) -> dict:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    if cfg.get("run_dir"):
        run_dir = Path(cfg.run_dir)
    elif ckpt is not None:
        run_dir = ckpt.resolve().parents[1]  # <run_dir>/checkpoints/best.ckpt
    else:
        raise ValueError(
            "evaluate.py needs run_dir=<train output folder> or ckpt_path=<checkpoint>"
        )
    overrides = cfg.get("overrides") or {}
    if OmegaConf.is_config(overrides):
        overrides = OmegaConf.to_container(overrides, resolve=True)
    train_cfg = training_config(run_dir, overrides, output_dir)

    dm = build_datamodule(train_cfg)
    name = model_name(train_cfg)
    if is_deep(train_cfg.model):
        ckpt = ckpt or run_dir / "checkpoints" / "best.ckpt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{ckpt}: checkpoint not found")
        task = build_task(train_cfg, dm)
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        task.load_state_dict(state)
        trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False)
        batches = trainer.predict(task, datamodule=dm)
        table = table_from_batches(dm.runs, batches, dm.split.name, name)
    else:
        model_file = run_dir / "model.pkl"
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file}: fitted classical model not found")
        with open(model_file, "rb") as fh:
            model = pickle.load(fh)
        test_runs = [dm.runs[i] for i in dm.runs_in("test")]
        predictions = {run.key: model.predict_run(run) for run in test_runs}
        table = table_from_frame_predictions(
            test_runs, predictions, dm.window_frames, dm.split.name, name
        )

    table.to_csv(output_dir / "predictions.csv", index=False)
    metrics = evaluate_predictions(
        table,
        out_dir=output_dir,
        n_boot=int(cfg.eval.n_boot),
        seed=int(train_cfg.seed),
        plots=bool(cfg.eval.plots),
    )
    print_metrics(metrics, title=f"{name} · {dm.split.name} (re-evaluated)")
    return metrics
