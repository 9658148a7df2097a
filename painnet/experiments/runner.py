"""Run an experiment: every job in-process (a loop), or one job per Hydra multirun process.

    python train.py experiment=within_subject                      # loop: all subjects × folds
    python train.py -m experiment=within_subject split.subject=01,02 'split.fold=range(8)'

Both write the same job folders, ``<experiment dir>/<variant id>/<split name>/`` (see
:mod:`painnet.experiments.jobs`), and both reuse a job whose ``DONE.json`` records the same
config hash: rerunning an interrupted loop (same ``hydra.run.dir``) or sweep (same
``hydra.sweep.dir``, jobs in any order) trains only what is missing. A finished job whose config
changed is an error listing the changed keys (``on_config_change=overwrite`` retrains it). A
loop locks its experiment folder (a second loop there fails with "already running (pid …)").
The loop aggregates at the end and then calls the ``study.after`` steps; a sweep does both in
its ``on_multirun_end`` callback (or ``python -m painnet.experiments.aggregate DIR``).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from painnet.experiments.identity import HASH_LENGTH
from painnet.experiments.jobdir import RunLock, read_done
from painnet.experiments.jobs import Job, resolved_job_config, tracking_overrides

log = logging.getLogger(__name__)

# How long a sweep process waits for another process that runs a job it depends on.
DEPENDENCY_WAIT_S = 24 * 3600.0


@dataclass
class JobResult:
    job: Job
    directory: Path
    metrics: dict
    ran: bool  # False: reused, it had finished before with the same config


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
    from painnet.data.splits import sessions_by_subject

    dm = instantiate(cfg.data, split=cfg.get("split") or {}, _recursive_=False)
    dm.prepare_data()
    return sessions_by_subject([f.key.session_key for f in dm._discover()])


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def make_study(cfg: DictConfig):
    if not cfg.get("study") or "_target_" not in cfg.study:
        raise ValueError("study: an experiment needs a study config with _target_ (conf/study/)")
    if "_convert_" in cfg.study:  # the study config chose how its arguments arrive
        return instantiate(cfg.study)
    return instantiate(cfg.study, _convert_="all")


# --------------------------------------------------------------------------- one job


def run_job(job: Job, experiment_dir: Path, wait_s: float = 0.0) -> JobResult:
    """Run ``job`` (its dependencies first) unless it finished before with the same config."""
    from painnet.experiments.single import run_single

    for dep in job.depends_on:
        run_job(dep.job, experiment_dir, wait_s=DEPENDENCY_WAIT_S if wait_s else 0.0)
    directory = job.directory(experiment_dir)
    jcfg = resolved_job_config(job, experiment_dir)
    before = read_done(directory)
    if wait_s and before is None:
        # Another sweep process may be running this job (a shared dependency): wait for it.
        RunLock(directory).acquire(wait_s=wait_s).release()
        before = read_done(directory)
    tracking_overrides(jcfg, {**jcfg.job, "name": job.name}, job.model)
    metrics = run_single(jcfg, directory)
    after = read_done(directory)
    ran = before is None or (after or {}).get("config_hash") != before.get("config_hash")
    return JobResult(job, directory, metrics, ran)


# --------------------------------------------------------------------------- experiments


def plan_experiment(cfg: DictConfig, overrides=None) -> list[Job]:
    return make_study(cfg).plan_all(cfg, dataset_sessions(cfg), overrides)


def run_experiment(cfg: DictConfig, experiment_dir: str | Path, overrides=None) -> dict:
    """Every job of ``cfg.study`` in this process, then aggregation and the ``after`` steps.

    ``overrides``: the command line's overrides (their ``model.*`` ones reach every variant of
    ``study.models``). Returns ``{"jobs": [JobResult], "ran": int, "skipped": int, "tables":
    {name: DataFrame}}``.
    """
    from painnet.experiments.aggregate import aggregate

    experiment_dir = Path(experiment_dir)
    study = make_study(cfg)
    with RunLock(experiment_dir):
        jobs = study.plan_all(cfg, dataset_sessions(cfg), overrides)
        log.info("%s: %d jobs in %s", study.kind, len(jobs), experiment_dir)
        results = []
        for i, job in enumerate(jobs, 1):
            log.info("[%d/%d] %s", i, len(jobs), job.name)
            results.append(run_job(job, experiment_dir))
        ran = sum(r.ran for r in results)
        log.info("%d jobs trained, %d reused (finished before)", ran, len(results) - ran)
        eval_cfg = cfg.get("eval") or {}
        tables = aggregate(
            experiment_dir,
            n_boot=int(eval_cfg.get("n_boot", 10_000)),
            seed=int(cfg.seed),
            plots=bool(eval_cfg.get("plots", True)),
            logger_cfg=cfg.get("logger"),
            protocol=_plain(eval_cfg.get("protocol")),
        )
        run_after_steps(study, experiment_dir)
    return {"jobs": results, "ran": ran, "skipped": len(results) - ran, "tables": tables}


def run_after_steps(study, experiment_dir: Path) -> None:
    for step in study.after:
        log.info("step %s on %s", type(step).__name__, experiment_dir)
        step(experiment_dir)


def run_sweep_job(cfg: DictConfig, experiment_dir: str | Path) -> JobResult:
    """One job of a Hydra multirun: the composed model on the composed split (and arm)."""
    job = make_study(cfg).sweep_job(cfg, dataset_sessions(cfg))
    return run_job(job, Path(experiment_dir), wait_s=DEPENDENCY_WAIT_S)


def objective(cfg: DictConfig, outcome: dict) -> float:
    """``study.objective`` (e.g. ``test/r_1min``) of ``study.objective_model`` (default: the
    composed model) in the loop's pooled table; the mean over participants when several."""
    from painnet.experiments.identity import variant_name

    study = cfg.study
    key = str(study.get("objective") or "test/r_1min").removeprefix("test/")
    wanted = str(study.get("objective_model") or variant_name(cfg))
    for name in ("within_subject", "cross_subject"):
        table = outcome["tables"].get(name)
        if table is None or table.empty or key not in table:
            continue
        pattern = rf"^{re.escape(wanted)}(-[0-9a-f]{{{HASH_LENGTH}}})?$"
        rows = table[table["model"].astype(str).str.match(pattern)]
        if not rows.empty:
            return float(rows[key].astype(float).mean())
    return float("nan")


def run_from_hydra(cfg: DictConfig) -> float:
    """Dispatch of ``train.py`` when ``cfg.study`` is set: loop or one sweep job; returns the
    objective for sweepers."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    loop = cfg.study.get("loop", "auto")
    if loop == "auto":
        loop = hydra_cfg.mode != RunMode.MULTIRUN
    if loop:
        overrides = list(hydra_cfg.overrides.task)
        outcome = run_experiment(cfg, hydra_cfg.runtime.output_dir, overrides)
        return objective(cfg, outcome)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    result = run_sweep_job(cfg, hydra_cfg.sweep.dir if multirun else hydra_cfg.runtime.output_dir)
    key = str(cfg.study.get("objective") or "test/r_1min").removeprefix("test/")
    return float(result.metrics.get(key) or float("nan"))
