"""Run an experiment: every job in-process (a loop), or one job per Hydra multirun process.

    python train.py experiment=within_subject                      # loop: all subjects × folds
    python train.py -m experiment=within_subject split.subject=01,02 split.fold='range(8)'

Both write the same job folders (``<model>/<split name>/`` with predictions.csv, metrics.json,
split.json, job.yaml and .hydra/config.yaml) and both skip a job whose metrics.json already
exists, so rerunning an interrupted loop (same ``hydra.run.dir``) or sweep (same
``hydra.sweep.dir``) only trains what is missing. The loop aggregates at the end; a sweep
aggregates in its ``on_multirun_end`` callback or with ``python -m painnet.experiments.aggregate``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from painnet.experiments.jobs import (
    DONE_MARKER,
    Job,
    is_finished,
    job_config,
    plan_jobs,
    sweep_job,
    tracking_overrides,
)

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    job: Job
    directory: Path
    metrics: dict
    ran: bool  # False: skipped because it had finished before


def configure_threads(cfg: DictConfig) -> None:
    """Apply ``torch_threads`` (torch intra-op and BLAS pools): on a busy machine one thread per
    process is often several times faster than many contending ones."""
    n = cfg.get("torch_threads")
    if not n:
        return
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(int(n))
    threadpool_limits(limits=int(n))
    os.environ.setdefault("OMP_NUM_THREADS", str(int(n)))


def dataset_sessions(cfg: DictConfig) -> dict[str, list[str]]:
    """Sessions of every participant of ``cfg.data`` (simulating/caching the dataset if needed)."""
    from hydra.utils import instantiate

    from painnet.data.splits import sessions_by_subject

    dm = instantiate(cfg.data, split=cfg.get("split") or {}, _recursive_=False)
    dm.prepare_data()
    return sessions_by_subject([f.key.session_key for f in dm._discover()])


# --------------------------------------------------------------------------- one job


def run_job(
    cfg: DictConfig, job: Job, job_dir: str | Path, experiment_dir: str | Path
) -> JobResult:
    """Run ``job`` into ``job_dir`` unless it finished before (then its metrics are read back)."""
    from painnet.experiments.single import run_single

    job_dir = Path(job_dir)
    if is_finished(job_dir):
        log.info("skip %s: finished before (%s)", job.name, job_dir / DONE_MARKER)
        return JobResult(job, job_dir, json.loads((job_dir / DONE_MARKER).read_text()), False)
    # Leftovers of an interrupted attempt would make Lightning write best-v1.ckpt beside them.
    shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)
    jcfg = job_config(cfg, job, job_dir)
    if job.arm == "finetune":
        ckpt = pretrained_checkpoint(jcfg, str(job.meta["subject"]), Path(experiment_dir))
        with open_dict(jcfg):
            jcfg.finetune.pretrained_ckpt = str(ckpt)
    tracking_overrides(jcfg, jcfg.job, str(job.meta.get("model")))
    save_job_config(jcfg, job_dir)
    metrics = run_single(jcfg, job_dir)
    return JobResult(job, job_dir, metrics, True)


def save_job_config(cfg: DictConfig, job_dir: Path) -> None:
    """job.yaml: the job's effective config; .hydra/config.yaml too when Hydra wrote none (loop)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.save(resolved, job_dir / "job.yaml")
    hydra_cfg = job_dir / ".hydra" / "config.yaml"
    if not hydra_cfg.is_file():
        hydra_cfg.parent.mkdir(exist_ok=True)
        OmegaConf.save(resolved, hydra_cfg)


def pretrained_checkpoint(cfg: DictConfig, subject: str, experiment_dir: Path) -> Path:
    """A model pretrained on every participant but ``subject``, trained once per experiment.

    Stored as ``<experiment_dir>/pretrain/<model>_sub-<subject>/pretrained.ckpt`` (moved there
    atomically when pretraining ends), so all folds of the participant -- in this process or in
    other sweep processes -- reuse it. An explicit ``finetune.pretrained_ckpt`` wins.
    """
    import lightning as L

    from painnet.experiments.finetune import pretrain
    from painnet.experiments.single import build_datamodule, model_name

    given = cfg.finetune.get("pretrained_ckpt")
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"finetune.pretrained_ckpt={given}: no such checkpoint")
        return Path(given)
    scratch_name = model_name(OmegaConf.merge(cfg, {"finetune": None}))
    target = experiment_dir / "pretrain" / f"{scratch_name}_sub-{subject}" / "pretrained.ckpt"
    if target.is_file():
        return target
    work = target.parent / f"work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    pcfg = OmegaConf.merge(cfg, {"paths": {"output_dir": str(work)}})
    with open_dict(pcfg):
        # Any fold of the target works: pretraining sees only the other participants.
        pcfg.split = {"kind": "loso", "subject": subject, "fold": 0, "n_val": 1, "seed": cfg.seed}
    L.seed_everything(int(cfg.seed), workers=True)
    best = pretrain(pcfg, build_datamodule(pcfg), work)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(best, tmp)
    os.replace(tmp, target)
    shutil.rmtree(work, ignore_errors=True)
    log.info("pretrained for sub-%s: %s", subject, target)
    return target


# --------------------------------------------------------------------------- experiments


def run_experiment(cfg: DictConfig, experiment_dir: str | Path) -> dict:
    """Every job of ``cfg.study`` in this process, then the experiment-level aggregation.

    Returns ``{"jobs": [JobResult], "ran": int, "skipped": int, "tables": {name: DataFrame}}``.
    """
    from painnet.experiments.aggregate import aggregate

    experiment_dir = Path(experiment_dir)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(cfg, dataset_sessions(cfg))
    log.info("%s: %d jobs in %s", cfg.study.kind, len(jobs), experiment_dir)
    results = []
    for i, job in enumerate(jobs, 1):
        log.info("[%d/%d] %s", i, len(jobs), job.name)
        results.append(run_job(cfg, job, job.directory(experiment_dir), experiment_dir))
    ran = sum(r.ran for r in results)
    log.info("%d jobs trained, %d skipped (finished before)", ran, len(results) - ran)
    eval_cfg = cfg.get("eval") or {}
    tables = aggregate(
        experiment_dir,
        n_boot=int(eval_cfg.get("n_boot", 10_000)),
        seed=int(cfg.seed),
        plots=bool(eval_cfg.get("plots", True)),
        logger_cfg=cfg.get("logger"),
    )
    return {"jobs": results, "ran": ran, "skipped": len(results) - ran, "tables": tables}


def run_sweep_job(cfg: DictConfig, job_dir: str | Path, experiment_dir: str | Path) -> dict:
    """One job of a Hydra multirun: the split (and arm) are the composed config's."""
    return run_job(cfg, sweep_job(cfg), job_dir, experiment_dir).metrics


def run_from_hydra(cfg: DictConfig) -> dict:
    """Dispatch of ``train.py`` when ``cfg.study`` is set: loop or one sweep job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    loop = cfg.study.get("loop", "auto")
    if loop == "auto":
        loop = hydra_cfg.mode != RunMode.MULTIRUN
    if loop:
        outcome = run_experiment(cfg, hydra_cfg.runtime.output_dir)
        within = outcome["tables"].get("within_subject")
        if within is not None and not within.empty:
            return {"r_1min": float(within["r_1min"].mean())}
        return {}
    return run_sweep_job(cfg, hydra_cfg.runtime.output_dir, hydra_cfg.sweep.dir)
