"""Re-evaluate a trained model: predict its held-out sessions again and score them.

    painnet-evaluate run_dir=<finished run or job folder>
    painnet-evaluate ckpt_path=<run>/checkpoints/best.ckpt data=demo split=loso split.fold=3

The run's resolved config (``job.yaml``) rebuilds the data, split and model, so the prediction
table equals the one training wrote unless something is changed: a ``data=`` / ``split=`` group
given on the command line replaces the run's (with its ``data.*`` / ``split.*`` overrides),
``overrides`` changes single values (e.g. ``+overrides.data.root=/new/data``), and ``trainer=``
selects where prediction runs (default: the run's own trainer). Only finished runs (with
``DONE.json``) are scored: a killed attempt's leftovers never are. The model's input size
(parcels, window frames) is checked against the data before anything is predicted.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from painnet.evaluation.report import evaluate_predictions, print_metrics
from painnet.experiments.decoder import load_decoder
from painnet.experiments.jobdir import (
    DONE,
    RunLock,
    UnfinishedRunError,
    fresh_staging,
    is_finished,
    publish,
)
from painnet.experiments.jobs import read_job_config
from painnet.experiments.single import _plain, build_datamodule, with_output_dir


def finished_jobs_below(directory: Path, limit: int = 20) -> list[Path]:
    return sorted(p.parent for p in directory.rglob(DONE) if p.parent != directory)[:limit]


def check_run_dir(run_dir: Path) -> None:
    """``run_dir`` must hold a finished run; an experiment folder lists its job folders."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir={run_dir}: no such folder")
    if is_finished(run_dir):
        return
    jobs = finished_jobs_below(run_dir)
    if jobs:
        listed = "\n  ".join(str(j) for j in jobs)
        raise UnfinishedRunError(
            f"run_dir={run_dir} is an experiment folder: its results are in its job folders; "
            f"evaluate one of them (run_dir=<job folder>), e.g.:\n  {listed}"
        )
    raise UnfinishedRunError(
        f"run_dir={run_dir}: no finished run ({DONE} missing); a killed or failed run's "
        "outputs are never scored: train it again"
    )


def training_config(cfg: DictConfig, run_dir: Path, output_dir: Path) -> DictConfig:
    """The run's resolved config with the command line's data/split/trainer and overrides."""
    train_cfg = read_job_config(run_dir)
    replaced = {}
    for group in ("data", "split", "trainer"):
        if cfg.get(group):
            # Unresolved: ${seed}, ${paths.*} resolve against the training run's values.
            replaced[group] = OmegaConf.to_container(cfg[group], resolve=False)
    overrides = cfg.get("overrides") or {}
    if OmegaConf.is_config(overrides):
        overrides = OmegaConf.to_container(overrides, resolve=True)
    with open_dict(train_cfg):
        for group, node in replaced.items():
            train_cfg[group] = node
    merged = OmegaConf.merge(train_cfg, overrides)
    return with_output_dir(merged, output_dir)


def run_evaluate(cfg: DictConfig, output_dir: str | Path) -> dict:
    output_dir = Path(output_dir)
    ckpt = Path(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    if cfg.get("run_dir"):
        run_dir = Path(cfg.run_dir)
    elif ckpt is not None:
        if not ckpt.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt}: no such checkpoint")
        # <run_dir>/checkpoints/best.ckpt, or <run_dir>/model.pkl
        parent = ckpt.resolve().parent
        run_dir = parent.parent if parent.name == "checkpoints" else parent
    else:
        raise ValueError("evaluate.py needs run_dir=<train output folder> or ckpt_path=<file>")
    check_run_dir(run_dir)
    train_cfg = training_config(cfg, run_dir, output_dir)
    dm = build_datamodule(train_cfg)
    decoder = load_decoder(run_dir, cfg=train_cfg, dm=dm, ckpt=ckpt)
    with RunLock(output_dir):
        staging = fresh_staging(output_dir)
        table = decoder.predict(dm)
        table.to_csv(staging / "predictions.csv", index=False)
        metrics = evaluate_predictions(
            table,
            out_dir=staging,
            n_boot=int(cfg.eval.n_boot),
            seed=int(train_cfg.seed),
            plots=bool(cfg.eval.plots),
            protocol=_plain((train_cfg.get("eval") or {}).get("protocol")),
        )
        publish(staging, output_dir)
    print_metrics(metrics, title=f"{decoder.name} · {dm.split.name} (re-evaluated)")
    return metrics
