"""Send a run's results to its loggers (W&B, CSV), and read an offline W&B run back.

What one training run holds in W&B (``logger=wandb``, offline by default):

- the resolved config (``run.config``), plus ``painnet/experiment``, ``painnet/subject``,
  ``painnet/model`` keys to filter on;
- ``train/*`` and ``val/*`` metrics, logged by Lightning while training; ``test/*``, the
  held-out metrics of :func:`painnet.evaluation.report.evaluate_predictions`;
- ``test/metrics`` and ``test/binned_<size>`` as ``wandb.Table`` (the metrics table and the
  binned predictions per bin size);
- ``plots/<name>`` images (time courses, scatter, ROC);
- the frame-level ``predictions.csv`` as an artifact of type ``predictions``.

Runs are grouped by experiment and participant (W&B ``group``) with the model as ``job_type``
(:func:`painnet.experiments.jobs.tracking_overrides`); the experiment's aggregate is its own run
of job type ``aggregate`` (:func:`painnet.experiments.aggregate.log_to_wandb`).

Offline runs are written to ``<output_dir>/wandb/offline-run-*``; upload them later, from a
machine with internet, with ``wandb sync <output_dir>/wandb/offline-run-*`` (or
``wandb sync --sync-all`` inside that ``wandb`` folder). :func:`read_offline_run` reads such a
folder without a server (used by the tests, handy to check what a run will upload).
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from lightning.pytorch.loggers import Logger, WandbLogger

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.csv"


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
    """Log the held-out metrics to every logger; to W&B also tables, plots, predictions."""
    values = finite_metrics(metrics)
    output_dir = Path(output_dir)
    for logger in loggers:
        if config is not None:
            logger.log_hyperparams(dict(config))
        logger.log_metrics(values)
        if isinstance(logger, WandbLogger):
            _log_wandb_extras(logger, output_dir, config or {})


def _log_wandb_extras(logger: WandbLogger, output_dir: Path, config: Mapping) -> None:
    import wandb

    run = logger.experiment
    job = config.get("job") or {}
    split = config.get("split") or {}
    run.config.update(
        {
            "painnet/experiment": job.get("experiment", config.get("task_name")),
            "painnet/subject": job.get("subject", split.get("subject")),
            "painnet/model": job.get("model", (config.get("model") or {}).get("name")),
        },
        allow_val_change=True,
    )
    payload = {}
    table = output_dir / "metrics.csv"
    if table.is_file():
        payload["test/metrics"] = wandb.Table(dataframe=pd.read_csv(table))
    for binned in sorted(output_dir.glob("binned_*.csv")):
        frame = pd.read_csv(binned, dtype={"subject": str, "session": str, "run": str})
        payload[f"test/{binned.stem}"] = wandb.Table(dataframe=frame)
    for png in sorted(output_dir.glob("*.png")):
        payload[f"plots/{png.stem}"] = wandb.Image(str(png))
    if payload:
        run.log(payload)
    predictions = output_dir / PREDICTIONS
    if predictions.is_file():
        artifact = wandb.Artifact(
            artifact_name("predictions", run.name or run.id), type="predictions"
        )
        artifact.add_file(str(predictions), name=PREDICTIONS)
        run.log_artifact(artifact)


def artifact_name(prefix: str, name: str) -> str:
    """A W&B artifact name (letters, digits, ``-_.``) from a run name like ``ridge/sub-01``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{prefix}-{name}").strip("-")[:128]


def finish_loggers(loggers: Sequence[Logger]) -> None:
    for logger in loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


# --------------------------------------------------------------------------- reading back

_HEADER = b":W&B"
_HEADER_LEN = 7  # ":W&B", 2-byte magic, 1-byte version
_BLOCK = 32768  # LevelDB log blocks
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What an offline W&B run folder holds, decoded from its ``run-<id>.wandb`` log."""

    directory: Path
    run: dict = field(default_factory=dict)  # id, project, group, job_type, name, tags
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one dict per logged step
    summary: dict = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)  # name, type, files

    def logged_keys(self) -> set[str]:
        """Every top-level key logged in the history."""
        return {key for row in self.history for key in row}

    def media(self, key: str) -> list[Path]:
        """Files (images, tables) logged under ``key``, resolved in the run's files folder."""
        out = []
        for row in self.history:
            value = row.get(key)
            if isinstance(value, Mapping) and "path" in value:
                out.append(self.directory / "files" / value["path"])
        return out


def _records(path: Path) -> Iterator[bytes]:
    """Raw records of a W&B transaction log (a LevelDB-format log after a 7-byte header)."""
    data = path.read_bytes()
    if data[:4] != _HEADER:
        raise ValueError(f"{path}: not a W&B run log (header {data[:4]!r})")
    pos, pending = _HEADER_LEN, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk, pos = data[pos : pos + length], pos + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
        elif kind == 0 and length == 0:
            continue
        else:
            raise ValueError(f"{path}: corrupt record of type {kind} at byte {pos}")


def _set(target: dict, item) -> None:
    keys = list(item.nested_key) or [item.key]
    node = target
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = json.loads(item.value_json)


def read_offline_run(directory: str | Path) -> OfflineRun:
    """Decode ``<directory>/run-*.wandb`` (an ``offline-run-*`` folder) with W&B's protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    directory = Path(directory)
    logs = sorted(directory.glob("run-*.wandb"))
    if len(logs) != 1:
        raise FileNotFoundError(f"{directory}: expected one run-*.wandb file, found {logs}")
    out = OfflineRun(directory)
    for raw in _records(logs[0]):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out.run = {
                "id": r.run_id,
                "project": r.project,
                "group": r.run_group,
                "job_type": r.job_type,
                "name": r.display_name,
                "tags": list(r.tags),
            }
            for item in r.config.update:
                out.config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out.config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                _set(row, item)
            out.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set(out.summary, item)
        elif kind == "artifact":
            a = record.artifact
            files = [entry.path for entry in a.manifest.contents]
            out.artifacts.append({"name": a.name, "type": a.type, "files": files})
    return out
