"""Plan an experiment as a list of jobs; each job is one ``run_single`` on one split.

A *job* is a config variant (split, model, fine-tuning arm) plus the folder it writes into.
Every experiment kind (``study.kind``) expands to jobs here:

- ``within_subject``: every outer leave-one-session-out fold of every selected participant;
- ``cross_subject``: for each participant, all of its sessions → every session of the others;
- ``data_size``: inside every outer fold, n = 1 … S−2 training sessions, ``repeats`` draws each
  (``mode: random``) or the first n sessions (``mode: first``, one draw);
- ``finetune``: the within-subject folds twice, from scratch and fine-tuned from a model
  pretrained on the other participants.

Each of them is crossed with ``study.models`` (model config names, e.g. ``[ridge, convattn]``).
Job folders are ``<experiment dir>/<model name>/<split name>``, so they are the same on every
rerun and a finished job is found again (see :func:`is_finished`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from painnet.data.splits import make_split

KINDS = ("within_subject", "cross_subject", "data_size", "finetune")
ARMS = ("scratch", "finetune")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DONE_MARKER = "metrics.json"


@dataclass(frozen=True)
class Job:
    """One training run of an experiment.

    ``split``: the ``split`` config node of the job; ``model``: a model config name (``None`` =
    the composed ``model``); ``arm``: ``scratch`` or ``finetune``; ``meta``: descriptors written
    beside the outputs (experiment, subject, fold, n_train, repeat, ...).
    """

    name: str
    split: dict
    model: str | None = None
    arm: str = "scratch"
    meta: dict = field(default_factory=dict)

    def directory(self, experiment_dir: str | Path) -> Path:
        return Path(experiment_dir) / self.name


def is_finished(job_dir: str | Path) -> bool:
    """A job is finished once its metrics.json exists (run_single writes it last)."""
    return (Path(job_dir) / DONE_MARKER).is_file()


# --------------------------------------------------------------------------- configs


def load_model_config(name: str, conf_dir: str | Path = CONF_DIR) -> DictConfig:
    """The ``conf/model/<name>.yaml`` node (no defaults list: model configs are flat)."""
    path = Path(conf_dir) / "model" / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in (Path(conf_dir) / "model").glob("*.yaml"))
        raise FileNotFoundError(f"{path}: no model config {name!r} (have {have})")
    node = OmegaConf.load(path)
    if "defaults" in node:
        raise ValueError(f"{path}: model configs with a defaults list are not supported here")
    return node


def is_deep_config(model_cfg: Mapping) -> bool:
    import lightning as L

    return issubclass(get_class(model_cfg["_target_"]), L.LightningModule)


def job_config(cfg: DictConfig, job: Job, job_dir: str | Path) -> DictConfig:
    """The full config of ``job``: ``cfg`` with the job's split, model and arm, outputs in job_dir."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.split = OmegaConf.create(job.split)
        if job.model is not None:
            OmegaConf.update(out, "model", load_model_config(job.model), merge=False)
            out.model_name = None
        if job.arm == "scratch":
            out.finetune = None
        elif not out.get("finetune"):
            raise ValueError(f"job {job.name}: arm 'finetune' needs a `finetune` config node")
        if out.split.kind == "data_size" and not is_deep_config(out.model):
            # Classical models fold validation sessions into training (they run their own inner
            # CV): without this they would train on n + n_val sessions, not n.
            out.split.n_val = 0
        if out.get("study") and out.study.get("job_plots") is False and out.get("eval"):
            out.eval.plots = False  # plots of the aggregate only: per-job PNGs cost ~1 s each
        out.paths.output_dir = str(job_dir)
        out.job = dict(job.meta, name=job.name, arm=job.arm)
    return out


def tracking_overrides(cfg: DictConfig, meta: Mapping, model: str) -> None:
    """Group the job's W&B run by experiment and participant; job type = model (in place)."""
    wandb = (cfg.get("logger") or {}).get("wandb")
    if not wandb:
        return
    experiment = str(meta.get("experiment", cfg.get("task_name", "train")))
    subject = meta.get("subject")
    group = experiment if subject is None else f"{experiment}_sub-{subject}"
    tags = [experiment, model] + ([f"sub-{subject}"] if subject is not None else [])
    tags += [str(t) for t in (cfg.get("tags") or [])]
    with open_dict(cfg):
        wandb.group = group
        wandb.job_type = model
        wandb.tags = list(dict.fromkeys(tags))
        wandb.name = str(meta.get("name", model))


# --------------------------------------------------------------------------- planning


def selected(available: Sequence[str], wanted: Iterable | None, what: str) -> list[str]:
    """``wanted`` (None = all) checked against ``available``; labels compared as strings."""
    if wanted is None:
        return list(available)
    wanted = [str(w).removeprefix("sub-") for w in wanted]
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise ValueError(f"{what} {unknown} not in the dataset (have {list(available)})")
    return wanted


def _folds(study: Mapping, n_sessions: int) -> list[int]:
    folds = study.get("folds")
    folds = list(range(n_sessions)) if folds is None else [int(f) for f in folds]
    bad = [f for f in folds if not 0 <= f < n_sessions]
    if bad:
        raise ValueError(
            f"study.folds {bad} out of range: the participant has {n_sessions} sessions"
        )
    return folds


def _models(study: Mapping) -> list[str | None]:
    models = study.get("models")
    return [None] if not models else [str(m) for m in models]


def _model_label(cfg: DictConfig, model: str | None) -> str:
    from painnet.experiments.single import model_name

    if model is None:
        return model_name(OmegaConf.merge(cfg, {"finetune": None}))
    return model_name(OmegaConf.create({"model": load_model_config(model), "finetune": None}))


def plan_jobs(cfg: DictConfig, sessions: Mapping[str, Sequence[str]]) -> list[Job]:
    """Every job of the experiment ``cfg.study.kind`` on a dataset with ``sessions``."""
    study = cfg.study
    kind = study.kind
    if kind not in KINDS:
        raise ValueError(f"study.kind must be one of {KINDS}, got {kind!r}")
    planner = {
        "within_subject": _plan_within,
        "cross_subject": _plan_cross,
        "data_size": _plan_data_size,
        "finetune": _plan_finetune,
    }[kind]
    jobs = []
    for model in _models(study):
        label = _model_label(cfg, model)
        model_cfg = cfg.model if model is None else load_model_config(model)
        if kind == "finetune" and not is_deep_config(model_cfg):
            raise ValueError(f"experiment=finetune: model {label} is not a deep model")
        for job in planner(cfg, sessions):
            shown = label if job.arm == "scratch" else finetuned_label(cfg, label)
            jobs.append(
                Job(
                    name=f"{shown}/{job.name}",
                    split=job.split,
                    model=model,
                    arm=job.arm,
                    meta={**job.meta, "experiment": kind, "model": shown},
                )
            )
    return jobs


def finetuned_label(cfg: DictConfig, label: str) -> str:
    """Name of the fine-tuned arm in tables (the same suffix ``model_name`` appends)."""
    return f"{label}_ft-{cfg.finetune.get('mode', 'all')}"


def _split_job(split: dict, sessions: Mapping, meta: dict, arm: str = "scratch") -> Job:
    name = make_split(split, sessions).name  # also validates the split
    return Job(name=name, split=split, arm=arm, meta={**meta, "split": name})


def _base_split(cfg: DictConfig, kind: str) -> dict:
    n_val = cfg.split.get("n_val", 1) if cfg.get("split") else 1
    return {"kind": kind, "n_val": int(n_val), "seed": int(cfg.seed)}


def _plan_within(cfg: DictConfig, sessions: Mapping) -> list[Job]:
    jobs = []
    for subject in selected(sorted(sessions), cfg.study.get("subjects"), "study.subjects"):
        for fold in _folds(cfg.study, len(sessions[subject])):
            split = {**_base_split(cfg, "loso"), "subject": subject, "fold": fold}
            jobs.append(_split_job(split, sessions, {"subject": subject, "fold": fold}))
    return jobs


def _plan_cross(cfg: DictConfig, sessions: Mapping) -> list[Job]:
    subjects = sorted(sessions)
    if len(subjects) < 2:
        raise ValueError(f"cross-subject needs at least 2 participants, got {subjects}")
    jobs = []
    for subject in selected(subjects, cfg.study.get("subjects"), "study.subjects"):
        others = [s for s in subjects if s != subject]
        split = {
            **_base_split(cfg, "cross_subject"),
            "train_subjects": [subject],
            "test_subjects": others,
        }
        jobs.append(_split_job(split, sessions, {"subject": subject, "test_subjects": others}))
    return jobs


def n_train_grid(study: Mapping, n_sessions: int, n_val: int) -> list[int]:
    """Training sizes: ``study.n_train`` or 1 … S−2 (the study's grid, with one test session
    and one validation session set aside)."""
    largest = n_sessions - 1 - n_val
    grid = study.get("n_train")
    grid = list(range(1, n_sessions - 1)) if grid is None else [int(n) for n in grid]
    bad = [n for n in grid if not 1 <= n <= largest]
    if bad:
        raise ValueError(
            f"study.n_train {bad} impossible with {n_sessions} sessions (1 … {largest} allowed)"
        )
    return grid


def _plan_data_size(cfg: DictConfig, sessions: Mapping) -> list[Job]:
    study = cfg.study
    n_val = int(study.get("n_val", 1))
    repeats = int(study.get("repeats", 1))
    jobs = []
    for subject in selected(sorted(sessions), study.get("subjects"), "study.subjects"):
        n_sessions = len(sessions[subject])
        for mode in study.get("modes") or [_split_mode(cfg)]:
            for n_train in n_train_grid(study, n_sessions, n_val):
                # "first n sessions" is one fixed training set: repeating it adds nothing.
                for repeat in range(repeats if mode == "random" else 1):
                    for fold in _folds(study, n_sessions):
                        split = {
                            **_base_split(cfg, "data_size"),
                            "subject": subject,
                            "fold": fold,
                            "n_train": n_train,
                            "repeat": repeat,
                            "mode": str(mode),
                            "n_val": n_val,
                        }
                        meta = {"subject": subject, "fold": fold, "n_train": n_train}
                        meta.update(repeat=repeat, mode=str(mode))
                        jobs.append(_split_job(split, sessions, meta))
    return jobs


def _split_mode(cfg: DictConfig) -> str:
    split = cfg.get("split") or {}
    return str(split.get("mode", "random")) if split.get("kind") == "data_size" else "random"


def _plan_finetune(cfg: DictConfig, sessions: Mapping) -> list[Job]:
    if not cfg.get("finetune"):
        raise ValueError("experiment=finetune needs a `finetune` config node")
    arms = [str(a) for a in (cfg.study.get("arms") or ARMS)]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"study.arms {unknown} unknown; choose from {ARMS}")
    return [
        Job(name=job.name, split=job.split, arm=arm, meta=job.meta)
        for job in _plan_within(cfg, sessions)
        for arm in arms
    ]


def sweep_job(cfg: DictConfig) -> Job:
    """The job of one Hydra multirun process: its split and arm come from the composed config."""
    from painnet.experiments.single import model_name

    study = cfg.study
    split = OmegaConf.to_container(cfg.split, resolve=True)
    arm = str(study.get("arm") or ("finetune" if study.kind == "finetune" else "scratch"))
    if arm not in ARMS:
        raise ValueError(f"study.arm must be one of {ARMS}, got {arm!r}")
    scored = cfg if arm == "finetune" else OmegaConf.merge(cfg, {"finetune": None})
    meta = {"experiment": str(study.kind), "model": model_name(scored)}
    for key in ("subject", "fold", "n_train", "repeat", "mode"):
        if key in split:
            meta[key] = split[key]
    if split.get("kind") == "cross_subject":
        meta["subject"] = "+".join(str(s) for s in split.get("train_subjects") or [])
    return Job(name=meta["model"], split=split, arm=arm, meta=meta)
