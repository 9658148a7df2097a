"""Studies: ``_target_`` objects that expand an experiment into jobs.

``cfg.study`` (``painnet/conf/study/*.yaml``, selected by the experiment configs) is
instantiated into one of these. Each plans the jobs of one model variant on a dataset's
sessions (:meth:`Study.plan`), and names the job of one Hydra multirun process
(:meth:`Study.sweep_job`). Shared options (every study has them, ``conf/study/_base.yaml``):

- ``models``: model config names (``[ridge, edge_pcr, convattn]``), composed with the user's
  ``model.*`` overrides; null = the composed ``model``;
- ``subjects`` / ``folds``: participants and outer folds (null = all), for loops;
- ``n_val``: validation sessions of each split (null = ``split.n_val``);
- ``loop``: ``auto`` (loop unless launched with ``-m``), true or false;
- ``job_plots``: false = PNGs for the aggregate only;
- ``objective``: the metric ``train.py`` returns to a sweeper (default ``test/r_1min``, of the
  pooled table of ``objective_model``, default the composed ``model``);
- ``after``: steps called with the experiment folder once every job has finished and the
  results are aggregated (e.g. ``{_target_: painnet.analysis.importance.ImportanceStep}``).

:class:`Composite` runs several studies in order into one experiment folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from painnet.experiments.decoder import LightningDecoder, adapter_class, make_decoder
from painnet.experiments.finetune import (
    pretrain_split,
    ssl_pretrain_changes,
    ssl_pretrain_split,
)
from painnet.experiments.identity import variant_name
from painnet.experiments.jobs import (
    Dependency,
    Job,
    checkpoint_of,
    deduplicate,
    make_job,
    model_variants,
)

LOSO = "painnet.data.splits.LeaveOneSessionOut"
CROSS = "painnet.data.splits.CrossSubject"
SIZE = "painnet.data.splits.DataSize"
ARMS = ("scratch", "finetune")


def selected(available: Sequence[str], wanted, what: str) -> list[str]:
    """``wanted`` (None = all) checked against ``available``; labels compared as strings."""
    if wanted is None:
        return list(available)
    wanted = [str(w).removeprefix("sub-") for w in wanted]
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise ValueError(f"{what} {unknown} not in the dataset (have {list(available)})")
    return wanted


class Study:
    kind = "study"

    def __init__(
        self,
        models: Sequence[str] | None = None,
        subjects: Sequence[str] | None = None,
        folds: Sequence[int] | None = None,
        n_val: int | None = None,
        loop: str | bool = "auto",
        job_plots: bool = True,
        objective: str = "test/r_1min",
        objective_model: str | None = None,
        after: Sequence | None = None,
    ):
        self.models = list(models) if models else None
        self.subjects = subjects
        self.folds = folds
        self.n_val = n_val
        self.loop = loop
        self.job_plots = job_plots
        self.objective = objective
        self.objective_model = objective_model
        self.after = list(after or [])
        for step in self.after:
            if not callable(step):
                raise ValueError(f"study.after: {step!r} is not callable (a step object)")

    # -- planning --------------------------------------------------------------------------
    def plan_all(self, cfg: DictConfig, sessions: Mapping, overrides=None) -> list[Job]:
        """Every job of every model variant (dependencies before their dependents)."""
        jobs = []
        for variant in model_variants(cfg, self.models, overrides):
            jobs += self.plan(variant, sessions)
        return deduplicate(jobs)

    def plan(self, cfg: DictConfig, sessions: Mapping) -> list[Job]:
        raise NotImplementedError

    def sweep_job(self, cfg: DictConfig, sessions: Mapping) -> Job:
        """The job of one multirun process: the composed model on the composed split."""
        split = OmegaConf.to_container(cfg.split, resolve=True)
        return make_job(cfg, split, sessions, meta=_split_meta(split))

    # -- helpers ---------------------------------------------------------------------------
    def _n_val(self, cfg: DictConfig) -> int:
        if self.n_val is not None:
            return int(self.n_val)
        return int((cfg.get("split") or {}).get("n_val", 1))

    def _folds(self, n_sessions: int) -> list[int]:
        folds = list(range(n_sessions)) if self.folds is None else [int(f) for f in self.folds]
        bad = [f for f in folds if not 0 <= f < n_sessions]
        if bad:
            raise ValueError(
                f"study.folds {bad} out of range: the participant has {n_sessions} sessions"
            )
        return folds

    def _subjects(self, sessions: Mapping) -> list[str]:
        return selected(sorted(sessions), self.subjects, "study.subjects")

    def loso_job(self, cfg, sessions, subject: str, fold: int, **kw) -> Job:
        split = {"_target_": LOSO, "subject": subject, "fold": fold}
        split.update(n_val=self._n_val(cfg), seed=int(cfg.seed))
        return make_job(cfg, split, sessions, meta={"subject": subject, "fold": fold}, **kw)


def _split_meta(split: Mapping) -> dict:
    meta = {k: split[k] for k in ("subject", "fold", "n_train", "repeat", "mode") if k in split}
    if "train_subjects" in split:
        meta["subject"] = "+".join(str(s) for s in split.get("train_subjects") or [])
    return meta


class WithinSubject(Study):
    """Every outer leave-one-session-out fold of every selected participant."""

    kind = "within_subject"

    def plan(self, cfg, sessions):
        return [
            self.loso_job(cfg, sessions, subject, fold)
            for subject in self._subjects(sessions)
            for fold in self._folds(len(sessions[subject]))
        ]


class CrossSubject(Study):
    """For each participant: all its sessions → every session of the others."""

    kind = "cross_subject"

    def plan(self, cfg, sessions):
        subjects = sorted(sessions)
        if len(subjects) < 2:
            raise ValueError(f"cross-subject needs at least 2 participants, got {subjects}")
        jobs = []
        for subject in self._subjects(sessions):
            others = [s for s in subjects if s != subject]
            split = {"_target_": CROSS, "train_subjects": [subject], "test_subjects": others}
            split.update(n_val=self._n_val(cfg), seed=int(cfg.seed))
            meta = {"subject": subject, "test_subjects": others}
            jobs.append(make_job(cfg, split, sessions, meta=meta))
        return jobs


class DataSize(Study):
    """Inside every outer fold: n = 1 … S−2 training sessions, ``repeats`` random draws each
    (``modes: [random]``) or the first n sessions (``first``, one draw).

    ``inherit`` (e.g. ``{fixed_components: fixed_components}``, model argument: hyperparameter
    name): every subset job of a fold takes
    these model arguments from the hyperparameters chosen by the fold's full model (the LOSO job
    of the same fold, planned first), as the reference study fixed the number of PCs.
    Decoders without validation sessions (classical: inner CV) train on exactly n sessions.
    """

    kind = "data_size"

    def __init__(
        self,
        n_train: Sequence[int] | None = None,
        repeats: int = 3,
        modes: Sequence[str] | None = None,
        inherit: Mapping[str, str] | None = None,
        **common,
    ):
        super().__init__(**common)
        self.n_train = n_train
        self.repeats = int(repeats)
        self.modes = modes
        self.inherit = dict(inherit or {})
        if self.repeats < 1:
            raise ValueError(f"study.repeats={repeats}: must be >= 1")

    def n_train_grid(self, n_sessions: int, n_val: int) -> list[int]:
        largest = n_sessions - 1 - n_val
        grid = self.n_train
        grid = list(range(1, n_sessions - 1)) if grid is None else [int(n) for n in grid]
        bad = [n for n in grid if not 1 <= n <= largest]
        if bad:
            raise ValueError(
                f"study.n_train {bad} impossible with {n_sessions} sessions (1 … {largest} allowed)"
            )
        return grid

    def _subset_n_val(self, cfg) -> int:
        return self._n_val(cfg) if adapter_class(cfg).uses_validation else 0

    def _dependency(self, full: Job) -> tuple[Dependency, ...]:
        if not self.inherit:
            return ()
        inject = tuple((f"model.{arg}", ("hyperparameter", hp)) for arg, hp in self.inherit.items())
        return (Dependency(full, inject),)

    def plan(self, cfg, sessions):
        modes = [str(m) for m in (self.modes or [_split_mode(cfg)])]
        jobs = []
        for subject in self._subjects(sessions):
            n_sessions = len(sessions[subject])
            folds = self._folds(n_sessions)
            full = {f: self.loso_job(cfg, sessions, subject, f) for f in folds}
            if self.inherit:
                jobs += full.values()
            n_val = self._subset_n_val(cfg)
            for mode in modes:
                for n in self.n_train_grid(n_sessions, self._n_val(cfg)):
                    for repeat in range(self.repeats if mode == "random" else 1):
                        for fold in folds:
                            split = {"_target_": SIZE, "subject": subject, "fold": fold}
                            split.update(n_train=n, repeat=repeat, mode=mode, n_val=n_val)
                            split["seed"] = int(cfg.seed)
                            meta = _split_meta(split)
                            deps = self._dependency(full[fold])
                            jobs.append(make_job(cfg, split, sessions, meta, depends_on=deps))
        return jobs

    def sweep_job(self, cfg, sessions):
        split = OmegaConf.to_container(cfg.split, resolve=True)
        deps = ()
        if self.inherit and split.get("_target_") == SIZE:
            full = self.loso_job(cfg, sessions, str(split["subject"]), int(split["fold"]))
            deps = self._dependency(full)
        return make_job(cfg, split, sessions, meta=_split_meta(split), depends_on=deps)


def _split_mode(cfg) -> str:
    split = cfg.get("split") or {}
    return str(split.get("mode", "random")) if split.get("_target_") == SIZE else "random"


class Finetune(Study):
    """The within-subject folds from scratch and fine-tuned from a pretrained backbone; the
    pretraining is a job of its own (``pretrain/``) that the fine-tuning jobs depend on:

    - supervised (``experiment=finetune``): ConvAttn on the other participants, one job per
      participant;
    - self-supervised (a ``finetune.pretrain`` node, ``experiment=pretrain``): masked
      reconstruction on every run the fold may read, one job per fold (``scope: fold``) or per
      participant (``scope: others``);
    - none with ``finetune.from=PATH``: every fine-tuning starts from that checkpoint.

    ``arm``: the arm of one multirun process."""

    kind = "finetune"

    def __init__(self, arms: Sequence[str] = ARMS, arm: str = "finetune", **common):
        super().__init__(**common)
        self.arms = [str(a) for a in arms]
        unknown = [a for a in [*self.arms, arm] if a not in ARMS]
        if unknown:
            raise ValueError(f"study.arms / study.arm {unknown} unknown; choose from {ARMS}")
        self.arm = str(arm)

    def _check(self, cfg) -> None:
        if not cfg.get("finetune"):
            raise ValueError("experiment=finetune needs a `finetune` config node")
        if not issubclass(adapter_class(cfg), LightningDecoder):
            raise ValueError(
                f"experiment=finetune: model {variant_name(_scratch(cfg))} is not a deep model"
            )
        make_decoder(cfg, "check").validate()

    def pretrain_job(self, cfg, sessions, subject: str, fold: int = 0) -> Job | None:
        """The job whose checkpoint ``subject``'s ``fold`` fine-tunes from (None: ``from``)."""
        ft = cfg.finetune
        if ft.get("from"):
            return None
        if ft.get("pretrain"):
            split = ssl_pretrain_split(cfg, subject, fold, self._n_val(cfg))
            meta = {"subject": subject, "scope": split["scope"]}
            if split["fold"] is not None:
                meta["fold"] = split["fold"]
            changes = ssl_pretrain_changes(cfg)
            return make_job(cfg, split, sessions, meta, group="pretrain", changes=changes)
        split = pretrain_split(subject, list(sessions), int(ft.get("n_val", 1)), int(cfg.seed))
        changes = {"finetune": None, "trainer.max_epochs": int(ft.pretrain_epochs)}
        meta = {"subject": subject}
        return make_job(cfg, split, sessions, meta, group="pretrain", changes=changes)

    def _arm_job(self, cfg, sessions, subject, fold, arm, pretrain: Job | None) -> Job:
        if arm == "scratch":
            return self.loso_job(cfg, sessions, subject, fold, changes={"finetune": None})
        deps = (checkpoint_of(pretrain),) if pretrain is not None else ()
        return self.loso_job(cfg, sessions, subject, fold, depends_on=deps)

    def plan(self, cfg, sessions):
        self._check(cfg)
        jobs, planned = [], set()
        for subject in self._subjects(sessions):
            for fold in self._folds(len(sessions[subject])):
                pretrain = None
                if "finetune" in self.arms:
                    pretrain = self.pretrain_job(cfg, sessions, subject, fold)
                if pretrain is not None and pretrain.name not in planned:
                    planned.add(pretrain.name)  # once per participant unless scope: fold
                    jobs.append(pretrain)
                for arm in self.arms:
                    jobs.append(self._arm_job(cfg, sessions, subject, fold, arm, pretrain))
        return jobs

    def sweep_job(self, cfg, sessions):
        self._check(cfg)
        split = OmegaConf.to_container(cfg.split, resolve=True)
        subject = str(split.get("subject") or sorted(sessions)[0])
        fold = int(split.get("fold", 0))
        pretrain = None
        if self.arm == "finetune":
            pretrain = self.pretrain_job(cfg, sessions, subject, fold)
        return self._arm_job(cfg, sessions, subject, fold, self.arm, pretrain)


def _scratch(cfg):
    return OmegaConf.merge(cfg, {"finetune": None})


class Composite(Study):
    """Several studies run in order into one experiment folder (``studies``: study objects).
    A study without its own ``models`` uses the composite's; jobs planned by two studies
    (e.g. a fold's full model) run once."""

    kind = "composite"

    def __init__(self, studies: Sequence[Study], **common):
        super().__init__(**common)
        self.studies = list(studies)
        if not self.studies:
            raise ValueError("study.studies is empty: a composite study needs studies")

    def plan_all(self, cfg, sessions, overrides=None):
        jobs = []
        for study in self.studies:
            models = study.models or self.models
            for variant in model_variants(cfg, models, overrides):
                jobs += study.plan(variant, sessions)
        return deduplicate(jobs)

    def plan(self, cfg, sessions):
        return deduplicate([job for study in self.studies for job in study.plan(cfg, sessions)])

    def sweep_job(self, cfg, sessions):
        raise ValueError(
            "a composite study runs as a loop (study.loop=true); sweep its studies one by one"
        )
