"""The runs a self-supervised pretraining job may read, and the DataModule that serves them.

The rule (issue 9): pretraining reads every run available -- rest runs, every session of the
other participants, and of the participant being decoded (the *target*) only the training
sessions of the fold -- so that no held-out session reaches pretraining, not even unlabelled.

- :class:`PretrainSplit` (a split ``_target_`` object, ``kind = "pretrain"``): ``scope: fold``
  excludes the target's test *and* validation sessions of LOSO fold ``fold`` (drawn exactly as
  :func:`painnet.data.splits.loso_split` draws them for the fine-tuning job); ``scope: others``
  excludes every session of the target (one pretraining per participant, cheaper).
  ``monitor`` sessions of the other participants are set aside for the validation loss.
- :class:`PretrainDataModule`: a :class:`painnet.data.datamodule.PainDataModule` whose runs are
  those sessions' runs of every task in ``pretrain_tasks`` (rest runs need no ratings). Training
  windows carry no targets: the labels never reach pretraining. It writes the list of runs it
  read (``pretrain_runs.tsv``) and the session roles (``pretrain_sessions.json``) next to its
  QC table, so the exclusion can be audited in every pretraining job folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from painnet.atomic import write_text_atomic
from painnet.data.bids import BIDSError, discover_runs
from painnet.data.datamodule import PainDataModule
from painnet.data.preprocess import clean_cached, prepare_runs, run_data, run_qc
from painnet.data.splits import SessionKey, loso_split, make_split, sessions_by_subject
from painnet.data.targets import run_targets
from painnet.data.types import RunData, RunFiles

log = logging.getLogger(__name__)
# (derivatives folder, task) pairs already warned about: a loop asks once per job and stage
_WARNED_MISSING_TASKS: set[tuple[str, str]] = set()

SCOPES = ("fold", "others")
RUN_LIST = "pretrain_runs.tsv"
SESSION_LIST = "pretrain_sessions.json"
RUN_LIST_COLUMNS = (
    "subject", "session", "task", "run", "role", "labelled", "targets_read", "n_frames", "bold",
)  # fmt: skip


@dataclass(frozen=True)
class PretrainSessions:
    """Session roles of one pretraining job (``test`` = the monitor sessions it scores).

    ``train``/``val`` list the rating sessions; :meth:`role` also places sessions that hold
    only other tasks' runs (e.g. rest-only sessions): the target's are never read.
    """

    name: str
    subject: str
    train: tuple[SessionKey, ...]
    val: tuple[SessionKey, ...]
    excluded: tuple[SessionKey, ...]

    def __post_init__(self):
        leaked = sorted(set(self.excluded) & set(self.train + self.val))
        if leaked:
            raise ValueError(f"pretraining {self.name}: held-out sessions {leaked} would be read")
        if not self.train:
            raise ValueError(f"pretraining {self.name}: no session to pretrain on")
        if not self.val:
            raise ValueError(
                f"pretraining {self.name}: no monitor session (finetune.pretrain.monitor >= 1 "
                "sessions of other participants are needed for the validation loss)"
            )

    @property
    def test(self) -> tuple[SessionKey, ...]:
        return self.val

    @property
    def fit_sessions(self) -> tuple[SessionKey, ...]:
        return self.train + self.val

    def role(self, key: SessionKey) -> str | None:
        """``train``, ``val`` or None (not read) for any session, listed or not."""
        if key in self.excluded:
            return None
        if key in self.val:
            return "val"
        if key in self.train:
            return "train"
        # A session without rating runs: another participant's is fair game, the target's is
        # not (it cannot be told apart from a held-out one).
        return None if key[0] == self.subject else "train"


@dataclass(frozen=True)
class PretrainSplit:
    """``_target_`` of a pretraining job's split (see the module docstring)."""

    subject: str
    scope: str = "fold"
    fold: int | None = 0
    n_val: int = 1
    monitor: int = 1
    seed: int = 0
    kind = "pretrain"

    def make(self, sessions: Mapping[str, Sequence[str]]) -> PretrainSessions:
        subject = str(self.subject).removeprefix("sub-")
        if self.scope not in SCOPES:
            raise ValueError(f"finetune.pretrain.scope={self.scope!r}: choose one of {SCOPES}")
        if subject not in sessions:
            raise ValueError(f"subject {subject!r} not in the dataset (have {sorted(sessions)})")
        others = [(s, ses) for s in sorted(sessions) if s != subject for ses in sessions[s]]
        if not others:
            raise ValueError(
                f"pretraining for sub-{subject} needs other participants (the validation loss "
                f"is computed on their sessions); the dataset holds only {sorted(sessions)}"
            )
        own = [(subject, ses) for ses in sorted(sessions[subject])]
        name = f"pretrain-{self.scope}_sub-{subject}"
        if self.scope == "fold":
            if self.fold is None:
                raise ValueError("finetune.pretrain.scope=fold needs the fold (split.fold)")
            fold = loso_split(sessions, subject, int(self.fold), int(self.n_val), int(self.seed))
            own_train = list(fold.train)
            name += f"_fold-{int(self.fold)}"
        else:
            own_train = []
        excluded = tuple(k for k in own if k not in own_train)
        if not 1 <= int(self.monitor) <= len(others):
            raise ValueError(
                f"finetune.pretrain.monitor={self.monitor}: must be 1 … {len(others)} (the "
                "other participants' sessions)"
            )
        rng = np.random.default_rng([int(self.seed), 9001])
        picked = set(rng.choice(len(others), size=int(self.monitor), replace=False).tolist())
        monitor = tuple(k for i, k in enumerate(others) if i in picked)
        train = tuple(k for k in others if k not in monitor) + tuple(own_train)
        return PretrainSessions(name, subject, train, monitor, excluded)


class PretrainDataModule(PainDataModule):
    """Windows of the runs a pretraining job may read (see the module docstring).

    ``pretrain_tasks``: tasks whose runs are read (default: ``task`` only); runs of tasks other
    than ``task`` need no ratings. Roles: ``train`` (no targets), ``val`` (monitor sessions, all
    tasks), ``test``/``predict`` (the monitor sessions' rating runs, with targets: the protocol
    scores every job's prediction table).
    """

    def __init__(self, *args, pretrain_tasks: Sequence[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        tasks = [str(t) for t in (pretrain_tasks or [self.discovery["task"]])]
        if any(not t.isalnum() for t in tasks):
            raise ValueError(f"finetune.pretrain.tasks={tasks}: BIDS task labels expected")
        if self.discovery["task"] not in tasks:
            raise ValueError(
                f"finetune.pretrain.tasks={tasks} must include data.task="
                f"{self.discovery['task']!r}: its monitor runs are the ones the job scores"
            )
        self.pretrain_tasks = list(dict.fromkeys(tasks))
        self.roles: list[str] = []

    # -- the run set ----------------------------------------------------------------------
    def pretrain_files(self) -> tuple[PretrainSessions, list[tuple[RunFiles, str]]]:
        """The session roles and every run to read with its role (train / val)."""
        rating = self._discover()
        split = make_split(
            self.split_config, sessions_by_subject([f.key.session_key for f in rating])
        )
        files = list(rating)
        for task in self.pretrain_tasks:
            if task != self.discovery["task"] and self._has_task(task):
                files += self._discover_task(task)
        chosen = [(f, split.role(f.key.session_key)) for f in sorted(files, key=lambda f: f.key)]
        return split, [(f, role) for f, role in chosen if role is not None]

    def _has_task(self, task: str) -> bool:
        """Whether any run of ``task`` exists; a listed task without runs (rest in a dataset
        that has none) is skipped with a warning, so the default task list fits every dataset."""
        deriv = self.root / self.discovery["derivatives"]
        if any(deriv.glob(f"sub-*/**/func/*_task-{task}_*")):
            return True
        if (str(deriv), task) not in _WARNED_MISSING_TASKS:
            _WARNED_MISSING_TASKS.add((str(deriv), task))
            log.warning("finetune.pretrain.tasks lists %r but %s holds no such run", task, deriv)
        return False

    def _discover_task(self, task: str) -> list[RunFiles]:
        options = {k: v for k, v in self.discovery.items() if k not in ("task", "ratings")}
        try:
            return discover_runs(self.root, **options, task=task, require_ratings=False)
        except BIDSError as err:
            raise BIDSError(f"finetune.pretrain.tasks lists {task!r}: {err}") from err

    def _clean_for(self, files: RunFiles):
        return self.clean.for_task(files.key.task)

    # -- stages ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.simulate_spec:
            from painnet.data.simulate import simulate_dataset

            spec = dict(self.simulate_spec)
            simulate_dataset(self.root, spec.pop("preset"), int(spec.pop("seed", 0)), **spec)
        _, chosen = self.pretrain_files()  # only these runs are extracted (never a held-out one)
        for task in self.pretrain_tasks:
            files = [f for f, _ in chosen if f.key.task == task]
            if files:
                clean = self.clean.for_task(task)
                prepare_runs(files, self.atlas, clean, self.cache, self.n_jobs, self.progress)

    def setup(self, stage: str | None = None) -> None:
        if self.runs:
            return
        self.split, chosen = self.pretrain_files()
        self.run_files = [f for f, _ in chosen]
        self.roles = [role for _, role in chosen]
        self.runs = [self._load(f, role) for f, role in chosen]
        from painnet.config_checks import check_window

        if len({r.n_parcels for r in self.runs}) != 1:
            raise ValueError(f"{self.root}: pretraining runs have different parcel counts")
        if len({round(r.tr, 6) for r in self.runs}) != 1:
            raise ValueError(f"{self.root}: pretraining runs have different TRs")
        check_window(self.window_s, self.runs)
        self._datasets = {}
        log.info(
            "pretraining %s: %d runs (%d train, %d monitor), held out %s",
            self.split.name,
            len(self.runs),
            self.roles.count("train"),
            self.roles.count("val"),
            list(self.split.excluded),
        )

    def _load(self, files: RunFiles, role: str) -> RunData:
        arrays = clean_cached(files, self.atlas, self._clean_for(files), self.cache)
        n_frames = arrays["series"].shape[0]
        target = np.full(n_frames, np.nan, dtype=np.float32)
        if role == "val" and files.ratings is not None:  # only the scored monitor runs
            target = run_targets(files, n_frames, self.lag_s, self.ratings)
        return run_data(files, arrays, target)

    # -- roles and loaders ----------------------------------------------------------------
    def runs_in(self, role: str) -> list[int]:
        assert self.split is not None, "call setup() first"
        if role == "test":  # what the job predicts and scores: labelled monitor runs
            return [
                i
                for i, (f, r) in enumerate(zip(self.run_files, self.roles))
                if r == "val" and f.ratings is not None and f.key.task == self.discovery["task"]
            ]
        return [i for i, r in enumerate(self.roles) if r == role]

    _split_label = "pretraining"

    def _targets_only(self, role: str) -> bool:
        return role == "test"  # reconstruction needs no target; "test" scores labelled runs

    # -- audit ----------------------------------------------------------------------------
    def run_table(self) -> pd.DataFrame:
        """One row per run read (``RUN_LIST_COLUMNS``); role is train or val (monitor)."""
        rows = [
            {
                "subject": f.key.subject,
                "session": f.key.session,
                "task": f.key.task,
                "run": f.key.run,
                "role": role,
                "labelled": f.ratings is not None,  # has ratings on disk (never trained on)
                "targets_read": bool(np.isfinite(run.target).any()),  # monitor runs only
                "n_frames": run.n_frames,
                "bold": str(f.bold),
            }
            for f, role, run in zip(self.run_files, self.roles, self.runs)
        ]
        return pd.DataFrame(rows, columns=list(RUN_LIST_COLUMNS))

    def write_qc_table(self, path: str | Path) -> pd.DataFrame:
        """The QC table of the runs read (each cleaned as its task is), plus the run list
        (``pretrain_runs.tsv``) and the session roles (``pretrain_sessions.json``) beside it."""
        assert self.split is not None, "call setup() first"
        folder = Path(path).parent
        qc = pd.DataFrame(
            [run_qc(f, self.atlas, self._clean_for(f), self.cache) for f in self.run_files]
        )
        write_text_atomic(path, qc.to_csv(sep="\t", index=False), mkdir=True)
        write_text_atomic(
            folder / RUN_LIST, self.run_table().to_csv(sep="\t", index=False), mkdir=True
        )
        roles = {
            "name": self.split.name,
            "subject": self.split.subject,
            "train": [list(k) for k in self.split.train],
            "monitor": [list(k) for k in self.split.val],
            "excluded": [list(k) for k in self.split.excluded],
            "tasks": self.pretrain_tasks,
        }
        write_text_atomic(folder / SESSION_LIST, json.dumps(roles, indent=2) + "\n", mkdir=True)
        return qc


def read_run_list(job_dir: str | Path) -> pd.DataFrame:
    """``pretrain_runs.tsv`` of a pretraining job folder (labels as strings)."""
    path = Path(job_dir) / RUN_LIST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a pretraining job folder (no run list)")
    text = {c: str for c in ("subject", "session", "run")}
    return pd.read_csv(path, sep="\t", dtype=text)
