"""The frame-level prediction table: the one hand-off between every decoder and the evaluation.

One row per predicted frame of a held-out run. Columns (``COLUMNS``, in this order):

==============  =====  ======================================================================
subject         str    participant label (no ``sub-`` prefix)
session         str    session label
run             str    run label
frame           int    frame index within the stored run (the window's last frame)
time_s          float  onset of the frame in s
rating          float  the (lagged) rating of the frame; NaN where the frame is no valid target
prediction      float  the decoder's estimate; NaN where it has none
split           str    name of the split that held the run out (e.g. ``loso_sub-01_fold-0``)
run_duration_s  float  full stored run length in s (fixes the number of time bins)
model           str    the decoder's name (``model.name``)
==============  =====  ======================================================================

Scoring needs only ``REQUIRED_COLUMNS``; ``split``, ``run_duration_s`` and ``model`` are
written by every decoder. A frame is *usable* when both its rating and prediction are finite
(:func:`usable_mask`); every bin and metric is computed on usable frames only, so models
compared on one split are scored on identical frames. Frames are keyed by ``FRAME_KEYS``.

Time bins (``BIN_SIZES``): ``1min`` and ``2min`` bins of equal frame count per run (10 / 5 per
600-s run), ``run`` and ``session``. JSON output goes through :func:`json_safe` (NaN → null).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from painnet.data.types import RunData, RunKey
from painnet.data.windows import window_ends

COLUMNS = [
    "subject",
    "session",
    "run",
    "frame",
    "time_s",
    "rating",
    "prediction",
    "split",
    "run_duration_s",
    "model",
]
REQUIRED_COLUMNS = ("subject", "session", "run", "frame", "time_s", "rating", "prediction")
SESSION_KEYS = ["subject", "session"]
RUN_KEYS = ["subject", "session", "run"]
FRAME_KEYS = ["subject", "session", "run", "frame"]
# Seconds per time bin (None: one bin per run / per session).
BIN_SIZES: dict[str, float | None] = {"1min": 60.0, "2min": 120.0, "run": None, "session": None}
BIN_SIZE_NAMES = tuple(BIN_SIZES)
# dtypes to read a predictions.csv back with (labels such as "01" stay strings).
LABEL_DTYPES = {"subject": str, "session": str, "run": str, "split": str, "model": str}


# --------------------------------------------------------------------------- usable frames


def usable_mask(table: pd.DataFrame) -> np.ndarray:
    """True for rows with a finite rating and a finite prediction."""
    rating = pd.to_numeric(table["rating"], errors="coerce").to_numpy(dtype=np.float64)
    prediction = pd.to_numeric(table["prediction"], errors="coerce").to_numpy(dtype=np.float64)
    return np.isfinite(rating) & np.isfinite(prediction)


def prediction_frames(run: RunData, window_length: int) -> np.ndarray:
    """Frames every decoder predicts: those with a full causal window of ``window_length``."""
    return window_ends(run, window_length, targets_only=False)


# --------------------------------------------------------------------------- building


def run_table(
    run: RunData, frames: np.ndarray, predictions: np.ndarray, split: str, model: str
) -> pd.DataFrame:
    """Rows of one run: ``predictions[i]`` is the estimate for ``frames[i]``."""
    frames = np.asarray(frames, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.float64)
    if predictions.shape != frames.shape:
        raise ValueError(
            f"run {run.key}: {predictions.shape[0] if predictions.ndim else 0} predictions for "
            f"{frames.shape[0]} frames"
        )
    rating = np.where(run.valid_target[frames], run.target[frames], np.nan)
    return pd.DataFrame(
        {
            "subject": run.key.subject,
            "session": run.key.session,
            "run": run.key.run,
            "frame": frames,
            "time_s": run.time_s[frames],
            "rating": rating.astype(np.float64),
            "prediction": predictions,
            "split": split,
            "run_duration_s": run.n_frames * run.tr,
            "model": model,
        },
        columns=COLUMNS,
    )


def table_from_frame_predictions(
    runs: Sequence[RunData],
    predictions: Mapping[RunKey, np.ndarray],
    window_length: int,
    split: str,
    model: str,
) -> pd.DataFrame:
    """Table of decoders that predict whole runs frame by frame (one array per run)."""
    parts = []
    for run in runs:
        if run.key not in predictions:
            raise ValueError(f"no predictions for held-out run {run.key}")
        frames = prediction_frames(run, window_length)
        parts.append(run_table(run, frames, predictions[run.key][frames], split, model))
    return pd.concat(parts, ignore_index=True)


def table_from_batches(
    runs: Sequence[RunData], batches: Iterable[Mapping], split: str, model: str
) -> pd.DataFrame:
    """Table from ``predict_step`` outputs (dicts with run_index, frame, prediction).

    A frame predicted twice (e.g. gathered twice across processes) is an error, not averaged.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("no prediction batches: the held-out runs yielded no window")
    run_index = np.concatenate([np.asarray(b["run_index"]) for b in batches])
    frame = np.concatenate([np.asarray(b["frame"]) for b in batches])
    prediction = np.concatenate([np.asarray(b["prediction"], dtype=np.float64) for b in batches])
    parts = []
    for idx in np.unique(run_index):
        sel = run_index == idx
        order = np.argsort(frame[sel], kind="stable")
        frames = frame[sel][order]
        if np.any(np.diff(frames) == 0):
            raise ValueError(f"run {runs[int(idx)].key}: a frame was predicted twice")
        parts.append(run_table(runs[int(idx)], frames, prediction[sel][order], split, model))
    return pd.concat(parts, ignore_index=True)


def mean_table(tables: Sequence[pd.DataFrame], model: str) -> pd.DataFrame:
    """The frame-wise mean prediction of several tables of the same frames (an ensemble)."""
    if not tables:
        raise ValueError("mean_table: no tables")
    first = tables[0]
    for i, other in enumerate(tables[1:], 1):
        if (
            len(other) != len(first)
            or not (other[FRAME_KEYS].to_numpy() == first[FRAME_KEYS].to_numpy()).all()
        ):
            raise ValueError(f"mean_table: table {i} does not hold the frames of table 0")
    out = first.copy()
    out["prediction"] = np.mean([t["prediction"].to_numpy(np.float64) for t in tables], axis=0)
    out["model"] = model
    return out


# --------------------------------------------------------------------------- files


def read_table(path: str | Path) -> pd.DataFrame:
    """A predictions.csv read back with string labels; ValueError names a missing column."""
    path = Path(path)
    table = pd.read_csv(path, dtype=LABEL_DTYPES)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a prediction table, missing column(s) {missing}")
    return table


def json_value(value):
    """One value made JSON-safe: numpy scalars as Python numbers, NaN/inf as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_safe(record: Mapping) -> dict:
    """Copy of a flat record with every value passed through :func:`json_value`."""
    return {key: json_value(value) for key, value in record.items()}
