"""Plain data records shared by every stage of the data flow.

Frames are always indexed as stored in the BOLD file (frame 0 = first stored volume): stages
mark frames invalid instead of removing them, so no index ever silently shifts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True, order=True)
class RunKey:
    """Identity of one functional run (BIDS entities, labels without their prefixes)."""

    subject: str
    session: str
    task: str
    run: str

    @property
    def session_key(self) -> tuple[str, str]:
        return (self.subject, self.session)

    def bids_prefix(self) -> str:
        return f"sub-{self.subject}_ses-{self.session}_task-{self.task}_run-{self.run}"


@dataclass(frozen=True)
class RunFiles:
    """The files of one run, paired by discovery.

    ``kind`` says how to read ``bold``: ``nifti`` (4D volume), ``cifti`` (dtseries) or
    ``tsv`` (already parcellated, one column per parcel). ``tr_source`` says where ``tr`` came
    from (the sidecar, or the image header when there is none), for error messages.
    """

    key: RunKey
    bold: Path
    bold_json: Path | None
    confounds: Path | None
    ratings: Path
    ratings_json: Path
    kind: str
    tr: float
    tr_source: str = ""


@dataclass
class RunData:
    """One cleaned run, ready for windows and models.

    series:  (T, P) float32, cleaned and z-scored over the run's kept frames; 0.0 (the
             z-scored mean) on frames that are dropped or censored.
    kept:    (T,) bool, frame survived the initial drop and motion censoring.
    target:  (T,) float32, the rating paired with frame t (rating of frame t - lag); NaN where
             frame t cannot be a target (not kept, or no rating coverage).
    time_s:  (T,) float64, onset time of each frame relative to the first stored volume.
    """

    key: RunKey
    tr: float
    series: np.ndarray
    kept: np.ndarray
    target: np.ndarray
    time_s: np.ndarray
    parcel_names: list[str] = field(default_factory=list)

    @property
    def n_frames(self) -> int:
        return int(self.series.shape[0])

    @property
    def n_parcels(self) -> int:
        return int(self.series.shape[1])

    @property
    def valid_target(self) -> np.ndarray:
        """Frames that may serve as training/evaluation targets."""
        return self.kept & np.isfinite(self.target)

    @property
    def first_kept(self) -> int:
        idx = np.flatnonzero(self.kept)
        return int(idx[0]) if idx.size else self.n_frames
