"""Splits by session, never by window.

A :class:`Split` names the sessions (subject, session) used for training, validation (early
stopping of deep models; classical models fold it into training and run their own inner CV) and
testing. Every split guarantees that no session appears in two roles and that there is at least
one training and one test session.

A split *config* is a ``_target_`` object (``conf/split/*.yaml``) with one method,
``make(sessions) -> Split``, and a ``kind`` label used in tables:

- :class:`LeaveOneSessionOut` (``loso``): fold k holds out the subject's k-th session;
  ``n_val`` validation sessions are drawn (seeded) from the remaining ones.
- :class:`CrossSubject` (``cross_subject``): all sessions of the training subjects → all
  sessions of the test subjects (default: every other participant).
- :class:`DataSize` (``data_size``): inside LOSO fold k, ``n_train`` training sessions drawn at
  random (``repeat`` is the draw's seed) or the first ``n_train`` in time (``mode: first``);
  validation sessions come from the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SessionKey = tuple[str, str]


@dataclass(frozen=True)
class Split:
    name: str
    train: tuple[SessionKey, ...]
    val: tuple[SessionKey, ...]
    test: tuple[SessionKey, ...]

    def __post_init__(self):
        roles = {"train": self.train, "val": self.val, "test": self.test}
        seen: dict[SessionKey, str] = {}
        for role, keys in roles.items():
            for key in keys:
                if key in seen:
                    raise ValueError(
                        f"split {self.name}: session {key} is in both {seen[key]} and {role}"
                    )
                seen[key] = role
        if not self.train:
            raise ValueError(f"split {self.name}: no training session")
        if not self.test:
            raise ValueError(f"split {self.name}: no test session")

    def role(self, key: SessionKey) -> str | None:
        for role in ("train", "val", "test"):
            if key in getattr(self, role):
                return role
        return None

    @property
    def fit_sessions(self) -> tuple[SessionKey, ...]:
        """Training plus validation sessions (what a model with inner CV trains on)."""
        return self.train + self.val


def sessions_by_subject(keys: Sequence[SessionKey]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for subject, session in sorted(set(keys)):
        out.setdefault(subject, []).append(session)
    return out


def _subject_sessions(sessions: Mapping[str, Sequence[str]], subject: str) -> list[str]:
    subject = str(subject).removeprefix("sub-")
    if subject not in sessions:
        raise ValueError(f"subject {subject!r} not in the dataset (have {sorted(sessions)})")
    return sorted(sessions[subject])


def _draw(rng: np.random.Generator, pool: Sequence[str], n: int) -> list[str]:
    return sorted(rng.choice(list(pool), size=n, replace=False).tolist()) if n else []


def loso_split(
    sessions: Mapping[str, Sequence[str]], subject: str, fold: int, n_val: int = 1, seed: int = 0
) -> Split:
    subject = str(subject).removeprefix("sub-")
    own = _subject_sessions(sessions, subject)
    if not 0 <= fold < len(own):
        raise ValueError(f"fold {fold} out of range: subject {subject} has {len(own)} sessions")
    if len(own) < 2 + n_val:
        raise ValueError(
            f"subject {subject} has {len(own)} sessions; LOSO with n_val={n_val} needs {2 + n_val}"
        )
    test = own[fold]
    rest = [s for s in own if s != test]
    rng = np.random.default_rng([seed, fold])
    val = _draw(rng, rest, n_val)
    train = [s for s in rest if s not in val]
    return Split(
        name=f"loso_sub-{subject}_fold-{fold}",
        train=tuple((subject, s) for s in train),
        val=tuple((subject, s) for s in val),
        test=((subject, test),),
    )


def cross_subject_split(
    sessions: Mapping[str, Sequence[str]],
    train_subjects: Sequence[str],
    test_subjects: Sequence[str],
    n_val: int = 1,
    seed: int = 0,
) -> Split:
    train_subjects = [str(s).removeprefix("sub-") for s in train_subjects]
    test_subjects = [str(s).removeprefix("sub-") for s in test_subjects]
    if not test_subjects:
        raise ValueError(
            f"split.test_subjects: no participant to test on; the training participants are "
            f"{train_subjects} and the dataset holds {sorted(sessions)}. A cross-subject split "
            "needs at least 2 participants"
        )
    overlap = set(train_subjects) & set(test_subjects)
    if overlap:
        raise ValueError(f"cross-subject split: subjects {sorted(overlap)} both train and test")
    pool = [(sub, ses) for sub in train_subjects for ses in _subject_sessions(sessions, sub)]
    rng = np.random.default_rng(seed)
    val_idx = set(rng.choice(len(pool), size=min(n_val, len(pool) - 1), replace=False).tolist())
    return Split(
        name=f"cross_train-{'+'.join(train_subjects)}_test-{'+'.join(test_subjects)}",
        train=tuple(k for i, k in enumerate(pool) if i not in val_idx),
        val=tuple(k for i, k in enumerate(pool) if i in val_idx),
        test=tuple((sub, ses) for sub in test_subjects for ses in _subject_sessions(sessions, sub)),
    )


def data_size_split(
    sessions: Mapping[str, Sequence[str]],
    subject: str,
    fold: int,
    n_train: int,
    repeat: int = 0,
    n_val: int = 1,
    mode: str = "random",
    seed: int = 0,
) -> Split:
    subject = str(subject).removeprefix("sub-")
    own = _subject_sessions(sessions, subject)
    if not 0 <= fold < len(own):
        raise ValueError(f"fold {fold} out of range: subject {subject} has {len(own)} sessions")
    test = own[fold]
    rest = [s for s in own if s != test]
    if not 1 <= n_train <= len(rest) - n_val:
        raise ValueError(
            f"n_train={n_train} impossible: subject {subject} has {len(rest)} non-test sessions"
            f" and n_val={n_val} are kept for validation"
        )
    rng = np.random.default_rng([seed, fold, n_train, repeat])
    if mode == "random":
        train = _draw(rng, rest, n_train)
    elif mode == "first":
        train = rest[:n_train]
    else:
        raise ValueError(f"data_size mode must be 'random' or 'first', got {mode!r}")
    val = _draw(rng, [s for s in rest if s not in train], n_val)
    return Split(
        name=f"size_sub-{subject}_fold-{fold}_n-{n_train}_rep-{repeat}_{mode}",
        train=tuple((subject, s) for s in train),
        val=tuple((subject, s) for s in val),
        test=((subject, test),),
    )


@dataclass(frozen=True)
class LeaveOneSessionOut:
    """``split=loso``: within-subject leave-one-session-out, fold ``fold`` of ``subject``."""

    subject: str | None = None
    fold: int = 0
    n_val: int = 1
    seed: int = 0
    kind = "loso"

    def make(self, sessions: Mapping[str, Sequence[str]]) -> Split:
        subject = self.subject or sorted(sessions)[0]
        return loso_split(sessions, subject, int(self.fold), int(self.n_val), int(self.seed))


@dataclass(frozen=True)
class CrossSubject:
    """``split=cross_subject``: train on ``train_subjects``, test on ``test_subjects``
    (None = every other participant of the dataset)."""

    train_subjects: Sequence[str] = ("01",)
    test_subjects: Sequence[str] | None = None
    n_val: int = 1
    seed: int = 0
    kind = "cross_subject"

    def make(self, sessions: Mapping[str, Sequence[str]]) -> Split:
        train = [str(s).removeprefix("sub-") for s in self.train_subjects]
        test = self.test_subjects
        if test is None:
            test = [s for s in sorted(sessions) if s not in train]
        return cross_subject_split(sessions, train, list(test), int(self.n_val), int(self.seed))


@dataclass(frozen=True)
class DataSize:
    """``split=data_size``: ``n_train`` sessions of LOSO fold ``fold`` (draw ``repeat``)."""

    subject: str | None = None
    fold: int = 0
    n_train: int = 2
    repeat: int = 0
    mode: str = "random"
    n_val: int = 1
    seed: int = 0
    kind = "data_size"

    def make(self, sessions: Mapping[str, Sequence[str]]) -> Split:
        subject = self.subject or sorted(sessions)[0]
        return data_size_split(
            sessions,
            subject,
            int(self.fold),
            int(self.n_train),
            int(self.repeat),
            int(self.n_val),
            str(self.mode),
            int(self.seed),
        )


def splitter(config) -> LeaveOneSessionOut | CrossSubject | DataSize:
    """The split object of a config node (``_target_`` + fields) or the object itself."""
    if hasattr(config, "make"):
        return config
    if not isinstance(config, Mapping) or "_target_" not in config:
        keys = sorted(config) if isinstance(config, Mapping) else type(config).__name__
        raise ValueError(
            f"split: expected a config with _target_ (e.g. painnet.data.splits."
            f"LeaveOneSessionOut, see conf/split/*.yaml), got {keys}"
        )
    from hydra.utils import get_class
    from omegaconf import DictConfig, OmegaConf

    fields = (
        OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config
    )
    fields = dict(fields)
    target = fields.pop("_target_")
    try:
        made = get_class(target)(**fields)  # split configs are flat: no nested _target_
    except TypeError as err:
        raise ValueError(f"split (_target_={target}): {err}") from err
    if not hasattr(made, "make"):
        raise ValueError(f"split._target_={config['_target_']} has no make(sessions) method")
    return made


def make_split(config, sessions: Mapping[str, Sequence[str]]) -> Split:
    """The :class:`Split` of a split config (``conf/split/*.yaml``) on a dataset's sessions."""
    return splitter(config).make(sessions)
