"""Send evaluation results to the run's loggers (W&B, CSV): metrics, tables and plots."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from lightning.pytorch.loggers import Logger, WandbLogger

log = logging.getLogger(__name__)


def finite_metrics(metrics: Mapping, prefix: str = "test/") -> dict[str, float]:
    """Numeric metrics under ``stage/metric`` names, without NaN/None (loggers reject them)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and value is not None and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def log_results(
    loggers: Sequence[Logger], metrics: Mapping, output_dir: Path, config: Mapping | None = None
) -> None:
    """Log the held-out metrics to every logger; to W&B also the table, plots and config."""
    values = finite_metrics(metrics)
    for logger in loggers:
        if config is not None:
            logger.log_hyperparams(dict(config))
        logger.log_metrics(values)
        if isinstance(logger, WandbLogger):
            _log_wandb_extras(logger, output_dir)


def _log_wandb_extras(logger: WandbLogger, output_dir: Path) -> None:
    table = output_dir / "metrics.csv"
    if table.is_file():
        logger.log_table("test/metrics", dataframe=pd.read_csv(table))
    for png in sorted(output_dir.glob("*.png")):
        logger.log_image(f"plots/{png.stem}", images=[str(png)])


def finish_loggers(loggers: Sequence[Logger]) -> None:
    for logger in loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
