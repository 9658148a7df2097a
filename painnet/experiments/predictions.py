"""The frame-level prediction table: the one output every model ends in.

Columns: subject, session, run, frame, time_s, rating (NaN where the frame is no valid target),
prediction, fold, run_duration_s, model. Evaluation reads nothing else, so deep and classical
models are scored by identical code on identical frames.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

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
    "fold",
    "run_duration_s",
    "model",
]


def prediction_frames(run: RunData, window_length: int) -> np.ndarray:
    """Frames every model predicts: those with a full causal window (the deep model's frames)."""
    return window_ends(run, window_length, targets_only=False)


def run_table(
    run: RunData, frames: np.ndarray, predictions: np.ndarray, fold: str, model: str
) -> pd.DataFrame:
    """Prediction table rows of one run."""
    frames = np.asarray(frames, dtype=np.int64)
    rating = np.where(run.valid_target[frames], run.target[frames], np.nan)
    return pd.DataFrame(
        {
            "subject": run.key.subject,
            "session": run.key.session,
            "run": run.key.run,
            "frame": frames,
            "time_s": run.time_s[frames],
            "rating": rating.astype(np.float64),
            "prediction": np.asarray(predictions, dtype=np.float64),
            "fold": fold,
            "run_duration_s": run.n_frames * run.tr,
            "model": model,
        },
        columns=COLUMNS,
    )


def table_from_frame_predictions(
    runs: Sequence[RunData],
    predictions: Mapping[RunKey, np.ndarray],
    window_length: int,
    fold: str,
    model: str,
) -> pd.DataFrame:
    """Table for models that predict whole runs frame by frame (classical models)."""
    parts = []
    for run in runs:
        frames = prediction_frames(run, window_length)
        parts.append(run_table(run, frames, predictions[run.key][frames], fold, model))
    return pd.concat(parts, ignore_index=True)


def table_from_batches(
    runs: Sequence[RunData], batches: Iterable[Mapping], fold: str, model: str
) -> pd.DataFrame:
    """Table from ``predict_step`` outputs (dicts with run_index, frame, prediction)."""
    run_index = np.concatenate([np.asarray(b["run_index"]) for b in batches])
    frame = np.concatenate([np.asarray(b["frame"]) for b in batches])
    prediction = np.concatenate([np.asarray(b["prediction"], dtype=np.float64) for b in batches])
    parts = []
    for idx in np.unique(run_index):
        sel = run_index == idx
        order = np.argsort(frame[sel])
        parts.append(
            run_table(runs[int(idx)], frame[sel][order], prediction[sel][order], fold, model)
        )
    return pd.concat(parts, ignore_index=True)
