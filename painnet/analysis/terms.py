"""Per-region terms of a prediction, and their averages over the evaluation's time bins.

Edge model (``EdgePCR``): a frame's prediction is ``z(t)ᵀ W z(t) + b`` with ``W`` symmetric, zero
diagonal and ``W_ij = w_e / 2`` for edge ``e = (i, j)``, i.e. ``Σ_e w_e z_i z_j + b``. The study
(cocoanlab/DEIPP ``analysis/analysis_predict_rating_featimp.m:66-69``) forms the edge
contributions ``x_e · w_e``, lays them out as a symmetric region × region matrix
(``Functions/refmt_r.m:15-18``) and sums each column (analysis_predict_rating_featimp.m:88-91).
So **an edge between regions i and j counts in full for both i and j**: region j's term is
``Σ_{i≠j} w_(ij) z_i z_j = 2 z_j (W z)_j``, and the terms of all regions add up to twice the
prediction minus the intercept. (Incidentally ``z_j (W z)_j``, half the study's term, is the
integrated-gradients attribution of region j for the quadratic form with a zero baseline.)

The study computes this on edge features averaged over 1-min bins; the model is linear in the
edges, so averaging frame-level terms over a bin's frames gives the same numbers. Bins are taken
from :func:`painnet.evaluation.bins.bin_predictions`, the evaluation's own rule, so the
importance test starts from the same pooled 1-min r the evaluation reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from painnet.evaluation.bins import bin_predictions, usable_frames, validate_table

ROW = "_importance_row"


@dataclass(frozen=True)
class BinnedTerms:
    """Bin-level view of a pooled prediction table with per-region terms.

    bins: one row per bin (subject, session, run, bin, rating, prediction, n_frames, ...),
    ordered by subject, session, run, bin; terms: (n_bins, P) mean region terms per bin;
    session_of_bin / run_of_bin: contiguous block numbers for the permutations;
    frame_rows: (n_usable,) rows of the input table that the bins average, in bin order;
    frame_bin: (n_usable,) bin of each of those rows.
    """

    bins: pd.DataFrame
    terms: np.ndarray
    session_of_bin: np.ndarray
    run_of_bin: np.ndarray
    frame_rows: np.ndarray
    frame_bin: np.ndarray


def frame_bins(table: pd.DataFrame, bin_size: str = "1min", **bin_options):
    """Which bin each usable frame of ``table`` falls in, by the evaluation's own binning.

    Returns ``(bins, rows, frame_bin)``: the binned table (as ``bin_predictions`` returns it),
    the positional rows of ``table`` that are usable frames (ordered by run, frame) and each
    one's bin (index into ``bins``). Bins are contiguous stretches of usable frames; that is
    checked here by recomputing the bins' mean prediction and rating.
    """
    work = table.reset_index(drop=True).copy()
    work[ROW] = np.arange(len(work))
    bins = bin_predictions(work, bin_size, **bin_options).reset_index(drop=True)
    usable = usable_frames(validate_table(work))
    rows = usable[ROW].to_numpy()
    counts = bins["n_frames"].to_numpy(dtype=np.int64)
    if counts.sum() != rows.size:
        raise RuntimeError(
            f"{bin_size} bins hold {counts.sum()} frames but the table has {rows.size} usable "
            "frames: the evaluation's binning changed in a way this analysis does not follow"
        )
    frame_bin = np.repeat(np.arange(len(bins)), counts)
    for col in ("prediction", "rating"):
        means = np.bincount(frame_bin, usable[col].to_numpy(), len(bins)) / counts
        if not np.allclose(means, bins[col].to_numpy(), rtol=1e-9, atol=1e-12):
            raise RuntimeError(
                f"{bin_size} bins are not contiguous stretches of usable frames in frame order "
                f"({col} means disagree): the evaluation's binning changed"
            )
    return bins, rows, frame_bin


def bin_terms(
    table: pd.DataFrame, frame_terms: np.ndarray, bin_size: str = "1min", **bin_options
) -> BinnedTerms:
    """Average per-frame region terms ``(len(table), P)`` into the evaluation's bins."""
    frame_terms = np.asarray(frame_terms, dtype=np.float64)
    if frame_terms.ndim != 2 or frame_terms.shape[0] != len(table):
        raise ValueError(
            f"frame terms {frame_terms.shape} must be (rows of the table = {len(table)}, regions)"
        )
    bins, rows, frame_bin = frame_bins(table, bin_size, **bin_options)
    order = bins.sort_values(["subject", "session", "run", "bin"], kind="stable").index
    if not np.array_equal(order.to_numpy(), np.arange(len(bins))):
        raise RuntimeError("bins are not ordered by subject, session, run, bin")
    counts = bins["n_frames"].to_numpy(dtype=np.float64)
    terms = np.zeros((len(bins), frame_terms.shape[1]))
    np.add.at(terms, frame_bin, frame_terms[rows])
    terms /= counts[:, None]
    session_of_bin = bins.groupby(["subject", "session"], sort=False).ngroup().to_numpy()
    run_of_bin = bins.groupby(["subject", "session", "run"], sort=False).ngroup().to_numpy()
    return BinnedTerms(bins, terms, session_of_bin, run_of_bin, rows, frame_bin)


def edge_region_terms(series: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Region terms ``2 z_j (W z)_j`` of every frame: series (T, P), W (P, P) → (T, P).

    Each edge counts in full for both of its regions (the study's rule, see the module
    docstring): ``terms.sum(1) == 2 * (prediction - intercept)``.
    """
    z = np.asarray(series, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if z.ndim != 2 or weights.shape != (z.shape[1], z.shape[1]):
        raise ValueError(f"series {z.shape} and weights {weights.shape} do not match")
    if not np.allclose(weights, weights.T) or np.any(np.diag(weights) != 0):
        raise ValueError("edge weights must be a symmetric matrix with a zero diagonal")
    return 2.0 * z * (z @ weights)
