"""Read what a finished training job left behind: its config, predictions, model and data.

A job folder (written by ``train.py``, or one ``<model>/<split>/`` folder of an experiment)
holds ``predictions.csv``, ``split.json``, ``DONE.json`` (written last), a resolved config
(``job.yaml``, else ``.hydra/config.yaml``) and the fitted model: ``model.pkl`` (classical) or
``checkpoints/best.ckpt`` (deep). Everything about *loading the model* sits in
:func:`load_decoder`, so a later job-folder format only needs that one function changed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

LABEL_DTYPES = {"subject": str, "session": str, "run": str, "fold": str, "model": str}
# Completion markers, newest first: DONE.json (job folders since wave 2), metrics.json (before).
DONE_MARKERS = ("DONE.json", "metrics.json")
SKIP_DIRS = {"aggregate", "importance", ".evaluation", "pretrain"}


@dataclass
class LoadedModel:
    """A loaded model. ``model``: an estimator with ``predict_run`` (classical) or a torch
    ``nn.Module`` mapping windows ``[B, P, L]`` to ``[B]`` (deep, in eval mode)."""

    model: object
    deep: bool


def find_job_dirs(run_dir: str | Path) -> list[Path]:
    """The finished job folders at or below ``run_dir`` (a job folder itself or an experiment).

    Raises FileNotFoundError if ``run_dir`` does not exist or holds no finished job.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such folder")
    if (run_dir / "predictions.csv").is_file():
        candidates = [run_dir]
    else:
        candidates = sorted(
            p.parent
            for p in run_dir.rglob("predictions.csv")
            if not SKIP_DIRS & set(p.parent.relative_to(run_dir).parts)
        )
    finished = [d for d in candidates if is_finished(d)]
    unfinished = sorted(set(candidates) - set(finished))
    if unfinished:
        log.warning("%d unfinished job folder(s) left out: %s", len(unfinished), unfinished[:5])
    if not finished:
        raise FileNotFoundError(
            f"{run_dir}: no finished job folder (predictions.csv + {DONE_MARKERS[0]}) at or "
            "below it"
        )
    return [d for d in finished if job_role(d) == "result"]


def is_finished(job_dir: Path) -> bool:
    """A job is finished once its completion marker exists (written last)."""
    return any((job_dir / name).is_file() for name in DONE_MARKERS)


def job_role(job_dir: Path) -> str:
    """``result`` for a scored job; other roles (e.g. pretraining) are left out."""
    path = job_dir / DONE_MARKERS[0]
    if not path.is_file():
        return "result"
    try:
        return str(json.loads(path.read_text()).get("role", "result"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def job_config(job_dir: Path) -> DictConfig:
    """The job's config (``job.yaml``, else ``.hydra/config.yaml``), outputs pointed at the job."""
    for name in ("job.yaml", ".hydra/config.yaml"):
        path = job_dir / name
        if path.is_file():
            cfg = OmegaConf.load(path)
            # a train.py config refers to ${hydra:...}, which does not resolve outside Hydra
            return OmegaConf.merge(cfg, {"paths": {"output_dir": str(job_dir)}})
    raise FileNotFoundError(f"{job_dir}: no job.yaml or .hydra/config.yaml (the job's config)")


def job_predictions(job_dir: Path) -> pd.DataFrame:
    """The job's frame-level prediction table (labels read as strings)."""
    path = job_dir / "predictions.csv"
    table = pd.read_csv(path, dtype=LABEL_DTYPES)
    missing = {"subject", "session", "run", "frame", "rating", "prediction"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    return table


def model_label(table: pd.DataFrame, job_dir: Path) -> str:
    """The single model name of a job's prediction table."""
    if "model" not in table.columns:
        return job_dir.parent.name
    names = sorted(table["model"].dropna().astype(str).unique())
    if len(names) != 1:
        raise ValueError(f"{job_dir}/predictions.csv: expected one model, found {names}")
    return names[0]


def build_job_datamodule(cfg: DictConfig):
    """The job's data (its split, its held-out runs) rebuilt from its config."""
    from painnet.experiments.single import build_datamodule

    return build_datamodule(cfg)


def load_decoder(job_dir: Path, cfg: DictConfig, dm) -> LoadedModel:
    """The job's fitted model, through :func:`painnet.experiments.decoder.load_decoder`.

    The one place that knows how a job folder stores its model: it defers to the decoder
    protocol, so the job-folder format is defined once, in ``painnet.experiments.decoder``.
    """
    from painnet.experiments.decoder import load_decoder as load_job_decoder

    model = load_job_decoder(job_dir, cfg, dm=dm).model
    if isinstance(model, list | tuple):
        raise ValueError(
            f"{job_dir}: an ensemble of {len(model)} models; importance supports one model per job"
        )
    return LoadedModel(model=_eval_mode(model), deep=_is_torch(model))


def eval_protocol(cfg: DictConfig):
    """The job's evaluation protocol (``eval.protocol``), or None for the defaults."""
    node = (cfg.get("eval") or {}).get("protocol")
    if node is None:
        return None
    from painnet.evaluation.protocol import as_protocol

    return as_protocol(
        OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    )


def _is_torch(model) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(model, torch.nn.Module)


def _eval_mode(model):
    if _is_torch(model):
        model.eval()
    return model
