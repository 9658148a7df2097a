"""Pain targets: continuous ratings placed on their own clock and paired with fMRI frames.

Clocks: frame ``f`` covers ``[f·TR, (f+1)·TR)`` seconds after the first stored volume. Rating
sample ``k`` is taken at ``StartTime + k / SamplingFrequency`` (BIDS physio convention).

Alignment (``data.rating_alignment``):

- ``interval_mean`` (default): a frame's rating is the mean of the samples inside its interval; a
  frame is covered only if its whole interval lies within the recording. Where the sampling is
  slower than the frame rate (no sample inside an interval) the rating is interpolated linearly
  at the frame centre between the two neighbouring samples.
- ``midpoint``: the rating interpolated linearly at each frame's centre ``(f + 0.5)·TR``, as the
  reference study does (cocoanlab/DEIPP analysis/analysis_rating.m:74-75, ``interp1`` of the
  rating trace at ``… + 0.5*TR : TR : …``, NaN outside the recorded span).

Gaps: samples that are missing, non-numeric or non-finite are gaps. A gap no longer than
``data.max_rating_gap_s`` (between the finite samples that frame it) is bridged linearly; a
longer one is left empty, and every frame that needs a sample inside it has no rating (NaN), so
it is never trained on or scored. Nothing is extrapolated.

Scale: ratings must lie in ``data.rating_range`` (default [0, 1]). A file outside it is an error
naming the file and the observed range; ``data.rating_rescale: [lo, hi]`` declares the scale the
files are written in (e.g. [0, 100]) and maps it linearly onto ``data.rating_range``.

Hemodynamic lag: the brain shows at frame ``f`` what was felt ``lag`` earlier, so the target of
frame ``f`` is the rating of frame ``f − lag_frames`` with ``lag_frames = round(lag_s / TR)``
(the study's 13 frames for 6 s at TR 0.46 s).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from painnet.data.bids import BIDSError, ratings_meta, read_json, read_ratings_text
from painnet.data.types import RunFiles

log = logging.getLogger(__name__)

ALIGNMENTS = ("interval_mean", "midpoint")
# Cells that BIDS and common tools write for "no value": a gap, not a malformed file.
MISSING_MARKERS = {"", "n/a", "na", "nan", "NaN", "NA", "N/A"}
# Rounding slack when comparing ratings with the declared range.
RANGE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class RatingSpec:
    """How ratings are read and aligned (the ``data.rating_*`` keys).

    column:     name of the rating column in the sidecar's ``Columns`` (``data.rating_column``).
    max_gap_s:  longest gap bridged by linear interpolation (``data.max_rating_gap_s``).
    valid_range: the scale ratings must lie on (``data.rating_range``).
    rescale:    the scale the files are written in, mapped linearly onto ``valid_range``
                (``data.rating_rescale``); None = files are already on ``valid_range``.
    alignment:  ``interval_mean`` or ``midpoint`` (``data.rating_alignment``).
    """

    column: str = "pain"
    max_gap_s: float = 1.0
    valid_range: tuple[float, float] = (0.0, 1.0)
    rescale: tuple[float, float] | None = None
    alignment: str = "interval_mean"

    def __post_init__(self):
        if not isinstance(self.column, str) or not self.column:
            raise ValueError(f"data.rating_column must be a non-empty string, got {self.column!r}")
        if not self.max_gap_s >= 0:
            raise ValueError(f"data.max_rating_gap_s must be >= 0, got {self.max_gap_s!r}")
        object.__setattr__(self, "valid_range", _pair("data.rating_range", self.valid_range))
        if self.rescale is not None:
            object.__setattr__(self, "rescale", _pair("data.rating_rescale", self.rescale))
        if self.alignment not in ALIGNMENTS:
            raise ValueError(
                f"data.rating_alignment must be one of {list(ALIGNMENTS)}, got {self.alignment!r}"
            )


def _pair(key: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be two numbers [low, high], got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"{key} must be two finite numbers with low < high, got {value!r}")
    return lo, hi


# --------------------------------------------------------------------------- reading


def rating_column_index(files: RunFiles, column: str, n_columns: int) -> int:
    """Index of ``column`` in the sidecar's ``Columns``; an error lists the columns otherwise."""
    meta = read_json(files.ratings_json)
    columns = meta.get("Columns")
    if not isinstance(columns, list) or not columns:
        raise BIDSError(
            f"{files.ratings_json}: no 'Columns' list; BIDS physio sidecars must name the columns"
            f' of {files.ratings.name}, e.g. "Columns": ["{column}"] (painnet picks the'
            " rating column by name, data.rating_column)"
        )
    names = [str(c) for c in columns]
    if len(names) != n_columns:
        raise BIDSError(
            f"{files.ratings_json}: 'Columns' names {len(names)} column(s) {names} but"
            f" {files.ratings.name} has {n_columns}"
        )
    hits = [i for i, name in enumerate(names) if name == column]
    if len(hits) != 1:
        what = "no column" if not hits else f"{len(hits)} columns"
        raise BIDSError(
            f"{files.ratings_json}: {what} named {column!r} (data.rating_column) among the"
            f" columns {names} of {files.ratings.name}; set data.rating_column to one of them"
        )
    return hits[0]


def read_ratings(
    files: RunFiles, spec: RatingSpec | None = None
) -> tuple[np.ndarray, float, float]:
    """(samples on ``spec.valid_range`` with NaN for gaps, SamplingFrequency, StartTime)."""
    spec = spec or RatingSpec()
    fs, start = ratings_meta(files)
    text = read_ratings_text(files.ratings)
    try:
        table = pd.read_csv(
            io.StringIO(text),
            sep="\t",
            header=None,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,  # a blank line is a missing sample: dropping it shifts time
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise BIDSError(f"{files.ratings}: cannot read ratings ({err})") from err
    column = rating_column_index(files, spec.column, table.shape[1])
    cells = table.iloc[:, column].fillna("").str.strip()  # a blank line reads as NaN
    values = pd.to_numeric(cells, errors="coerce").to_numpy(np.float64, copy=True)
    names = [str(c) for c in read_json(files.ratings_json)["Columns"]]
    if table.shape[0] and list(table.iloc[0].str.strip()) == names:
        raise BIDSError(
            f"{files.ratings}: first row repeats the column names {names}; BIDS physio files"
            " have no header row (the names belong in the sidecar's 'Columns')"
        )
    junk = ~np.isfinite(values) & ~cells.isin(MISSING_MARKERS).to_numpy()
    if junk.any():
        first = int(np.flatnonzero(junk)[0])
        log.warning(
            "%s: %d non-numeric or infinite rating sample(s) treated as gaps (first: row %d, %r)",
            files.ratings,
            int(junk.sum()),
            first + 1,
            cells.iloc[first],
        )
    values[~np.isfinite(values)] = np.nan
    if values.size == 0 or np.isnan(values).all():
        raise BIDSError(f"{files.ratings}: no numeric rating samples in column {spec.column!r}")
    return check_scale(values, spec, str(files.ratings)), fs, start


def check_scale(values: np.ndarray, spec: RatingSpec, source: str) -> np.ndarray:
    """Ratings mapped onto ``spec.valid_range``; an error names the source and observed range."""
    lo, hi = spec.rescale or spec.valid_range
    seen_lo, seen_hi = float(np.nanmin(values)), float(np.nanmax(values))
    slack = RANGE_TOLERANCE * (hi - lo)
    if seen_lo < lo - slack or seen_hi > hi + slack:
        if spec.rescale:
            where = f"data.rating_rescale={list(spec.rescale)}"
            hint = "fix data.rating_rescale"
        else:
            where = f"data.rating_range={list(spec.valid_range)}"
            hint = (
                "if the files use another scale, declare it, e.g. data.rating_rescale=[0,100]"
                " maps 0–100 onto data.rating_range"
            )
        raise BIDSError(
            f"{source}: ratings span [{seen_lo:g}, {seen_hi:g}], outside {where}; {hint}"
        )
    if spec.rescale is None:
        return values
    out_lo, out_hi = spec.valid_range
    return out_lo + (values - lo) * (out_hi - out_lo) / (hi - lo)


# --------------------------------------------------------------------------- gaps and alignment


def bridge_gaps(samples: np.ndarray, fs: float, max_gap_s: float) -> np.ndarray:
    """Samples with gaps of at most ``max_gap_s`` (between finite neighbours) interpolated.

    A gap's length is the time between the finite samples on either side of it, so a single
    missing sample at 60 Hz is a 2/60-s gap. Gaps at either end of the recording stay NaN.
    """
    out = np.asarray(samples, dtype=np.float64).copy()
    finite = np.isfinite(out)
    if finite.all() or finite.sum() < 2:
        return out
    idx = np.flatnonzero(finite)
    before, after = idx[:-1], idx[1:]
    for a, b in zip(before[after - before > 1], after[after - before > 1]):
        if (b - a) / fs <= max_gap_s + 1e-9:
            out[a + 1 : b] = np.interp(np.arange(a + 1, b), [a, b], [out[a], out[b]])
    return out


def _interp_between_finite(times: np.ndarray, samples: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Linear interpolation at ``at``; NaN where a neighbouring sample is NaN or out of span."""
    if times.size == 1:
        return np.where(np.isclose(at, times[0]) & np.isfinite(samples[0]), samples[0], np.nan)
    out = np.full(at.shape, np.nan)
    inside = (at >= times[0] - 1e-9) & (at <= times[-1] + 1e-9)
    right = np.clip(np.searchsorted(times, at, side="left"), 1, times.size - 1)
    left = right - 1
    ok = inside & np.isfinite(samples[left]) & np.isfinite(samples[right])
    t0, t1 = times[left[ok]], times[right[ok]]
    w = np.clip((at[ok] - t0) / (t1 - t0), 0.0, 1.0)
    out[ok] = samples[left[ok]] * (1 - w) + samples[right[ok]] * w
    return out


def frame_ratings(
    samples: np.ndarray,
    fs: float,
    start_s: float,
    n_frames: int,
    tr: float,
    *,
    max_gap_s: float = RatingSpec.max_gap_s,
    alignment: str = RatingSpec.alignment,
) -> np.ndarray:
    """The rating of each frame (see the module docstring); NaN where it is not covered."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {list(ALIGNMENTS)}, got {alignment!r}")
    samples = bridge_gaps(samples, fs, max_gap_s)
    times = start_s + np.arange(samples.size) / fs
    onsets = np.arange(n_frames) * tr
    centres = onsets + tr / 2
    if alignment == "midpoint":
        return _interp_between_finite(times, samples, centres)

    ends = onsets + tr
    finite = np.isfinite(samples)
    cumsum = np.concatenate([[0.0], np.cumsum(np.where(finite, samples, 0.0))])
    cumcount = np.concatenate([[0], np.cumsum(finite)])
    cumgap = np.concatenate([[0], np.cumsum(~finite)])
    lo = np.searchsorted(times, onsets, side="left")
    hi = np.searchsorted(times, ends, side="left")
    count = cumcount[hi] - cumcount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (cumsum[hi] - cumsum[lo]) / count
    # A frame that overlaps an unbridged gap has no real coverage for part of its interval.
    means[(cumgap[hi] - cumgap[lo]) > 0] = np.nan

    sparse = (hi - lo) == 0
    if sparse.any():
        means[sparse] = _interp_between_finite(times, samples, centres[sparse])

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


def run_targets(
    files: RunFiles, n_frames: int, lag_s: float, spec: RatingSpec | None = None
) -> np.ndarray:
    """The lag-paired rating of every frame of a run, float32, NaN where uncovered."""
    spec = spec or RatingSpec()
    samples, fs, start = read_ratings(files, spec)
    per_frame = frame_ratings(
        samples, fs, start, n_frames, files.tr, max_gap_s=spec.max_gap_s, alignment=spec.alignment
    )
    return lagged_targets(per_frame, lag_frames(lag_s, files.tr)).astype(np.float32)
