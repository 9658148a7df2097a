"""Classical reference decoders: the reference study's edge-PCR-LASSO model and a ridge baseline.

Both models consume :class:`~painnet.data.types.RunData` records, fit on the runs of training
sessions only, and predict every frame of a held-out run (NaN where no prediction exists), so
they end in the same frame-level prediction table as the deep models.

``EdgePCR`` (the study's model)
    Features are *edge* values, the frame-wise product ``z_i(t) z_j(t)`` of two z-scored parcel
    series, for every parcel pair ``i < j`` (``E = P(P-1)/2`` edges). Training samples are rating
    deciles within each run (see :func:`decile_labels`); a sample's features are the mean edge
    values over its frames, i.e. the upper triangle of ``Z_binᵀ Z_bin / n``. The fit is PCA →
    LASSO path on the PC scores (the order in which PCs enter defines nested PC sets) → OLS refit
    on the first ``k`` entering PCs, with ``k`` chosen by inner leave-one-session-out CV. The
    fitted linear model on edges is stored as a symmetric parcel-by-parcel matrix ``W`` so that a
    frame's prediction is the quadratic form ``z(t)ᵀ W z(t) + b``; no ``T × E`` edge time series
    is ever built.

    All PCA work happens in sample space: with ``X`` the ``(n, E)`` matrix of decile samples, the
    Gram matrix ``K = X Xᵀ`` (``n × n``) is computed once per participant
    (:meth:`EdgePCR.prepare`) and every outer and inner fold takes sub-blocks of it. The centred
    training sub-Gram ``H K H = U Λ Uᵀ`` gives the PC scores ``U Λ^½`` (the same as an SVD of the
    centred ``X``), held-out samples' scores come from the cross-Gram, and edge weights come back
    as ``w = X_trainᵀ a`` for a sample-space coefficient vector ``a``.

``WindowRidge`` (baseline)
    Ridge regression on parcel activity over a causal window ending at each frame, with
    training-only standardisation and the ridge penalty chosen by grouped (session) inner CV.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.linalg import eigh
from scipy.stats import rankdata
from sklearn.linear_model import Ridge, lasso_path
from sklearn.model_selection import GroupKFold, LeaveOneGroupOut
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from painnet.data.types import RunData, RunKey

SessionKey = tuple[str, str]

# Columns of the (n, E) decile matrix processed at once when forming the Gram matrix: bounds
# the float64 temporary to n × 2048 × 8 bytes (≈ 14 MB for n = 840).
_COLUMN_BLOCK = 2048
# Decile samples cast to float64 at once when forming edge weights (4 × E × 8 B ≈ 2.5 MB).
_ROW_BLOCK_SAMPLES = 4
# Values of a window-feature matrix cast to float64 at once for ridge moments (≈ 64 MB).
_ROW_BLOCK_VALUES = 2**23
# Eigenvalues of a centred Gram below this fraction of the largest are numerical zeros: PCA of
# n centred samples has at most n - 1 components.
_EIG_RTOL = 1e-9


# --------------------------------------------------------------------------------------------
# Input checks shared by both models
# --------------------------------------------------------------------------------------------


def _check_runs(runs: Sequence[RunData], *, need_targets: bool) -> int:
    """Validate a collection of runs; return their common parcel count P.

    Raises ValueError naming the offending run for: an empty collection, non-RunData items,
    mismatched array shapes, differing parcel counts, duplicated runs, non-finite series on kept
    frames, or (``need_targets``) a run without a single valid target frame.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("no runs given: a model needs at least one training run")
    n_parcels = None
    seen: set[RunKey] = set()
    for run in runs:
        if not isinstance(run, RunData):
            raise ValueError(f"expected RunData records, got {type(run).__name__}")
        _check_run_arrays(run)
        name = run.key.bids_prefix()
        if n_parcels is None:
            n_parcels = run.n_parcels
        elif run.n_parcels != n_parcels:
            raise ValueError(
                f"run {name} has {run.n_parcels} parcels but earlier runs have {n_parcels}: "
                "all runs of one model must share one parcellation"
            )
        if run.key in seen:
            raise ValueError(f"run {name} is given twice")
        seen.add(run.key)
        if need_targets and not run.valid_target.any():
            raise ValueError(f"run {name} has no valid target frame (kept and rated)")
    return int(n_parcels)


def _check_run_arrays(run: RunData) -> None:
    """Shapes of one run's arrays agree: series (T, P), kept (T,), target (T,)."""
    name = run.key.bids_prefix()
    if run.series.ndim != 2 or run.series.shape[1] < 2:
        raise ValueError(f"run {name}: series must be (T, P) with P >= 2, got {run.series.shape}")
    n_frames = run.series.shape[0]
    if run.kept.shape != (n_frames,) or run.target.shape != (n_frames,):
        raise ValueError(
            f"run {name}: kept {run.kept.shape} and target {run.target.shape} must both be "
            f"({n_frames},) like the series' frame axis"
        )
    if not np.isfinite(run.series[run.kept]).all():
        raise ValueError(f"run {name}: series has non-finite values on kept frames")


def _window_frames_of(model, runs: Sequence[RunData]) -> int:
    """The one window length (frames) of a windowed model over ``runs``; runs whose TRs give
    different lengths are an error."""
    lengths = {model.window_frames(run.tr) for run in runs}
    if len(lengths) > 1:
        raise ValueError(f"runs differ in TR: window lengths {sorted(lengths)} frames")
    return lengths.pop()


def _check_window(model, run: RunData) -> None:
    """A run to predict gives the fitted window length (and the fitted parcel count)."""
    _check_parcels(run, model.n_parcels_)
    if model.window_frames(run.tr) != model.window_frames_:
        raise ValueError(
            f"run {run.key.bids_prefix()}: TR {run.tr} s gives a {model.window_frames(run.tr)}"
            f"-frame window; the model was fitted with {model.window_frames_}"
        )


def _check_parcels(run: RunData, n_parcels: int) -> None:
    _check_run_arrays(run)
    if run.n_parcels != n_parcels:
        raise ValueError(
            f"run {run.key.bids_prefix()} has {run.n_parcels} parcels; "
            f"the model was fitted on {n_parcels}"
        )


def _inner_groups(sessions: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """Group labels for inner CV: sessions, or runs when only one training session exists.

    With a single session there is no session to hold out; holding out runs is the closest
    substitute (used by training-size analyses that train on one session).
    """
    if np.unique(sessions).size >= 2:
        return sessions
    if np.unique(runs).size >= 2:
        return runs
    raise ValueError(
        "inner cross-validation needs at least two training sessions (or two runs of one "
        "session); pass inner_cv=False to fit without it"
    )


def _pooled_r(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r between each column of ``pred`` (N, K) and ``y`` (N,); NaN if constant."""
    pc = pred - pred.mean(0)
    yc = y - y.mean()
    denom = np.sqrt((pc * pc).sum(0) * (yc @ yc))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc.T @ yc) / denom
    return np.where(denom > 0, r, np.nan)


def _best_index(scores: np.ndarray) -> int:
    """Index of the largest finite score, the first one on ties; 0 if none is finite."""
    if not np.isfinite(scores).any():
        return 0
    return int(np.nanargmax(np.where(np.isfinite(scores), scores, -np.inf)))


def _n_workers(n_jobs: int | None) -> int:
    """Worker threads for ``n_jobs``: None or -1 = the CPU cores this process may use."""
    if n_jobs is None or n_jobs == -1:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, -1 or None, got {n_jobs}")
    return int(n_jobs)


def _map_folds(fn: Callable, folds: list, n_jobs: int | None) -> list:
    """``[fn(f) for f in folds]`` on ``n_jobs`` worker threads, each with single-threaded BLAS.

    Many small (n ≈ 800) eigen-decompositions scale far better over folds than inside LAPACK,
    and a multi-threaded BLAS degrades badly on a busy machine (measured: 5x the wall and CPU
    time on 2 loaded cores). The BLAS limit is process-wide while the folds run.
    """
    workers = min(_n_workers(n_jobs), len(folds))
    with threadpool_limits(1):
        if workers <= 1:
            return [fn(f) for f in folds]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, folds))


# --------------------------------------------------------------------------------------------
# Decile samples
# --------------------------------------------------------------------------------------------


DECILE_RULES = ("painnet", "study")


def decile_labels(
    target: np.ndarray,
    valid: np.ndarray,
    n_deciles: int = 10,
    min_segment: int = 5,
    rule: str = "painnet",
) -> np.ndarray:
    """Rating-decile label of every frame of one run; -1 for frames that form no sample.

    ``rule="study"`` follows the study instead (see :func:`study_decile_labels`). painnet's
    rule (the default), exactly:

    1. Only frames with ``valid`` true take part (``n`` of them).
    2. Their ratings are ranked 1..n; tied ratings share their average rank (so equal ratings
       always fall into one decile). Frame label = ``floor((rank - 1) * n_deciles / n)``, which
       puts the lowest ``n / n_deciles`` ranks in decile 0, and so on.
    3. A segment is a maximal stretch of consecutive frame indices that are all valid and carry
       the same label (an invalid frame ends a segment). Frames in segments shorter than
       ``min_segment`` are dropped (label -1).

    target: (T,) ratings; valid: (T,) bool. Returns (T,) int64 labels in ``[-1, n_deciles)``.
    """
    target = np.asarray(target, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    if n_deciles < 1 or min_segment < 1:
        raise ValueError(f"n_deciles ({n_deciles}) and min_segment ({min_segment}) must be >= 1")
    if rule not in DECILE_RULES:
        raise ValueError(f"decile rule must be one of {DECILE_RULES}, got {rule!r}")
    if rule == "study":
        return study_decile_labels(target, valid, n_deciles, min_segment)
    labels = np.full(target.shape[0], -1, dtype=np.int64)
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        return labels
    ranks = rankdata(target[idx], method="average")
    labels[idx] = np.floor((ranks - 1.0) * n_deciles / idx.size).astype(np.int64)
    return np.where(_segment_lengths(labels) >= min_segment, labels, -1)


def study_decile_labels(
    target: np.ndarray, valid: np.ndarray, n_deciles: int = 10, min_segment: int = 5
) -> np.ndarray:
    """The study's rating-decile samples of one run (analysis_rating.m:81-93); -1 = no sample.

    1. Only the ``valid`` frames take part, as one sequence in frame order: censored frames are
       removed first (analysis_rating.m:77), so a segment may span them.
    2. Ratings are ranked 1..n by a stable ascending sort: ties are broken by position
       (lines 82-83).
    3. Label = 1 + the number of thresholds ``quantile(ranks, k / n_deciles)``, k = 1..9, that
       the rank exceeds (line 84). MATLAB's quantile of 1..n is ``n p + 0.5``, so the 0-based
       label is ``#{k : rank > n k / n_deciles + 0.5}``.
    4. Segments are maximal runs of one label in that sequence; a segment shorter than
       ``min_segment`` frames is set aside -- except the last segment of the run, which is never
       checked (lines 85-91: lengths come from differences of segment starts).

    target: (T,) ratings; valid: (T,) bool. Returns (T,) int64 labels in ``[-1, n_deciles)``.
    """
    labels = np.full(target.shape[0], -1, dtype=np.int64)
    idx = np.flatnonzero(valid)
    n = idx.size
    if n == 0:
        return labels
    ranks = np.empty(n, dtype=np.float64)
    ranks[np.argsort(target[idx], kind="stable")] = np.arange(1, n + 1)
    thresholds = n * (np.arange(1, n_deciles) / n_deciles) + 0.5
    kept_labels = (ranks[:, None] > thresholds[None, :]).sum(axis=1).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, kept_labels[1:] != kept_labels[:-1]])
    lengths = np.diff(np.r_[starts, n])
    short = lengths < min_segment
    short[-1] = False  # the run's last segment is never checked
    drop = np.repeat(short, lengths)
    labels[idx] = np.where(drop, -1, kept_labels)
    return labels


def _segment_lengths(labels: np.ndarray) -> np.ndarray:
    """Length of the constant-label segment each frame belongs to (0 for label -1)."""
    starts = np.flatnonzero(np.diff(labels, prepend=labels[0] - 1) != 0)
    lengths = np.diff(np.append(starts, labels.size))
    per_frame = np.repeat(lengths, lengths)
    return np.where(labels >= 0, per_frame, 0)


@dataclass(eq=False)
class DecileSamples:
    """Decile samples of a set of runs plus their Gram matrix (one participant, cached).

    features:  (n, E) mean edge values of each sample, upper triangle ``i < j`` in
               ``np.triu_indices(P, 1)`` order (float32 by default).
    rating:    (n,) float64 mean rating of each sample.
    gram:      (n, n) float64 ``features @ features.T``.
    session:   (n,) int index into ``sessions``; ``run``: (n,) int index into ``run_keys``.
    decile:    (n,) int decile label; ``n_frames``: (n,) frames averaged into each sample.

    It also memoises inner-fold results (see :meth:`EdgePCR.fit`): in a leave-one-session-out
    analysis the inner fold "train without sessions a and b" occurs twice — outer fold a holding
    out b, and outer fold b holding out a — so each such fit predicts every sample it was not
    trained on, once, and both outer folds read their held-out part. Entries are keyed by the
    exact training rows and solver settings, so a fold only ever reuses a fit on exactly its own
    training samples. Memory is bounded (least recently used entries go first).
    """

    features: np.ndarray
    rating: np.ndarray
    gram: np.ndarray
    session: np.ndarray
    run: np.ndarray
    decile: np.ndarray
    n_frames: np.ndarray
    sessions: tuple[SessionKey, ...]
    run_keys: tuple[RunKey, ...]
    n_parcels: int
    n_deciles: int
    min_segment: int
    decile_rule: str = "painnet"
    cache_max_bytes: int = 512 * 2**20
    _cache: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)
    _cache_bytes: int = field(default=0, init=False, repr=False)
    _cache_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    cache_hits: int = field(default=0, init=False)

    def rows(self, sessions: Iterable[SessionKey] | None = None) -> np.ndarray:
        """Sample indices of the given sessions (all samples if None)."""
        if sessions is None:
            return np.arange(self.rating.size)
        wanted = set(map(tuple, sessions))
        unknown = wanted - set(self.sessions)
        if unknown:
            raise ValueError(f"sessions {sorted(unknown)} have no decile samples")
        codes = [i for i, s in enumerate(self.sessions) if s in wanted]
        return np.flatnonzero(np.isin(self.session, codes))

    def cached_fold(self, key: tuple, compute: Callable[[], tuple]) -> tuple:
        """Return the memoised ``(rows, predictions, y_mean)`` of ``key``, computing it once."""
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return hit
        value = compute()
        size = value[0].nbytes + value[1].nbytes
        with self._cache_lock:
            self._cache[key] = value
            self._cache_bytes += size
            while self._cache_bytes > self.cache_max_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old[0].nbytes + old[1].nbytes
        return value


def _fill_run_samples(run: RunData, labels: np.ndarray, out: np.ndarray) -> tuple:
    """Write one run's decile features into ``out`` (d, E); return ratings, deciles, counts.

    Products are computed in the storage dtype of ``out`` (float32: relative error ~1e-6,
    twice as fast as float64 and as exact as what is stored).
    """
    z = np.asarray(run.series, dtype=out.dtype)
    iu = np.triu_indices(run.n_parcels, 1)
    deciles = np.unique(labels[labels >= 0])
    ratings = np.empty(deciles.size)
    counts = np.empty(deciles.size, dtype=np.int64)
    for row, d in enumerate(deciles):
        frames = labels == d
        zb = z[frames]
        out[row] = (zb.T @ zb)[iu] / frames.sum()
        ratings[row] = run.target[frames].astype(np.float64).mean()
        counts[row] = frames.sum()
    return ratings, deciles, counts


def _gram(features: np.ndarray) -> np.ndarray:
    """``features @ features.T`` in float64, column block by column block."""
    n = features.shape[0]
    out = np.zeros((n, n))
    for c0 in range(0, features.shape[1], _COLUMN_BLOCK):
        block = features[:, c0 : c0 + _COLUMN_BLOCK].astype(np.float64)
        out += block @ block.T
    return out


def _features_t_dot(features: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """``features.T @ coef`` (E,) in float64, a few rows at a time.

    Small blocks keep the float64 copy in cache: ~10x faster than casting big blocks.
    """
    out = np.zeros(features.shape[1])
    buf = np.empty((_ROW_BLOCK_SAMPLES, features.shape[1]))
    for r0 in range(0, features.shape[0], _ROW_BLOCK_SAMPLES):
        block = coef[r0 : r0 + _ROW_BLOCK_SAMPLES]
        if block.any():
            rows = buf[: block.size]
            np.copyto(rows, features[r0 : r0 + block.size])
            out += block @ rows
    return out


def edge_vector_to_matrix(w: np.ndarray, n_parcels: int) -> np.ndarray:
    """Edge weights (E,) → symmetric (P, P) matrix with ``W_ij = W_ji = w_e / 2``, zero diagonal.

    Then ``z ᵀ W z = Σ_{i<j} w_e z_i z_j``: the quadratic form equals the linear model on edges.
    """
    iu = np.triu_indices(n_parcels, 1)
    if w.shape != (iu[0].size,):
        raise ValueError(f"edge vector has shape {w.shape}; {n_parcels} parcels need {iu[0].size}")
    mat = np.zeros((n_parcels, n_parcels))
    mat[iu] = w / 2.0
    return mat + mat.T


def quadratic_predict(series: np.ndarray, weights: np.ndarray, intercept: float) -> np.ndarray:
    """Frame-wise ``z(t)ᵀ W z(t) + b`` for series (T, P) and W (P, P); returns (T,) float64."""
    z = np.asarray(series, dtype=np.float64)
    return ((z @ weights) * z).sum(1) + intercept


# --------------------------------------------------------------------------------------------
# PCA → LASSO order → OLS, all in sample space
# --------------------------------------------------------------------------------------------


@dataclass
class _GramPCR:
    """One PCA/LASSO/OLS fit expressed through the training Gram matrix.

    u: (n, m) eigenvectors of the centred training Gram (descending eigenvalues ``lam`` (m,));
    PC scores of training samples are ``u * sqrt(lam)``. ``order`` (q,) lists PCs in LASSO
    entry order; ``beta`` (m,) is each PC's OLS coefficient (PC scores are orthogonal, so a PC's
    OLS coefficient is the same in every nested set); ``row_mean`` (n,) and ``grand_mean``
    centre cross-Gram rows; ``y_mean`` is the training mean rating.
    """

    u: np.ndarray
    lam: np.ndarray
    order: np.ndarray
    beta: np.ndarray
    row_mean: np.ndarray
    grand_mean: float
    y_mean: float

    @property
    def n_entered(self) -> int:
        return int(self.order.size)

    def scores(self, cross_gram: np.ndarray) -> np.ndarray:
        """PC scores (q, m) of new samples from their cross-Gram (q, n) with the training set."""
        centred = (
            cross_gram
            - cross_gram.mean(1, keepdims=True)
            - self.row_mean[None, :]
            + self.grand_mean
        )
        return (centred @ self.u) / np.sqrt(self.lam)

    def predict_all_k(self, cross_gram: np.ndarray) -> np.ndarray:
        """Predictions (q, n_entered) of new samples for k = 1..n_entered selected PCs."""
        contrib = self.scores(cross_gram)[:, self.order] * self.beta[self.order]
        return self.y_mean + np.cumsum(contrib, axis=1)

    def sample_coef(self, k: int) -> tuple[np.ndarray, float]:
        """Sample-space coefficients ``a`` (n,) and intercept b for the first k entered PCs.

        Edge weights are ``w = X_trainᵀ a``; the eigenvectors of the centred Gram are orthogonal
        to the ones vector, so ``a`` is already centred and ``b = ȳ - mean(X_train) · w``
        ``= ȳ - mean_rows(K) · a``.
        """
        sel = self.order[:k]
        a = self.u[:, sel] @ (self.beta[sel] / np.sqrt(self.lam[sel]))
        return a, float(self.y_mean - self.row_mean @ a)


def _fit_gram_pcr(gram: np.ndarray, y: np.ndarray, n_alphas: int, solver: str) -> _GramPCR:
    """PCA (via the centred Gram), LASSO entry order and per-PC OLS on training samples.

    gram: (n, n) float64 Gram of the training samples; y: (n,) ratings.
    """
    row_mean = gram.mean(1)
    grand_mean = float(row_mean.mean())
    centred = gram - row_mean[:, None] - row_mean[None, :] + grand_mean
    # numpy's eigh (LAPACK syevd) releases the GIL, so inner folds can run on threads.
    lam, u = np.linalg.eigh(centred)
    lam, u = lam[::-1], u[:, ::-1]
    keep = lam > _EIG_RTOL * max(lam[0], 0.0)
    lam, u = lam[keep], np.ascontiguousarray(u[:, keep])
    y_mean = float(y.mean())
    yc = y - y_mean
    # Xy_j = t_jᵀ y with t_j = u_j sqrt(λ_j) the PC scores; TᵀT = diag(λ).
    xy = np.sqrt(lam) * (u.T @ yc)
    order = _lasso_entry_order(u, lam, yc, xy, n_alphas, solver)
    return _GramPCR(u, lam, order, xy / lam, row_mean, grand_mean, y_mean)


# The LASSO path is followed down to this fraction of its largest penalty ("λ ≈ 0"), so PCs
# with a weak but nonzero correlation with the rating still enter (the study's path ends at
# df = all PCs, analysis_predict_rating_modeling.m:72-74).
_PATH_EPS = 1e-9


def _lasso_entry_order(
    u: np.ndarray, lam: np.ndarray, yc: np.ndarray, xy: np.ndarray, n_alphas: int, solver: str
) -> np.ndarray:
    """Indices of PCs in the order they enter the LASSO path (PCs that never enter omitted).

    The LASSO runs on the **standardised** PC scores, as the study's MATLAB ``lasso`` does by
    default (analysis_predict_rating_modeling.m:77, 108; ``Standardize`` is on): a PC score
    ``t_j = u_j sqrt(λ_j)`` divided by its standard deviation ``sqrt(λ_j / n)`` is
    ``s_j = sqrt(n) u_j``, so ``s_jᵀ y = sqrt(n) u_jᵀ y`` and PCs enter by ``|u_jᵀ y|``, i.e.
    by ``|corr(t_j, y)|`` -- not by ``|t_jᵀ y|`` (their covariance), which would favour
    high-variance PCs. Standardising changes only the order: the OLS refit on a PC set is the
    same. (``xy`` = ``t_jᵀ y`` is accepted for the callers' convenience and not used.)

    The path: ``n_alphas`` penalties from ``max|sᵀy|/n`` down to ``_PATH_EPS`` of it
    (geometric), objective ``|y - Sβ|² / 2n + α|β|₁``. PCs entering at the same grid step are
    ordered by ``|s_jᵀ y|`` (their exact entry order on a continuous path).

    ``solver="sklearn"`` runs :func:`sklearn.linear_model.lasso_path` on ``S``.
    ``solver="analytic"`` (default) uses that standardised PC scores are orthogonal with
    ``s_jᵀ s_j = n``: the LASSO then soft-thresholds each PC separately, so PC j is nonzero from
    the first α below ``|s_jᵀ y| / n`` on -- the entry order is the order of decreasing
    ``|u_jᵀ y|`` (tests check both solvers agree).
    """
    n = yc.size
    std_xy = np.sqrt(n) * (u.T @ yc)
    strength = np.abs(std_xy)
    if strength.size == 0 or strength.max() <= 0:
        return np.zeros(0, dtype=np.int64)
    alphas = np.geomspace(strength.max() / n, strength.max() / n * _PATH_EPS, n_alphas)
    if solver == "sklearn":
        scores = u * np.sqrt(n)
        gram = np.eye(u.shape[1]) * n
        _, coefs, _ = lasso_path(scores, yc, alphas=alphas, precompute=gram, Xy=std_xy)
        nonzero = coefs != 0
    elif solver == "analytic":
        nonzero = (strength / n)[:, None] > alphas[None, :]
    else:
        raise ValueError(f"lasso solver must be 'analytic' or 'sklearn', got {solver!r}")
    entered = np.flatnonzero(nonzero.any(1))
    first = nonzero[entered].argmax(1)
    return entered[np.lexsort((-strength[entered], first))]


# --------------------------------------------------------------------------------------------
# EdgePCR
# --------------------------------------------------------------------------------------------


class EdgePCR:
    """The reference study's edge-PCR-LASSO decoder (PCA → LASSO order → OLS on edge deciles).

    Parameters
    ----------
    n_deciles, min_segment:
        Decile-sample rule, see :func:`decile_labels`.
    decile_rule:
        ``"painnet"`` (tied ratings share a decile, a segment ends at an invalid frame and every
        segment must reach ``min_segment``) or ``"study"`` (ties broken by position, segments
        span censored frames, the run's last segment is never checked; analysis_rating.m:81-93,
        see :func:`study_decile_labels`).
    fixed_components:
        Use exactly this many PCs (clipped to those that enter the path) and skip the inner CV:
        a training-size job fixes it at the full model's choice for that fold, as the study
        fixes its penalty there (analysis_predict_rating_trainsize.m:109). See
        :meth:`hyperparameters`.
    max_components:
        Upper bound on the number of PCs k (None: every PC that enters the LASSO path).
    component_grid:
        Candidate k values for the inner CV (None: 1 .. the largest number of entering PCs).
    inner_cv:
        Choose k by inner leave-one-session-out CV over the training sessions (held-out runs
        instead when there is only one training session). Score = pooled Pearson r between the
        held-out *decile samples'* predictions and ratings (pooled over all inner folds); the
        smallest k among equal scores wins. With ``inner_cv=False``, k = the largest allowed
        (``max_components`` / ``max(component_grid)`` / all entering PCs).
    n_lasso_alphas:
        Length of the LASSO penalty grid (its order defines the nested PC sets).
    random_state:
        Accepted for API symmetry; the fit is deterministic.
    dtype:
        Storage dtype of the decile edge matrix (the Gram and all solves are float64).
    lasso_solver:
        ``"analytic"`` (closed form for orthogonal PC scores) or ``"sklearn"`` (``lasso_path``).
    n_jobs:
        Threads running the final fit and the inner folds, each with single-threaded BLAS
        (None / -1: all usable cores; 1: sequential).

    As the study (analysis_predict_rating_modeling.m): SVD of the centred decile samples (line
    70), LASSO on the standardised PC scores so PCs enter by ``|corr(score, y)|`` (lines 72-77,
    see :func:`_lasso_entry_order`), OLS refit on the selected PCs (line 85), the number of
    non-zero PCs 1 … N − 2 (line 50; here clipped to the PCs of each fold) chosen by the pooled
    r of inner leave-one-session-out predictions (lines 132-190).

    The one deliberate difference: the study read its λ values once off the LASSO path of
    **all** sessions, the test session included (lines 61-77), and reused them in every fold
    (lines 108, 149), so its hyperparameter is a λ whose PC count varies by fold; painnet
    computes everything (z-scoring aside, which is per run) -- PCA, path, PC order, OLS, choice
    of k -- on the training sessions only and selects the number of PCs directly, so no
    information from the held-out session reaches the model. Series are used as the data layer
    provides them (z-scored over each run's kept frames), not re-z-scored over the frames that
    carry a target.

    Fitted attributes: ``weights_`` (P, P) symmetric, zero diagonal; ``intercept_``;
    ``n_components_``; ``cv_scores_`` {k: pooled r}; ``training_sessions_``; ``n_parcels_``.
    Prediction for a frame is ``z(t)ᵀ W z(t) + b`` (= ``Σ_{i<j} w_ij z_i z_j + b``).
    """

    def __init__(
        self,
        n_deciles: int = 10,
        min_segment: int = 5,
        max_components: int | None = None,
        component_grid: Sequence[int] | None = None,
        inner_cv: bool = True,
        n_lasso_alphas: int = 100,
        random_state: int = 0,
        dtype: str = "float32",
        lasso_solver: str = "analytic",
        n_jobs: int | None = None,
        decile_rule: str = "painnet",
        fixed_components: int | None = None,
    ) -> None:
        if decile_rule not in DECILE_RULES:
            raise ValueError(f"decile_rule must be one of {DECILE_RULES}, got {decile_rule!r}")
        if fixed_components is not None and (
            isinstance(fixed_components, bool)
            or not isinstance(fixed_components, (int, np.integer))
            or fixed_components < 1
        ):
            raise ValueError(
                f"fixed_components must be an int >= 1 or None, got {fixed_components!r}"
            )
        self.decile_rule = decile_rule
        self.fixed_components = None if fixed_components is None else int(fixed_components)
        self.n_deciles = n_deciles
        self.min_segment = min_segment
        self.max_components = max_components
        self.component_grid = component_grid
        self.inner_cv = inner_cv
        self.n_lasso_alphas = n_lasso_alphas
        self.random_state = random_state
        self.dtype = dtype
        self.lasso_solver = lasso_solver
        self.n_jobs = n_jobs

    # ---- samples -------------------------------------------------------------------------

    def prepare(self, runs: Sequence[RunData]) -> DecileSamples:
        """Decile samples and Gram matrix of ``runs`` (call once per participant, reuse in folds).

        Memory: ``n × P(P-1)/2`` values of ``dtype`` (840 samples × 79,800 edges × 4 B ≈ 270 MB
        for 400 parcels) plus the ``n × n`` float64 Gram. A run whose valid frames form no
        segment of ``min_segment`` frames contributes no sample; a run with no valid target at
        all is an error. Treat the result as read-only: folds memoise results computed from it.
        """
        runs = list(runs)
        n_parcels = _check_runs(runs, need_targets=True)
        labelled = []
        for run in runs:
            labels = decile_labels(
                run.target, run.valid_target, self.n_deciles, self.min_segment, self.decile_rule
            )
            if (labels >= 0).any():
                labelled.append((run, labels))
        if not labelled:
            raise ValueError(
                f"no decile samples: no run has a segment of >= {self.min_segment} consecutive "
                "valid frames with one rating decile"
            )
        sizes = [np.unique(labels[labels >= 0]).size for _, labels in labelled]
        n_edges = n_parcels * (n_parcels - 1) // 2
        # Filled in place: no second copy of the (n, E) matrix at any time.
        features = np.empty((sum(sizes), n_edges), dtype=np.dtype(self.dtype))
        sessions = list(dict.fromkeys(run.key.session_key for run, _ in labelled))
        parts, start = [], 0
        for code, ((run, labels), size) in enumerate(zip(labelled, sizes)):
            ratings, deciles, counts = _fill_run_samples(
                run, labels, features[start : start + size]
            )
            session = sessions.index(run.key.session_key)
            parts.append((ratings, deciles, counts, np.full(size, session), np.full(size, code)))
            start += size
        return DecileSamples(
            features=features,
            rating=np.concatenate([p[0] for p in parts]),
            gram=_gram(features),
            session=np.concatenate([p[3] for p in parts]),
            run=np.concatenate([p[4] for p in parts]),
            decile=np.concatenate([p[1] for p in parts]),
            n_frames=np.concatenate([p[2] for p in parts]),
            sessions=tuple(sessions),
            run_keys=tuple(run.key for run, _ in labelled),
            n_parcels=n_parcels,
            n_deciles=self.n_deciles,
            min_segment=self.min_segment,
            decile_rule=self.decile_rule,
        )

    # ---- fit -----------------------------------------------------------------------------

    def fit(
        self,
        runs: Sequence[RunData] | DecileSamples,
        sessions: Iterable[SessionKey] | None = None,
    ) -> EdgePCR:
        """Fit on training runs, or on the ``sessions`` subset of prepared samples.

        ``runs``: the training sessions' runs, or a :class:`DecileSamples` from :meth:`prepare`
        (then only samples of ``sessions`` are used — a leave-one-session-out runner prepares
        all of a participant's runs once and passes each fold's training sessions).
        """
        samples = runs if isinstance(runs, DecileSamples) else self.prepare(runs)
        self._check_samples(samples)
        rows = samples.rows(sessions)
        if rows.size < 2:
            raise ValueError(f"need at least 2 decile samples to fit, got {rows.size}")

        # The final fit and the inner folds are independent eigen-problems: one pool runs all.
        use_cv = self.inner_cv and self.fixed_components is None
        folds = self._inner_folds(samples, rows) if use_cv else []
        jobs = [(rows, None)] + [(rows[train], rows[test]) for train, test in folds]
        results = _map_folds(lambda job: self._fit_fold(samples, *job), jobs, self.n_jobs)
        final = results[0]
        self.cv_scores_ = self._cv_scores(results[1:], [rows[t] for _, t in folds], samples)
        k = self._choose_k(final.n_entered)
        a, b = final.sample_coef(k)
        coef = np.zeros(samples.rating.size)
        coef[rows] = a
        w = _features_t_dot(samples.features, coef)

        self.weights_ = edge_vector_to_matrix(w, samples.n_parcels)
        self.intercept_ = b
        self.n_components_ = k
        self.component_order_ = final.order.copy()
        self.n_parcels_ = samples.n_parcels
        self.training_sessions_ = tuple(
            sorted({samples.sessions[s] for s in samples.session[rows]})
        )
        self.n_train_samples_ = int(rows.size)
        return self

    def _solver_args(self) -> tuple[int, str]:
        return self.n_lasso_alphas, self.lasso_solver

    def hyperparameters(self) -> dict:
        """The fitted choice, as constructor arguments that reproduce it without inner CV:
        ``{"fixed_components": k}`` (a training-size job of the same fold passes it on)."""
        if not hasattr(self, "n_components_"):
            raise ValueError("EdgePCR.hyperparameters(): the model is not fitted yet")
        return {"fixed_components": int(self.n_components_)}

    def _check_samples(self, samples: DecileSamples) -> None:
        mine = (self.n_deciles, self.min_segment, self.decile_rule)
        theirs = (samples.n_deciles, samples.min_segment, samples.decile_rule)
        if mine != theirs:
            raise ValueError(
                f"samples were prepared with n_deciles={theirs[0]}, min_segment={theirs[1]}, "
                f"decile_rule={theirs[2]!r}; this model uses {mine[0]}, {mine[1]}, {mine[2]!r}"
            )

    def _candidates(self, n_available: int) -> np.ndarray:
        """Candidate k values (ascending, >= 1) given the largest available PC count."""
        if self.component_grid is not None:
            grid = np.unique(np.asarray(list(self.component_grid), dtype=np.int64))
            if grid.size == 0 or grid[0] < 1:
                raise ValueError(f"component_grid must hold positive ints, got {grid.tolist()}")
            return grid
        top = n_available if self.max_components is None else self.max_components
        return np.arange(1, max(int(top), 1) + 1)

    def _choose_k(self, n_entered: int) -> int:
        """Final k: fixed, the CV winner, or the largest allowed without inner CV; ≤ entered."""
        if self.fixed_components is not None:
            return max(0, min(self.fixed_components, n_entered))
        if self.cv_scores_:
            ks = np.array(list(self.cv_scores_))
            k = int(ks[_best_index(np.array(list(self.cv_scores_.values())))])
        else:
            k = int(self._candidates(n_entered)[-1])
        if self.max_components is not None:
            k = min(k, int(self.max_components))
        return min(k, n_entered)

    @staticmethod
    def _inner_folds(samples: DecileSamples, rows: np.ndarray) -> list:
        """(train, test) positions into ``rows``: leave one session (or run) out."""
        groups = _inner_groups(samples.session[rows], samples.run[rows])
        return list(LeaveOneGroupOut().split(rows, groups=groups))

    def _fit_fold(self, samples: DecileSamples, train: np.ndarray, test: np.ndarray | None):
        """PCR fit on sample rows ``train``; with ``test``, its (predictions, ȳ) there instead.

        Inner folds predict every sample outside ``train`` and memoise that in ``samples``
        (see :class:`DecileSamples`), then read the ``test`` rows.
        """
        if test is None:
            return _fit_gram_pcr(
                samples.gram[np.ix_(train, train)], samples.rating[train], *self._solver_args()
            )

        def compute() -> tuple:
            fit = _fit_gram_pcr(
                samples.gram[np.ix_(train, train)], samples.rating[train], *self._solver_args()
            )
            others = np.setdiff1d(np.arange(samples.rating.size), train)
            return others, fit.predict_all_k(samples.gram[np.ix_(others, train)]), fit.y_mean

        key = (*self._solver_args(), train.tobytes())
        others, preds, y_mean = samples.cached_fold(key, compute)
        return preds[np.searchsorted(others, test)], y_mean

    def _cv_scores(
        self, fold_preds: list, fold_rows: list[np.ndarray], samples: DecileSamples
    ) -> dict[int, float]:
        """Pooled held-out r of decile samples for each candidate k over the inner folds."""
        if not fold_preds:
            return {}
        n_available = max(p.shape[1] for p, _ in fold_preds)
        ks = self._candidates(n_available)
        if self.max_components is not None:
            ks = ks[ks <= self.max_components]
        if ks.size == 0:
            raise ValueError("no candidate number of components is <= max_components")
        pooled = np.concatenate([_predictions_for_k(p, m, ks) for p, m in fold_preds])
        scores = _pooled_r(pooled, samples.rating[np.concatenate(fold_rows)])
        return {int(k): float(s) for k, s in zip(ks, scores)}

    # ---- predict -------------------------------------------------------------------------

    def predict_run(self, run: RunData) -> np.ndarray:
        """Frame-level predictions (T,) float64 of one run; NaN on frames that are not kept."""
        _check_parcels(run, self.n_parcels_)
        pred = quadratic_predict(run.series, self.weights_, self.intercept_)
        pred[~run.kept] = np.nan
        return pred


def _predictions_for_k(pred_all_k: np.ndarray, y_mean: float, ks: np.ndarray) -> np.ndarray:
    """Select columns k - 1 of (q, n_entered) predictions, clipping k to n_entered.

    A fold where fewer PCs entered the path uses all of them for larger k; with no entering PC
    the prediction is the training mean.
    """
    if pred_all_k.shape[1] == 0:
        return np.full((pred_all_k.shape[0], ks.size), y_mean)
    return pred_all_k[:, np.minimum(ks, pred_all_k.shape[1]) - 1]


# --------------------------------------------------------------------------------------------
# WindowRidge
# --------------------------------------------------------------------------------------------

_SUMMARIES = ("flatten", "mean", "last")
_RIDGE_TARGETS = ("rating", "within_run")


class WindowRidge:
    """Ridge regression on parcel activity over the causal window ending at each frame.

    The window of frame t covers frames ``t - L + 1 .. t`` with ``L = round(window_s / tr)``
    (≥ 1); a frame has a window only if the window starts at or after the run's first kept frame
    (censored frames inside a window carry the series' 0.0). Training pairs: every ``stride``-th
    frame with a valid target and a window; target = ``target[t]`` (the rating already paired
    with frame t through the hemodynamic lag).

    summary:
        ``"flatten"``: all parcels × all frames of the window, ``P * L`` features ordered
        parcel-major (feature ``p * L + l``, ``l = 0`` the oldest frame) — e.g. 400 parcels ×
        22 frames (10 s at TR 0.46 s) = 8,800 features; ``"mean"``: per-parcel mean over the
        window (P features); ``"last"``: the window's end frame only (P features).
    alphas:
        Ridge penalties; chosen by inner CV over sessions (leave-one-session-out, or
        ``GroupKFold(inner_folds)``; held-out runs if there is one session), scored by pooled
        Pearson r of held-out windows, the larger alpha winning ties. ``inner_cv=False`` uses
        ``alphas[0]``.
    stride:
        Keep every ``stride``-th training window (memory: ``n_windows × n_features`` float32).
    target:
        ``"rating"``: fit the ratings. ``"within_run"``: fit each training run's ratings minus
        that run's mean, and score the inner CV on run-centred held-out predictions. Per-run
        z-scored activity cannot carry a run's mean pain, so its level only adds the
        leave-one-session-out artifact; a model that is asked only for the within-run shape
        (a stack member: the stack reads its run level from another member) should not spend
        its penalty on it. Predictions then have no run level (about 0 on every run).

    Features are standardised with the training windows' statistics (sklearn
    ``Pipeline(StandardScaler, Ridge)``); inner folds standardise with their own training part
    (the same estimator, computed from moments, see :func:`_grouped_ridge_predictions`).

    Cost: the inner CV holds a few ``F × F`` float64 matrices and eigen-decomposes one per fold.
    With ``"mean"`` (F = 400) that is cheap (one outer fold of 27 training sessions, every
    window: ~20 s on 2 busy cores). With ``"flatten"`` at 400 parcels (F = 8,800) it is
    ~0.6 GB per matrix and minutes per fold: use ``stride`` and ``inner_folds`` there.
    Fitted attributes: ``pipeline_``, ``alpha_``, ``cv_scores_`` {alpha: r}, ``window_frames_``,
    ``n_parcels_``, ``training_sessions_``.
    """

    def __init__(
        self,
        window_s: float = 10.0,
        summary: str = "flatten",
        alphas: Sequence[float] = (0.1, 1, 10, 100, 1000, 1e4),
        inner_cv: bool = True,
        stride: int = 1,
        inner_folds: int | None = None,
        target: str = "rating",
    ) -> None:
        if summary not in _SUMMARIES:
            raise ValueError(f"summary must be one of {_SUMMARIES}, got {summary!r}")
        if target not in _RIDGE_TARGETS:
            raise ValueError(f"target must be one of {_RIDGE_TARGETS}, got {target!r}")
        if window_s <= 0 or stride < 1 or len(alphas) == 0:
            raise ValueError("window_s must be > 0, stride >= 1 and alphas non-empty")
        self.window_s = window_s
        self.summary = summary
        self.alphas = tuple(float(a) for a in alphas)
        self.inner_cv = inner_cv
        self.stride = stride
        self.inner_folds = inner_folds
        self.target = target

    def window_frames(self, tr: float) -> int:
        """Window length L in frames for repetition time ``tr`` seconds."""
        return max(1, round(self.window_s / tr))

    def window_ends(self, run: RunData, *, training: bool) -> np.ndarray:
        """Frames whose window lies at/after the first kept frame and that are kept
        (``training``: that also have a valid target, every ``stride``-th)."""
        length = self.window_frames(run.tr)
        ok = run.valid_target if training else run.kept.copy()
        ok[: run.first_kept + length - 1] = False
        ends = np.flatnonzero(ok)
        return ends[:: self.stride] if training else ends

    def window_features(self, run: RunData, ends: np.ndarray) -> np.ndarray:
        """Features (len(ends), n_features) float32 of the windows ending at ``ends``."""
        length = self.window_frames(run.tr)
        series = np.asarray(run.series, dtype=np.float32)
        if self.summary == "last":
            return series[ends]
        if self.summary == "mean":
            return causal_window_mean(series, length)[ends].astype(np.float32)
        view = sliding_window_view(series, length, axis=0)  # (T - L + 1, P, L), no copy
        return view[ends - length + 1].reshape(ends.size, -1)

    def _stack(self, runs: Sequence[RunData]) -> tuple:
        """Training matrix X (N, F), targets y (N,), session and run codes (N,)."""
        xs, ys, sessions, run_codes = [], [], [], []
        session_names: list[SessionKey] = []
        for code, run in enumerate(runs):
            ends = self.window_ends(run, training=True)
            if run.key.session_key not in session_names:
                session_names.append(run.key.session_key)
            xs.append(self.window_features(run, ends))
            y = run.target[ends].astype(np.float64)
            ys.append(y - y.mean() if self.target == "within_run" and y.size else y)
            sessions.append(np.full(ends.size, session_names.index(run.key.session_key)))
            run_codes.append(np.full(ends.size, code))
        x = np.concatenate(xs)
        if x.shape[0] < 2:
            raise ValueError("fewer than 2 training windows: runs are too short for window_s")
        return x, np.concatenate(ys), np.concatenate(sessions), np.concatenate(run_codes)

    def fit(self, runs: Sequence[RunData]) -> WindowRidge:
        """Fit on the runs of the training sessions."""
        runs = list(runs)
        self.n_parcels_ = _check_runs(runs, need_targets=True)
        self.window_frames_ = _window_frames_of(self, runs)
        x, y, sessions, run_codes = self._stack(runs)
        self.cv_scores_ = {}
        alpha = self.alphas[0]
        if self.inner_cv and len(self.alphas) > 1:
            groups = _inner_groups(sessions, run_codes)
            self.cv_scores_ = self._inner_cv_scores(x, y, groups, run_codes)
            scores = np.array(list(self.cv_scores_.values()))[::-1]  # larger alpha wins ties
            alpha = list(self.cv_scores_)[::-1][_best_index(scores)]
        self.alpha_ = float(alpha)
        self.pipeline_ = Pipeline([("scale", StandardScaler()), ("ridge", Ridge(alpha=alpha))])
        self.pipeline_.fit(x, y)
        self.training_sessions_ = tuple(sorted({run.key.session_key for run in runs}))
        return self

    def _inner_cv_scores(
        self, x: np.ndarray, y: np.ndarray, groups: np.ndarray, run_codes: np.ndarray
    ) -> dict:
        """Pooled held-out r of windows for every alpha over the grouped inner folds
        (``target="within_run"``: of windows centred on their run's held-out mean)."""
        if self.inner_folds is None:
            splitter = LeaveOneGroupOut()
        else:
            splitter = GroupKFold(n_splits=min(self.inner_folds, np.unique(groups).size))
        folds = list(splitter.split(x, y, groups))
        preds = np.concatenate(_grouped_ridge_predictions(x, y, folds, self.alphas))
        truth = np.concatenate([y[test] for _, test in folds])
        if self.target == "within_run":
            runs = np.concatenate([run_codes[test] for _, test in folds])
            preds = preds - np.column_stack([group_nanmean(p, runs) for p in preds.T])
            truth = truth - group_nanmean(truth, runs)
        scores = _pooled_r(preds, truth)
        return {a: float(s) for a, s in zip(self.alphas, scores)}

    def predict_run(self, run: RunData) -> np.ndarray:
        """Frame-level predictions (T,) float64; NaN on frames not kept or without a full window."""
        _check_window(self, run)
        pred = np.full(run.n_frames, np.nan)
        ends = self.window_ends(run, training=False)
        if ends.size:
            pred[ends] = self.pipeline_.predict(self.window_features(run, ends))
        return pred


def causal_window_mean(values: np.ndarray, length: int) -> np.ndarray:
    """(T, K) float64 mean over frames ``t - length + 1 .. t`` (running sums in float64); NaN
    for the first ``length - 1`` frames."""
    csum = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(values, 0, np.float64)])
    out = np.full(values.shape, np.nan)
    out[length - 1 :] = (csum[length:] - csum[:-length]) / length
    return out


def group_nanmean(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Each value replaced by the mean of the finite values of its group (``group``: codes
    0..G-1); NaN where the value itself is not finite (e.g. run means of frame predictions)."""
    finite = np.isfinite(values)
    sums = np.bincount(group[finite], weights=values[finite], minlength=group.max() + 1)
    counts = np.bincount(group[finite], minlength=group.max() + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    return np.where(finite, means[group], np.nan)


def _moments(x: np.ndarray, y: np.ndarray, shift: np.ndarray) -> tuple:
    """Sufficient statistics of ``x - shift`` (N, F) and ``y`` (N,), float64, row block-wise.

    Returns ``(n, Σx, Σxxᵀ, Σy, Σxy)``; the shift (the mean of all training windows) keeps the
    later ``Σxxᵀ - n μμᵀ`` free of cancellation.
    """
    n_feat = x.shape[1]
    sxx, sx, sxy = np.zeros((n_feat, n_feat)), np.zeros(n_feat), np.zeros(n_feat)
    step = max(1, _ROW_BLOCK_VALUES // n_feat)
    for r0 in range(0, x.shape[0], step):
        block = x[r0 : r0 + step].astype(np.float64) - shift
        sxx += block.T @ block
        sx += block.sum(0)
        sxy += block.T @ y[r0 : r0 + step]
    return x.shape[0], sx, sxx, float(y.sum()), sxy


def _grouped_ridge_predictions(
    x: np.ndarray, y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]], alphas
) -> list[np.ndarray]:
    """Held-out predictions (n_test, n_alphas) of StandardScaler + Ridge, per fold, all alphas.

    The same estimator as ``Pipeline(StandardScaler(), Ridge(alpha))`` fitted on each fold's
    training rows (standardised features are centred, so the intercept is the training mean
    rating), but computed from moments: the training part's moments are the total minus the
    held-out rows', so the data are read about twice in all instead of once per fold, and one
    eigen-decomposition of the F × F standardised Gram per fold serves every alpha.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    shift = x.mean(0, dtype=np.float64)
    total = _moments(x, y, shift)
    out = []
    for _, test in folds:
        held = _moments(x[test], y[test], shift)
        n, sx, sy, sxy = (total[i] - held[i] for i in (0, 1, 3, 4))
        gram = total[2] - held[2]
        del held  # F × F matrices dominate memory for "flatten": keep at most a few alive
        mu, y_mean = sx / n, sy / n
        sd = np.sqrt(np.clip(np.diag(gram) / n - mu**2, 0.0, None))
        sd[sd < 1e-12] = 1.0  # constant feature: StandardScaler leaves it unscaled
        gram -= np.outer(n * mu, mu)
        gram /= sd[:, None]
        gram /= sd[None, :]
        xty = (sxy - n * mu * y_mean) / sd
        lam, v = eigh(gram, overwrite_a=True, check_finite=False, driver="evd")
        del gram
        coefs = v @ ((v.T @ xty)[:, None] / (np.clip(lam, 0.0, None)[:, None] + alphas))
        del v
        x_test = (x[test].astype(np.float64) - shift - mu) / sd
        out.append(x_test @ coefs + y_mean)
    return out


# --------------------------------------------------------------------------------------------
# Convenience
# --------------------------------------------------------------------------------------------


def fit_predict(
    model: EdgePCR | WindowRidge, train_runs: Sequence[RunData], test_runs: Sequence[RunData]
) -> dict[RunKey, np.ndarray]:
    """Fit ``model`` on ``train_runs`` and predict every test run frame by frame.

    Raises ValueError if a test run's session also appears in the training runs (splits are by
    session, never by window or run).
    """
    train_runs, test_runs = list(train_runs), list(test_runs)
    shared = {r.key.session_key for r in train_runs} & {r.key.session_key for r in test_runs}
    if shared:
        raise ValueError(f"sessions {sorted(shared)} are in both the training and the test runs")
    model.fit(train_runs)
    return {run.key: model.predict_run(run) for run in test_runs}
