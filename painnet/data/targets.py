"""Pain targets: continuous ratings placed on their own clock and paired with fMRI frames.

Clocks: frame ``f`` covers ``[f·TR, (f+1)·TR)`` seconds after the first stored volume. Rating
sample ``k`` is taken at ``StartTime + k / SamplingFrequency`` (BIDS physio convention). A frame's
rating is the mean of the samples inside its interval; a frame is covered only if its whole
interval lies within the rating recording.

Hemodynamic lag: the brain shows at frame ``f`` what was felt ``lag`` earlier, so the target of
frame ``f`` is the rating of frame ``f − lag_frames`` with ``lag_frames = round(lag_s / TR)``
(the study's 13 frames for 6 s at TR 0.46 s).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from painnet.data.bids import BIDSError, ratings_meta, read_json
from painnet.data.types import RunFiles


def read_ratings(files: RunFiles) -> tuple[np.ndarray, float, float]:
    """(samples, SamplingFrequency, StartTime) of one run's rating recording."""
    fs, start = ratings_meta(files)
    try:
        table = pd.read_csv(files.ratings, sep="\t", header=None, compression="gzip")
    except Exception as err:  # pandas raises several types for malformed files
        raise BIDSError(f"{files.ratings}: cannot read ratings ({err})") from err
    column = 0
    meta_columns = _columns(files)
    if meta_columns and "pain" in meta_columns:
        column = meta_columns.index("pain")
    if table.shape[1] <= column:
        raise BIDSError(f"{files.ratings}: expected a column {column}, got {table.shape[1]}")
    values = pd.to_numeric(table.iloc[:, column], errors="coerce").to_numpy(np.float64)
    if values.size == 0 or np.isnan(values).all():
        raise BIDSError(f"{files.ratings}: no numeric rating samples")
    return values, fs, start


def _columns(files: RunFiles) -> list[str]:
    cols = read_json(files.ratings_json).get("Columns") or []
    return [str(c) for c in cols]


def frame_ratings(
    samples: np.ndarray, fs: float, start_s: float, n_frames: int, tr: float
) -> np.ndarray:
    """Mean rating over each frame's interval; NaN where the interval is not fully covered.

    Where the sampling is slower than the frame rate (no sample inside an interval) the
    rating is linearly interpolated at the frame centre instead.
    """
    samples = np.asarray(samples, dtype=np.float64)
    times = start_s + np.arange(samples.size) / fs
    onsets = np.arange(n_frames) * tr
    ends = onsets + tr

    finite = np.isfinite(samples)
    cumsum = np.concatenate([[0.0], np.cumsum(np.where(finite, samples, 0.0))])
    cumcount = np.concatenate([[0], np.cumsum(finite)])
    lo = np.searchsorted(times, onsets, side="left")
    hi = np.searchsorted(times, ends, side="left")
    count = cumcount[hi] - cumcount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (cumsum[hi] - cumsum[lo]) / count

    sparse = count == 0
    if sparse.any() and finite.sum() >= 2:
        centres = onsets[sparse] + tr / 2
        means[sparse] = np.interp(centres, times[finite], samples[finite])

    last_covered = times[-1] + 1.0 / fs
    covered = (onsets >= times[0] - 1e-9) & (ends <= last_covered + 1e-9)
    means[~covered] = np.nan
    return means


def lag_frames(lag_s: float, tr: float) -> int:
    return int(round(lag_s / tr))


def lagged_targets(frame_rating: np.ndarray, lag: int) -> np.ndarray:
    """target[f] = frame_rating[f − lag]; NaN for the first ``lag`` frames."""
    if lag < 0:
        raise ValueError(f"lag must be >= 0 frames, got {lag}")
    target = np.full(frame_rating.shape, np.nan, dtype=np.float64)
    if lag < frame_rating.size:
        target[lag:] = frame_rating[: frame_rating.size - lag]
    return target


def run_targets(files: RunFiles, n_frames: int, lag_s: float) -> np.ndarray:
    """The lag-paired rating of every frame of a run, float32, NaN where uncovered."""
    samples, fs, start = read_ratings(files)
    per_frame = frame_ratings(samples, fs, start, n_frames, files.tr)
    return lagged_targets(per_frame, lag_frames(lag_s, files.tr)).astype(np.float32)
