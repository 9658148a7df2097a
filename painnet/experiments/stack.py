"""``model=stack``: a stacked decoder -- member decoders combined with weights fitted on
predictions they made for sessions they never saw.

Fitting one outer split (its training + validation sessions S, test session T):

1. Inner cross-validation over S: for the members named in ``model.inner_loso`` one session of
   S is held out at a time (as the outer loop holds out T); for the others S is cut into
   ``model.inner_folds`` contiguous groups of sessions. Each member is fitted on the other
   sessions of S (deep members hold ``split.n_val`` of them out for early stopping, as on an
   outer split) and predicts the held-out ones. T is not in any of these data views: it is
   removed from the runs they hold.
2. The combiner (:class:`painnet.models.stacking.StackCombiner`) fits its non-negative weights
   on these out-of-sample predictions, binned as scored.
3. Every member is refitted on the outer split exactly as it would be alone (``members/<name>``)
   and the combined prediction of T is the weighted sum of the members' predictions.

Why leave-one-session-out for the classical members: the combiner weighs the members' run
levels on their inner predictions, and a run level's leave-one-session-out artifact depends on
how many sessions a fit saw. Inner predictions made one held-out session at a time behave as
the outer predictions do; on three contiguous folds each fit misses a third of S. Classical
fits take a second or less, so S of them cost little; a network member keeps
``inner_folds`` (its fits are what a stack's time is spent on).

All member fits of one outer split are independent, so they run in ``model.n_jobs`` processes
(one torch thread each). Inner-fold models are deleted once they have predicted; their
predictions stay in ``stack_inner_predictions.csv``.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from painnet.atomic import write_bytes_atomic, write_csv_atomic
from painnet.data.splits import Split
from painnet.experiments.decoder import Decoder, make_decoder, model_kwargs

log = logging.getLogger(__name__)

# Keys of model=stack that configure the stacking, not the combiner's constructor.
STACK_KEYS = ("members", "member_jobs", "inner_folds", "inner_loso", "n_jobs")
COMBINER_PICKLE = "stack.pkl"
REPORT = "stack.json"
INNER_PREDICTIONS = "stack_inner_predictions.csv"
# members/<name>/: the member's own held-out table (not named like a job's predictions.csv)
MEMBER_PREDICTIONS = "member_predictions.csv"


class StackDecoder(Decoder):
    uses_validation = True  # deep members early-stop on split.n_val sessions

    def __init__(self, cfg: DictConfig, name: str):
        super().__init__(cfg, name)
        stack = cfg.model
        members = stack.get("members") or {}
        if not members:
            raise ValueError("model.members is empty: a stack needs at least one member model")
        self.inner_folds = int(stack.get("inner_folds", 3))
        self.inner_loso = [str(m) for m in (stack.get("inner_loso") or [])]
        self.n_jobs = int(stack.get("n_jobs", 1))
        jobs = stack.get("member_jobs") or {}
        unknown = sorted(set(map(str, jobs)) - set(map(str, members)))
        if unknown:
            raise ValueError(f"model.member_jobs names {unknown}, which are not in model.members")
        self.member_cfgs = {str(m): member_config(cfg, str(m), jobs.get(m)) for m in members}
        self.members: dict[str, Decoder] = {
            m: make_decoder(c, f"{name}/{m}") for m, c in self.member_cfgs.items()
        }
        kwargs = model_kwargs(stack)
        with open_dict(kwargs):
            for key in STACK_KEYS:
                kwargs.pop(key, None)
        self.combiner = instantiate(kwargs)
        self.inner_groups_: dict[str, list[list]] = {}
        self._predictions: tuple[str, dict[str, pd.DataFrame]] | None = None

    # -- protocol ------------------------------------------------------------------------
    def validate(self) -> None:
        if self.inner_folds < 2:
            raise ValueError(f"model.inner_folds={self.inner_folds}: must be >= 2")
        unknown = [m for m in self.inner_loso if m not in self.members]
        if unknown:
            raise ValueError(
                f"model.inner_loso names {unknown}, which are not in model.members "
                f"({list(self.members)})"
            )
        if self.n_jobs < 1 and self.n_jobs != -1:
            raise ValueError(f"model.n_jobs={self.n_jobs}: must be >= 1, or -1 (every core)")
        devices = (self.cfg.get("trainer") or {}).get("devices", 1)
        if self.n_jobs != 1 and str(devices) not in ("1", "None"):
            # Lightning's multi-device strategies re-launch the command in child processes;
            # member fits in a process pool would each start their own group.
            raise ValueError(
                f"model.n_jobs={self.n_jobs} with trainer.devices={devices}: a stack fits its "
                "members in parallel processes or on several devices, not both (set model.n_jobs=1)"
            )
        for name, member in self.members.items():
            if isinstance(member, StackDecoder):
                raise ValueError(f"model.members.{name}: a stack cannot be a member of a stack")
            if ":" in name:
                raise ValueError(f"model.members.{name}: member names cannot contain ':'")
            member.validate()
        self.combiner.check_members(list(self.members))

    def fit(self, dm, output_dir: Path, loggers=()) -> StackDecoder:
        self.validate()
        output_dir = Path(output_dir)
        n_val, seed = max(len(dm.split.val), 1), int(self.cfg.seed)
        grouped = [m for m in self.members if m not in self.inner_loso]
        schemes = {}  # inner-fold scheme -> (its data views, the members predicted through them)
        if grouped:
            schemes["groups"] = (inner_views(dm, self.inner_folds, n_val, seed), grouped)
        if self.inner_loso:
            n_sessions = len(dm.split.train) + len(dm.split.val)
            views = inner_views(dm, n_sessions, n_val, seed, label="loso")
            schemes["loso"] = (views, self.inner_loso)
        self.inner_groups_ = {
            scheme: [list(v.split.test) for v in views] for scheme, (views, _) in schemes.items()
        }
        inner_dir = output_dir / "stack_inner"
        tasks = [(m, dm, self.member_dir(output_dir, m), True) for m in self.members]
        tasks += [
            (m, view, inner_dir / scheme / str(k) / m, False)
            for scheme, (views, members) in schemes.items()
            for k, view in enumerate(views)
            for m in members
        ]
        tables = run_member_fits(self.member_cfgs, tasks, self.n_jobs, self.name, loggers)
        final = {m: tables[i] for i, m in enumerate(self.members)}
        inner: dict[str, list[pd.DataFrame]] = {m: [] for m in self.members}
        for (m, _, _, _), table in zip(
            tasks[len(self.members) :], tables[len(self.members) :], strict=True
        ):
            inner[m].append(table)
        inner_tables = {m: pd.concat(parts, ignore_index=True) for m, parts in inner.items()}
        self.combiner.fit(inner_tables)
        log.info("stack %s: %s", dm.split.name, json.dumps(self.combiner.report_))
        _write_inner_predictions(output_dir / INNER_PREDICTIONS, inner_tables)
        shutil.rmtree(inner_dir, ignore_errors=True)
        for m, member in self.members.items():  # the fitted members, for .model / predict
            member.load(self.member_dir(output_dir, m), dm)
        self._predictions = (dm.split.name, final)
        return self

    def predict(self, dm) -> pd.DataFrame:
        if self._predictions is not None and self._predictions[0] == dm.split.name:
            tables = self._predictions[1]
        else:
            tables = {m: member.predict(dm) for m, member in self.members.items()}
        combined = self.combiner.combine(tables)
        return combined.assign(model=self.name)

    def save(self, output_dir: Path) -> None:
        output_dir = Path(output_dir)
        for m, member in self.members.items():
            member.save(self.member_dir(output_dir, m))
        if self._predictions is not None:  # each member's own held-out table, for audits
            for m, table in self._predictions[1].items():
                write_csv_atomic(self.member_dir(output_dir, m) / MEMBER_PREDICTIONS, table)
        write_bytes_atomic(output_dir / COMBINER_PICKLE, pickle.dumps(self.combiner), mkdir=True)
        report = {
            "members": list(self.members),
            "inner_folds": {
                scheme: [[list(key) for key in group] for group in groups]
                for scheme, groups in self.inner_groups_.items()
            },
            **self.combiner.report_,
        }
        write_bytes_atomic(output_dir / REPORT, json.dumps(report, indent=1).encode(), mkdir=True)

    def load(self, job_dir: Path, dm=None, ckpt: Path | None = None) -> StackDecoder:
        if ckpt is not None:
            raise ValueError("ckpt_path cannot select one checkpoint of a stack")
        path = Path(job_dir) / COMBINER_PICKLE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: fitted stack weights not found")
        with open(path, "rb") as fh:
            self.combiner = pickle.load(fh)
        for m, member in self.members.items():
            member.load(self.member_dir(job_dir, m), dm)
        return self

    def hyperparameters(self) -> dict:
        return {
            "stack": self.combiner.hyperparameters(),
            "members": {m: member.hyperparameters() for m, member in self.members.items()},
        }

    @property
    def model(self):
        return {m: member.model for m, member in self.members.items()}

    @staticmethod
    def member_dir(output_dir: Path, member: str) -> Path:
        return Path(output_dir) / "members" / member


# --------------------------------------------------------------------------- members


def member_config(cfg: DictConfig, member: str, job=None) -> DictConfig:
    """The whole job config with ``model`` replaced by the member's model config (its
    interpolations, e.g. ``${seed}``, still resolve against the job); one model, no ensemble.

    ``job`` (``model.member_jobs.<member>``): keys of the member's own training job merged over
    the job's, e.g. ``trainer.max_epochs`` or ``data.train_stride`` -- a member that only adds
    within-run shape can train on a smaller budget than a model used alone.
    """
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(out):
        out.model = out.model.members[member]
        out.ensemble = {"members": 1}
    if job:
        extra = OmegaConf.create(OmegaConf.to_container(job, resolve=False))
        if "model" in extra:
            raise ValueError(
                f"model.member_jobs.{member}.model: set the member's model under "
                f"model.members.{member}, not in its job overrides"
            )
        out = OmegaConf.merge(out, extra)
    return out


def run_member_fits(member_cfgs: dict, tasks: list, n_jobs: int, name: str, loggers=()) -> list:
    """Fit and predict every (member, data view, folder, is_final) task; their tables in order.

    With ``n_jobs`` > 1 the tasks run in separate processes (-1: one per core this process may
    use, as joblib counts them: CPU affinity and cgroup limits, so a SLURM allocation's cores);
    loggers (W&B) then see no member training curves, only the stack's own results.
    """
    if n_jobs == 1:
        return [
            _fit_predict(
                member_cfgs[m], f"{name}/{m}", view, folder, final, loggers if final else ()
            )
            for m, view, folder, final in tasks
        ]
    from joblib import Parallel, delayed

    return Parallel(n_jobs=n_jobs, backend="loky")(
        delayed(_fit_predict)(member_cfgs[m], f"{name}/{m}", view, folder, final)
        for m, view, folder, final in tasks
    )


def _fit_predict(cfg: DictConfig, name: str, dm, folder: Path, final: bool, loggers=()):
    import lightning as L
    import torch

    stride = (cfg.get("data") or {}).get("train_stride")
    if stride is not None and int(stride) != dm.train_stride:
        dm = copy.copy(dm)  # this member's own training stride (model.member_jobs)
        dm.train_stride, dm._datasets = int(stride), {}

    threads = cfg.get("torch_threads")
    if threads:
        torch.set_num_threads(int(threads))
    L.seed_everything(int(cfg.seed), workers=True)
    folder.mkdir(parents=True, exist_ok=True)
    decoder = make_decoder(cfg, name).fit(dm, folder, loggers)
    if final:
        decoder.save(folder)
    return decoder.predict(dm)


# --------------------------------------------------------------------------- inner folds


def inner_groups(sessions: list, n_folds: int) -> list[list]:
    """``sessions`` (sorted) cut into ``n_folds`` contiguous groups (fewer if fewer sessions)."""
    n = min(int(n_folds), len(sessions))
    bounds = np.linspace(0, len(sessions), n + 1).round().astype(int)
    return [list(sessions[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def inner_views(dm, n_folds: int, n_val: int, seed: int, label: str = "inner") -> list:
    """One data view per inner fold of the outer split's training + validation sessions.

    Each view holds only those sessions' runs (the outer test session is not in it) with a
    split of its own, named ``<outer split>_<label>-<k>``: test = the group, val = ``n_val``
    of the others, train = the rest.
    """
    outer = dm.split
    sessions = sorted(outer.train + outer.val)
    groups = inner_groups(sessions, n_folds)
    if len(groups) < 2:
        raise ValueError(
            f"split {outer.name}: {len(sessions)} training + validation session(s) cannot be "
            f"cut into model.inner_folds={n_folds} inner folds (at least 2 needed)"
        )
    views = []
    for k, group in enumerate(groups):
        rest = [s for s in sessions if s not in group]
        if len(rest) < n_val + 1:
            # groups of one session leave the most to train on: past that, nothing helps
            fewest = n_val + 2
            if len(sessions) < fewest:
                raise ValueError(
                    f"split {outer.name}: {len(sessions)} training + validation session(s) "
                    f"are too few to stack on: an inner fold holds one out and needs {n_val} to "
                    f"validate on and one to train on ({fewest} sessions at least)"
                )
            raise ValueError(
                f"split {outer.name}: inner fold {k} holds out {len(group)} session(s) and "
                f"leaves {len(rest)}, fewer than {n_val} to validate on and one to train on; "
                f"raise model.inner_folds (now {n_folds}, at most {len(sessions)}) so that each "
                "holds out fewer"
            )
        rng = np.random.default_rng([seed, k])
        val = [rest[i] for i in sorted(rng.choice(len(rest), size=n_val, replace=False))]
        train = [s for s in rest if s not in val]
        split = Split(
            name=f"{outer.name}_{label}-{k}",
            train=tuple(train),
            val=tuple(val),
            test=tuple(group),
        )
        views.append(session_view(dm, split))
    return views


def session_view(dm, split: Split):
    """A shallow copy of a set-up data module that holds only ``split``'s sessions' runs."""
    keep = set(split.train + split.val + split.test)
    view = copy.copy(dm)
    view.split = split
    view.runs = [r for r in dm.runs if r.key.session_key in keep]
    view.run_files = [f for f in dm.run_files if f.key.session_key in keep]
    view._datasets = {}
    return view


def _write_inner_predictions(path: Path, tables: dict[str, pd.DataFrame]) -> None:
    write_csv_atomic(
        path, pd.concat([t.assign(model=m) for m, t in tables.items()], ignore_index=True)
    )
