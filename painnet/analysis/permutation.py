"""Hierarchical permutations of time bins and the importance statistics built on them.

The reference study (cocoanlab/DEIPP, ``analysis/analysis_predict_rating_featimp.m``)
measures a region's importance by shuffling that region's share of the prediction across the
1-min bins (lines 56-57) of all held-out sessions and recording how much the pooled correlation
with the ratings drops. Its shuffle is hierarchical (lines 73-84): the order of the sessions is
permuted, then the order of the runs inside each session, then the order of the bins inside each
run, so a run's bins always move together into one run and a session's runs into one session.

:func:`hierarchical_permutations` draws such shuffles for bins nested in runs nested in
sessions. The study's arrays are balanced (every run has the same number of bins, every session
the same number of runs). Here runs and sessions may differ: a session is only exchanged with
sessions of the same *shape* (the multiset of its runs' bin counts) and a run only with runs of
the same bin count, so every draw is still a permutation of the observed bins. On a balanced
design this is exactly the study's scheme.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

# Values of a (chunk, bins, regions) float64 block evaluated at once (32 MB).
_CHUNK_VALUES = 4_000_000


def _check_nesting(session_of_bin: np.ndarray, run_of_bin: np.ndarray) -> None:
    if session_of_bin.shape != run_of_bin.shape or session_of_bin.ndim != 1:
        raise ValueError(
            f"session_of_bin {session_of_bin.shape} and run_of_bin {run_of_bin.shape} must be "
            "1-D arrays of the same length"
        )
    if session_of_bin.size == 0:
        raise ValueError("no bins to permute")
    # bins of a run are contiguous, runs of a session are contiguous, ids count up from 0
    for name, ids in (("session", session_of_bin), ("run", run_of_bin)):
        steps = np.diff(ids)
        if ids[0] != 0 or not np.all((steps == 0) | (steps == 1)):
            raise ValueError(
                f"{name}_of_bin must number contiguous blocks 0, 1, 2, ... in order "
                "(sort bins by session, run, bin first)"
            )
    if np.any(np.diff(session_of_bin)[np.diff(run_of_bin) == 0] != 0):
        raise ValueError("a run's bins span two sessions")


def hierarchical_permutations(
    session_of_bin: np.ndarray, run_of_bin: np.ndarray, n_perm: int, rng: np.random.Generator
) -> np.ndarray:
    """Source bin of every bin in ``n_perm`` hierarchical shuffles: ``(n_perm, n_bins)`` int64.

    Row ``k`` maps each bin position ``i`` to the bin whose value it receives (``values[src]``).
    Sessions are permuted among sessions of the same shape, runs inside a session among runs of
    the same bin count, bins inside a run (see the module docstring). ``session_of_bin`` and
    ``run_of_bin`` number contiguous blocks 0, 1, 2, ... (bins sorted by session, run, bin).
    """
    session_of_bin = np.asarray(session_of_bin, dtype=np.int64)
    run_of_bin = np.asarray(run_of_bin, dtype=np.int64)
    _check_nesting(session_of_bin, run_of_bin)
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    n_bins = run_of_bin.size
    bins_per_run = np.bincount(run_of_bin)
    bin_start = np.r_[0, np.cumsum(bins_per_run)[:-1]]
    session_of_run = session_of_bin[bin_start]
    n_sessions = int(session_of_run.max()) + 1

    # runs of each session, grouped by bin count (in order)
    runs_by_count: list[dict[int, list[int]]] = [defaultdict(list) for _ in range(n_sessions)]
    for run, session in enumerate(session_of_run):
        runs_by_count[session][int(bins_per_run[run])].append(run)
    shapes: dict[tuple, list[int]] = defaultdict(list)
    for session, groups in enumerate(runs_by_count):
        shapes[_shape(groups)].append(session)

    # 1. sessions: each target session receives a source session of the same shape
    src_session = np.empty((n_perm, n_sessions), dtype=np.int64)
    for members in shapes.values():
        members = np.asarray(members)
        order = np.argsort(rng.random((n_perm, members.size)), axis=1)
        src_session[:, members] = members[order]

    # 2. runs: the k-th run of count c of a target session receives one of the source session's
    #    runs of count c, in a random order
    src_run = np.empty((n_perm, run_of_bin[-1] + 1), dtype=np.int64)
    for session, groups in enumerate(runs_by_count):
        for count, targets in groups.items():
            table = np.full((n_sessions, len(targets)), -1, dtype=np.int64)
            for other in shapes[_shape(runs_by_count[session])]:
                table[other] = runs_by_count[other][count]
            order = np.argsort(rng.random((n_perm, len(targets))), axis=1)
            chosen = table[src_session[:, session][:, None], order]
            src_run[:, targets] = chosen

    # 3. bins: a random order of the source run's bins
    src = np.empty((n_perm, n_bins), dtype=np.int64)
    for run in range(bins_per_run.size):
        count, start = int(bins_per_run[run]), int(bin_start[run])
        order = np.argsort(rng.random((n_perm, count)), axis=1)
        src[:, start : start + count] = bin_start[src_run[:, run]][:, None] + order
    return src


def _shape(groups: dict[int, list[int]]) -> tuple:
    return tuple(sorted((c, len(r)) for c, r in groups.items()))


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of two 1-D arrays; NaN if either is constant."""
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc @ xc) * (yc @ yc))
    return float(xc @ yc / denom) if denom > 0 else float("nan")


@dataclass(frozen=True)
class ImportanceResult:
    """Per-region importance from a permutation test (regions in the order of the terms).

    importance: (P,) mean over permutations of ``r_original - r_permuted``;
    ci_low/ci_high: (P,) 2.5th / 97.5th percentiles of that drop over the permutations;
    p: (P,) two-sided permutation p-value of the drop (see :func:`permutation_p`);
    r_original: pooled r of the unpermuted prediction with the ratings; n_perm: permutations.
    """

    importance: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p: np.ndarray
    r_original: float
    n_perm: int


def permutation_p(drops: np.ndarray) -> np.ndarray:
    """Two-sided p of drops ``(P, n_perm)`` against 0: ``min(1, 2·min(k≤+1, k≥+1)/(n+1))``.

    The study's earlier version of the analysis (commit 1c4dbf7,
    ``analysis/analysis_predict_rating_func_featimp.m:113-114``; the final script reports no p)
    computes ``p1 = (#drops ≤ 0 + 1)/(n+1)`` and
    ``2·min(p1, 1 - p1)``; that gives p = 0 for a region whose term is identically zero (every
    drop is 0, so ``p1 = 1``). Counting the ties on both sides, as here, gives p = 1 there and the
    same value as the study whenever no drop is exactly 0.
    """
    n = drops.shape[1]
    low = (np.sum(drops <= 0, axis=1) + 1) / (n + 1)
    high = (np.sum(drops >= 0, axis=1) + 1) / (n + 1)
    return np.minimum(1.0, 2.0 * np.minimum(low, high))


def summarize_drops(drops: np.ndarray, r_original: float) -> ImportanceResult:
    """Importance, percentile interval and p from drops ``(P, n_perm)``."""
    return ImportanceResult(
        importance=drops.mean(axis=1),
        ci_low=np.percentile(drops, 2.5, axis=1),
        ci_high=np.percentile(drops, 97.5, axis=1),
        p=permutation_p(drops),
        r_original=float(r_original),
        n_perm=int(drops.shape[1]),
    )


def term_permutation_drops(
    total: np.ndarray, terms: np.ndarray, rating: np.ndarray, src: np.ndarray
) -> tuple[float, np.ndarray]:
    """The study's region test on bin-level prediction terms, without refitting anything.

    total: (n,) the prediction of each bin; terms: (n, P) each region's share of it; rating:
    (n,) the bins' ratings; src: (n_perm, n) permutations from :func:`hierarchical_permutations`.
    For region j and permutation k the prediction becomes ``total - terms[:, j] +
    terms[src[k], j]`` (analysis_predict_rating_featimp.m:88-98). Returns
    ``(r_original, drops (P, n_perm))`` with ``drops = r_original - r_permuted``.
    """
    total = np.asarray(total, dtype=np.float64)
    terms = np.asarray(terms, dtype=np.float64)
    rating = np.asarray(rating, dtype=np.float64)
    n, n_regions = terms.shape
    if total.shape != (n,) or rating.shape != (n,) or src.ndim != 2 or src.shape[1] != n:
        raise ValueError(
            f"shapes disagree: total {total.shape}, terms {terms.shape}, rating {rating.shape}, "
            f"permutations {src.shape}"
        )
    r_original = pearson_r(total, rating)
    yc = rating - rating.mean()
    y_norm = np.sqrt(yc @ yc)
    # With rest = total - term and u = term[π]: Σ(pred - mean)·yc = rest_c·yc + u·yc, and
    # Σ(pred - mean)² = |rest_c|² + |term_c|² + 2 rest_c·term_c[π] (a permutation keeps the
    # term's mean and spread). u·yc = term_c · yc[π⁻¹] is one matrix product for all regions.
    rest = total[:, None] - terms
    rest -= rest.mean(axis=0)
    term_c = terms - terms.mean(axis=0)
    num0 = rest.T @ yc
    var0 = np.einsum("np,np->p", rest, rest) + np.einsum("np,np->p", term_c, term_c)
    inverse = np.argsort(src, axis=1)
    drops = np.empty((n_regions, src.shape[0]))
    step = max(1, _CHUNK_VALUES // max(1, n * n_regions))
    for k0 in range(0, src.shape[0], step):
        chunk = slice(k0, k0 + step)
        num = num0 + yc[inverse[chunk]] @ term_c  # (c, P)
        cross = np.einsum("np,cnp->cp", rest, term_c[src[chunk]])
        den = np.sqrt(np.clip(var0 + 2.0 * cross, 0.0, None)) * y_norm
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(den > 0, num / den, np.nan)
        drops[:, chunk] = (r_original - r).T
    return r_original, snap_ties(drops)


def snap_ties(drops: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Drops within rounding error of 0 set to exactly 0, so they count as ties in the p-value
    (a region with no share of the prediction must get p = 1, not a p decided by rounding)."""
    drops[np.abs(drops) < tol] = 0.0
    return drops
