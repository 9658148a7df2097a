"""One model, one split: train → predict the held-out runs → evaluate → publish atomically.

This is what ``train.py`` runs without an experiment, and what every job of an experiment runs.
The decoder (deep or classical, see :mod:`painnet.experiments.decoder`) ends in the frame-level
prediction table, scored by :func:`painnet.evaluation.report.evaluate_predictions`. Outputs are
staged and published with a completion marker written last (:mod:`painnet.experiments.jobdir`):

``DONE.json`` (marker: config hash, metrics, hyperparameters), ``job.yaml`` (the resolved
config), ``predictions.csv``, ``qc.tsv`` (per run: frames, kept frames, frames censored for
non-finite voxels), ``split.json``, ``metrics.json``, ``metrics.csv``,
``binned_*.csv``, plots, ``checkpoints/best.ckpt`` (deep) or ``model.pkl`` (classical) or
``members/<i>/`` (ensemble), and the loggers' folders.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from painnet.data.datamodule import PainDataModule
from painnet.data.splits import splitter
from painnet.distributed import is_main_process, rank_label
from painnet.evaluation.report import evaluate_predictions, print_metrics
from painnet.experiments.decoder import make_decoder
from painnet.experiments.identity import digest, identity_config, job_variant_id, variant_name
from painnet.experiments.jobdir import (
    RANK_SCRATCH,
    RESOLVED_CONFIG,
    RunLock,
    fresh_staging,
    publish,
    read_done,
    reuse_or_clear,
    save_config,
    write_done,
)
from painnet.experiments.tracking import finish_loggers, log_results

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig, split=None) -> PainDataModule:
    dm = instantiate(cfg.data, split=split if split is not None else cfg.split, _recursive_=False)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def with_output_dir(cfg: DictConfig, output_dir: Path) -> DictConfig:
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(out):
        out.paths.output_dir = str(output_dir)
    return out


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def run_single(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Train and evaluate one model on one split into ``output_dir``; returns the metrics.

    A folder that already holds a finished run with the same config is reused (its metrics are
    returned); one with a different config is an error unless ``on_config_change=overwrite``.

    Under DDP (``trainer=ddp``) only rank 0 owns the folder (lock, staging, evaluation,
    publishing); the other ranks take part in training and prediction from a scratch folder
    and return ``{}`` (:func:`_run_peer_rank`).
    """
    output_dir = Path(output_dir)
    name = variant_name(cfg)
    make_decoder(cfg, name).validate()  # before anything is written
    identity = identity_config(cfg)
    config_hash = digest(identity)
    if not is_main_process():
        return _run_peer_rank(cfg, output_dir, name, config_hash)
    created = not output_dir.exists()
    try:
        with RunLock(output_dir):
            done = reuse_or_clear(
                output_dir, identity, config_hash, str(cfg.get("on_config_change") or "error")
            )
            if done is not None:
                log.info("%s: finished before with this config; reused", output_dir)
                return done["metrics"]
            return _run(cfg, output_dir, name, identity, config_hash)
    finally:
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()  # a run that failed before writing anything leaves nothing


def _run_peer_rank(cfg: DictConfig, output_dir: Path, name: str, config_hash: str) -> dict:
    """Rank k > 0 of a DDP run: the same fit and predict as rank 0 (every collective call
    matched), in ``<output_dir>/.rank<k>/`` with no loggers; writes nothing else, returns {}.

    Lightning starts these processes by re-running the command line with rank 0's
    ``hydra.run.dir``, so they must neither take rank 0's lock nor touch its outputs.
    """
    import lightning as L

    done = read_done(output_dir)
    if done is not None and done.get("config_hash") == config_hash:
        return {}  # rank 0 reuses the finished run too (processes started outside Lightning)
    scratch = output_dir / f"{RANK_SCRATCH}{rank_label()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        stage_cfg = with_output_dir(cfg, scratch)
        L.seed_everything(int(cfg.seed), workers=True)
        dm = build_datamodule(stage_cfg)
        decoder = make_decoder(stage_cfg, name).fit(dm, scratch, ())
        decoder.predict(dm)  # the gather is collective: every rank predicts
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {}


def _run(cfg: DictConfig, output_dir: Path, name: str, identity: dict, config_hash: str) -> dict:
    import lightning as L

    staging = fresh_staging(output_dir)
    try:
        stage_cfg = with_output_dir(cfg, staging)
        L.seed_everything(int(cfg.seed), workers=True)
        dm = build_datamodule(stage_cfg)
        split = dm.split
        log.info(
            "split %s: train %s | val %s | test %s", split.name, split.train, split.val, split.test
        )
        loggers = [instantiate(c) for c in (stage_cfg.get("logger") or {}).values() if c]
        decoder = make_decoder(stage_cfg, name).fit(dm, staging, loggers)
        decoder.save(staging)
        table = decoder.predict(dm)
        table.to_csv(staging / "predictions.csv", index=False)
        dm.write_qc_table(staging / "qc.tsv")  # per run: frames kept / censored for NaN voxels
        split_record = {"name": split.name, "train": split.train, "val": split.val}
        split_record.update(test=split.test, kind=splitter(cfg.split).kind)
        (staging / "split.json").write_text(json.dumps(split_record))
        eval_cfg = cfg.get("eval") or {}
        metrics = evaluate_predictions(
            table,
            out_dir=staging,
            n_boot=int(eval_cfg.get("n_boot", 10_000)),
            seed=int(cfg.seed),
            plots=bool(eval_cfg.get("plots", True)),
            protocol=_plain(eval_cfg.get("protocol")),
        )
        config = resolved(with_output_dir(cfg, output_dir))
        log_results(loggers, metrics, staging, config)
        finish_loggers(loggers)
        save_config(config, staging / RESOLVED_CONFIG)
        hyperparameters = decoder.hyperparameters()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, output_dir)
    write_done(
        output_dir,
        {
            "config_hash": config_hash,
            "model": name,
            "model_id": job_variant_id(cfg),  # as planned, before injected values
            "split": split.name,
            "split_kind": split_record["kind"],
            "role": str((cfg.get("job") or {}).get("role", "result")),
            "hyperparameters": hyperparameters,
            "metrics": metrics,
            "identity": identity,
        },
    )
    print_metrics(metrics, title=f"{name} · {split.name}")
    return metrics
