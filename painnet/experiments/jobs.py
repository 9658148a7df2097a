"""Jobs of an experiment: one ``run_single`` each, in a folder named by its identity.

A :class:`Job` is a full job config (one model variant, one split) plus where it goes:
``<experiment dir>/[<group>/]<variant id>/<split name>`` (see
:mod:`painnet.experiments.identity`), the same folder whether it runs in a loop or as one
process of a Hydra multirun. A job may *depend* on other jobs (a pretraining job, a data-size
subset on its fold's full model): the dependency runs first and values from its folder are
injected into the job's config (:class:`Dependency`).

Model variants (``study.models``) are composed by Hydra from the packaged configs
(``painnet/conf/model/<name>.yaml``) with the user's ``model.*`` command-line overrides, so an
override such as ``model.net.embed_dim=8`` reaches every variant that has that key.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from painnet.data.splits import make_split, splitter
from painnet.experiments.decoder import CHECKPOINT
from painnet.experiments.identity import config_hash, variant_id, variant_name
from painnet.experiments.jobdir import RESOLVED_CONFIG, read_done

log = logging.getLogger(__name__)

CONF_MODULE = "painnet.conf"
MODEL_PREFIXES = ("model.", "+model.", "++model.", "~model.")


@dataclass(frozen=True)
class Dependency:
    """A job that must finish first; ``inject`` maps a config key of the dependent job to a
    value of the dependency's folder: ``("file", relative path)`` or ``("hyperparameter",
    name)`` (from its DONE.json)."""

    job: Job
    inject: tuple[tuple[str, tuple[str, str]], ...] = ()


@dataclass(frozen=True)
class Job:
    """One run of an experiment. ``cfg`` (the full job config: ``base`` with the job's split,
    ``changes`` and ``job`` descriptors) is built when first used, so planning thousands of
    jobs stays cheap."""

    base: DictConfig = field(compare=False, repr=False)
    split: Mapping = field(compare=False, repr=False)
    split_name: str
    variant: str  # variant id: folder and aggregation key
    model: str  # variant name shown in tables
    group: str = ""  # "" for results, "pretrain" for pretraining jobs
    changes: Mapping = field(default_factory=dict, compare=False, repr=False)
    meta: Mapping = field(default_factory=dict, compare=False)
    depends_on: tuple[Dependency, ...] = field(default=(), compare=False)

    @cached_property
    def cfg(self) -> DictConfig:
        jcfg = copy.deepcopy(self.base)
        with open_dict(jcfg):
            jcfg.split = OmegaConf.create(dict(self.split))
            for key, value in self.changes.items():
                OmegaConf.update(jcfg, key, value, merge=False, force_add=True)
            study = jcfg.get("study") or {}
            if study.get("job_plots") is False and jcfg.get("eval"):
                jcfg.eval.plots = False  # plots of the aggregate only: per-job PNGs cost ~1 s
            jcfg.job = dict(self.meta, role=self.group or "result")
        return jcfg

    @property
    def name(self) -> str:
        return "/".join(p for p in (self.group, self.variant, self.split_name) if p)

    def directory(self, experiment_dir: str | Path) -> Path:
        return Path(experiment_dir) / self.name


def read_job_config(job_dir: str | Path) -> DictConfig:
    path = Path(job_dir) / RESOLVED_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a painnet run folder (no saved job config)")
    return OmegaConf.load(path)


# --------------------------------------------------------------------------- variants


def model_overrides(overrides: Sequence[str] | None) -> list[str]:
    """The ``model.*`` overrides of a command line (``model=<name>`` choices left out)."""
    return [o for o in (overrides or []) if o.startswith(MODEL_PREFIXES)]


def compose_model(name: str, overrides: Sequence[str]) -> DictConfig:
    """The ``model`` node of ``model=<name>`` with ``overrides`` (those whose key it has)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    def _compose(extra):
        if GlobalHydra.instance().is_initialized():
            return compose(config_name="train", overrides=[f"model={name}", *extra])
        with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
            return compose(config_name="train", overrides=[f"model={name}", *extra])

    try:
        base = _compose([])
    except Exception as err:
        raise ValueError(f"study.models: no model config {name!r} ({err})") from err
    applies = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if override.startswith("+") or OmegaConf.select(base, key) is not None:
            applies.append(override)
    composed = _compose(applies) if applies else base
    return OmegaConf.create(OmegaConf.to_container(composed.model, resolve=False))


def model_variants(cfg: DictConfig, models: Sequence[str] | None, overrides=None) -> list:
    """One config per model of ``study.models`` (None: the composed ``model`` only)."""
    if not models:
        return [cfg]
    wanted = model_overrides(overrides)
    variants, used = [], set()
    for name in models:
        node = compose_model(str(name), wanted)
        for override in wanted:
            key = override.lstrip("+~").split("=", 1)[0]
            if override.startswith("+") or OmegaConf.select(node, key[len("model.") :]) is not None:
                used.add(override)
        variant = copy.deepcopy(cfg)
        with open_dict(variant):
            variant.model = node
        variants.append(variant)
    unused = [o for o in wanted if o not in used]
    if unused:
        raise ValueError(f"override(s) {unused} apply to none of study.models={list(models)}")
    return variants


# --------------------------------------------------------------------------- jobs


def make_job(
    cfg: DictConfig,
    split: Mapping,
    sessions: Mapping,
    meta: Mapping | None = None,
    group: str = "",
    depends_on: Sequence[Dependency] = (),
    changes: Mapping | None = None,
) -> Job:
    """A job of ``cfg`` on ``split`` (validated against the dataset's ``sessions``).

    ``changes``: dotted config keys set for this job (e.g. ``finetune: None``,
    ``trainer.max_epochs``); ``meta``: descriptors stored as ``job.*`` in the job config.
    """
    split = dict(split)
    made = make_split(split, sessions)  # validates the split before anything trains
    changes = dict(changes or {})
    # The variant depends on the model, fine-tuning and ensemble only (never on the split).
    view = cfg
    if changes.keys() & {"finetune", "ensemble"} or any(k.startswith("model.") for k in changes):
        view = copy.deepcopy(cfg)
        with open_dict(view):
            for key, value in changes.items():
                OmegaConf.update(view, key, value, merge=False, force_add=True)
    name, variant = variant_name(view), variant_id(view)
    info = {"split": made.name, "kind": splitter(split).kind, "model": name, "group": group}
    info.update(meta or {})
    info["variant"] = variant  # the id before any injected dependency value (job_variant_id)
    return Job(
        base=cfg,
        split=split,
        split_name=made.name,
        variant=variant,
        model=name,
        group=group,
        changes=changes,
        meta=info,
        depends_on=tuple(depends_on),
    )


def resolved_job_config(job: Job, experiment_dir: Path) -> DictConfig:
    """The job's config with its dependencies' values injected (they must have finished)."""
    jcfg = copy.deepcopy(job.cfg)
    for dep in job.depends_on:
        dep_dir = dep.job.directory(experiment_dir)
        done = read_done(dep_dir)
        if done is None:
            raise RuntimeError(f"job {job.name}: its dependency {dep_dir} has not finished")
        for key, (source, what) in dep.inject:
            if source == "file":
                value = str(dep_dir / what)
            elif source == "hyperparameter":
                chosen = done.get("hyperparameters") or {}
                if what not in chosen:
                    raise ValueError(
                        f"job {job.name}: {dep_dir} reports no hyperparameter {what!r} "
                        f"(has {sorted(chosen)}) for {key}"
                    )
                value = chosen[what]
            else:
                raise ValueError(f"unknown dependency source {source!r}")
            with open_dict(jcfg):
                OmegaConf.update(jcfg, key, value, merge=False, force_add=True)
    with open_dict(jcfg):
        jcfg.paths.output_dir = str(job.directory(experiment_dir))
    return jcfg


def checkpoint_of(job: Job, key: str = "finetune.from") -> Dependency:
    return Dependency(job, ((key, ("file", str(CHECKPOINT))),))


def deduplicate(jobs: Sequence[Job]) -> list[Job]:
    """Jobs planned twice (e.g. by two studies of a composite) kept once; the same folder with
    two different configs is an error."""
    seen: dict[str, Job] = {}
    out = []
    for job in jobs:
        if job.name in seen:
            if config_hash(seen[job.name].cfg) != config_hash(job.cfg):
                raise ValueError(
                    f"job {job.name} is planned twice with different configs (e.g. two studies "
                    "of a composite disagree on split.n_val); make them agree"
                )
            continue
        seen[job.name] = job
        out.append(job)
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
