"""A low-rank co-fluctuation decoder: the power of a few pain-tuned parcel projections.

Why: the study's edge model reads pain from co-fluctuation -- its prediction is the quadratic
form ``z(t)ᵀ W z(t)`` with a full ``P × P`` matrix ``W`` estimated by PCA + LASSO over ``P(P-1)/2``
edges. When pain modulates the amplitude of a shared fluctuation over a set of parcels, ``W`` is
low-rank: ``W ≈ Σ_k β_k u_k u_kᵀ``, and the prediction is a weighted sum of the *power*
``(u_kᵀ z(t))²`` of a few projections. Estimating ``rank`` directions instead of ``P²/2`` edge
weights is far less noisy, and the power of a projection averaged over a whole run is the run's
correlation structure along ``u`` (``u_kᵀ C_run u_k``): per-run z-scoring keeps it, so it carries
session-level pain, which per-run z-scored activation cannot.

Directions (common spatial patterns, as for band power in EEG): with ``ȳ`` the mean training
rating, ``M = mean_t (y_t - ȳ) z_t z_tᵀ`` is the pain-weighted covariance and ``C = mean_t z_t z_tᵀ``
the covariance of the training frames; the generalised eigenvectors of ``M u = λ (C + s I) u``
with the ``rank`` largest and the ``rank`` smallest eigenvalues are the projections whose power
rises and falls most with pain relative to their total power (``s``: ``shrinkage`` times the
mean variance, which keeps ``C`` well conditioned for many parcels).

Two levels, fitted separately: a projection's power over a short window is a noisy read-out, so
one frame-level regression on it would shrink its weights towards zero and leave the run level to
the intercept -- the training sessions' mean, which anti-correlates with a held-out session's
(the leave-one-session-out artifact). Instead
- run level: ridge of each training run's mean rating on the run means of the powers (every
  kept frame of the run: no rating is read, as for z-scoring), its penalty chosen by
  leave-one-session-out over the training sessions (an infinite one keeps the training mean);
- within run: ridge of the run-centred ratings on the run-centred powers averaged over the
  causal window of ``window_s`` seconds ending at each frame.
A prediction is the run level plus the within-run part, centred on the run's predicted frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.linalg import eigh

from painnet.data.types import RunData
from painnet.models.classical import (
    _check_runs,
    _check_window,
    _window_frames_of,
    causal_window_mean,
)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Coefficients and intercept of ridge on centred ``x`` (the intercept is y's mean); an
    infinite ``alpha`` gives zero coefficients."""
    x_mean, y_mean = x.mean(0), float(y.mean())
    if np.isinf(alpha):
        return np.zeros(x.shape[1]), y_mean
    xc = x - x_mean
    coef = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - y_mean))
    return coef, y_mean - float(x_mean @ coef)


class LowRankCofluct:
    """Pain from the power of ``2 * rank`` pain-tuned projections of the z-scored parcels.

    Args:
        rank: projections whose power rises with pain, and as many whose power falls.
        window_s: causal window (seconds) over which a frame's within-run power is averaged.
        shrinkage: ridge on the covariance, as a fraction of its mean variance.
        alpha: ridge penalty of the within-run regression, on standardised powers (with
            ``2 * rank`` features and thousands of frames it matters little; it guards a
            constant power).
        run_alphas: penalties of the run-level regression (a few dozen runs, so it matters),
            chosen by leave-one-session-out over the training sessions (3 or more; else the
            first) on the squared error of held-out runs' mean ratings, the larger winning ties.
            ``inf`` is the training mean alone: it wins where the powers' run means carry no
            session-level pain (pain coded in activation only, say), where a fitted run level
            would only add noise.

    Fitted attributes: ``directions_`` (P, 2·rank), ``eigenvalues_``, ``run_coef_`` /
    ``run_intercept_``, ``run_alpha_``, ``run_level_errors_`` (per ``run_alphas``),
    ``within_coef_``, ``power_scale_``, ``window_frames_``, ``n_parcels_``, ``training_sessions_``.
    """

    def __init__(
        self,
        rank: int = 1,
        window_s: float = 10.0,
        shrinkage: float = 0.1,
        alpha: float = 1.0,
        run_alphas: Sequence[float] = (1.0, 10.0, 100.0, float("inf")),
    ) -> None:
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank!r}")
        if window_s <= 0 or shrinkage < 0 or alpha < 0:
            raise ValueError("window_s must be > 0, shrinkage and alpha >= 0")
        if len(run_alphas) == 0 or min(run_alphas) < 0:
            raise ValueError(f"run_alphas must be non-empty and >= 0, got {run_alphas!r}")
        self.rank = int(rank)
        self.window_s = float(window_s)
        self.shrinkage = float(shrinkage)
        self.alpha = float(alpha)
        self.run_alphas = tuple(sorted(float(a) for a in run_alphas))

    def window_frames(self, tr: float) -> int:
        return max(1, round(self.window_s / tr))

    def _directions(self, runs: Sequence[RunData]) -> tuple[np.ndarray, np.ndarray]:
        """Generalised eigenvalues (2·rank,) and directions (P, 2·rank): rising first."""
        z = np.concatenate([run.series[run.valid_target] for run in runs]).astype(np.float64)
        y = np.concatenate([run.target[run.valid_target] for run in runs]).astype(np.float64)
        n_parcels = z.shape[1]
        if 2 * self.rank > n_parcels:
            raise ValueError(f"rank={self.rank}: needs at least {2 * self.rank} parcels")
        weighted = (z * (y - y.mean())[:, None]).T @ z / y.size
        cov = z.T @ z / y.size
        cov += self.shrinkage * np.trace(cov) / n_parcels * np.eye(n_parcels)
        values, vectors = eigh(weighted, cov)
        keep = np.r_[np.arange(n_parcels - self.rank, n_parcels)[::-1], np.arange(self.rank)]
        return values[keep], vectors[:, keep]

    @staticmethod
    def _run_means(runs: Sequence[RunData], directions: np.ndarray) -> tuple:
        """Each run's mean power over its kept frames (R, 2·rank) and mean rating (R,)."""
        x = [((run.series[run.kept].astype(np.float64) @ directions) ** 2).mean(0) for run in runs]
        y = [float(np.mean(run.target[run.valid_target])) for run in runs]
        return np.asarray(x), np.asarray(y)

    def _run_level_errors(self, runs: Sequence[RunData]) -> np.ndarray:
        """Leave-one-session-out squared error of the run level for every ``run_alphas`` value
        (directions and regression refitted without the held-out session); NaN with fewer than
        3 sessions. An infinite alpha is the training mean alone."""
        sessions = sorted({run.key.session_key for run in runs})
        errors = np.zeros(len(self.run_alphas))
        if len(sessions) < 3:
            return errors * np.nan
        for held in sessions:
            train = [run for run in runs if run.key.session_key != held]
            test = [run for run in runs if run.key.session_key == held]
            _, directions = self._directions(train)
            x, y = self._run_means(train, directions)
            x_test, y_test = self._run_means(test, directions)
            scale = x.std(0) + 1e-12
            for i, alpha in enumerate(self.run_alphas):
                coef, intercept = _ridge(x / scale, y, alpha)
                errors[i] += float(np.sum((x_test / scale @ coef + intercept - y_test) ** 2))
        return errors

    def _powers(self, run: RunData) -> np.ndarray:
        return (run.series.astype(np.float64) @ self.directions_) ** 2

    def _windowed(self, run: RunData, power: np.ndarray) -> np.ndarray:
        """Window means of the powers; NaN where the window starts before the first kept frame
        (censored frames inside a window count as 0, the z-scored mean, as for WindowRidge)."""
        out = causal_window_mean(power, self.window_frames_)
        out[: run.first_kept + self.window_frames_ - 1] = np.nan
        return out

    def fit(self, runs: Sequence[RunData]) -> LowRankCofluct:
        """Fit on the runs of the training sessions (two or more runs)."""
        runs = list(runs)
        self.n_parcels_ = _check_runs(runs, need_targets=True)
        self.window_frames_ = _window_frames_of(self, runs)
        if len(runs) < 2:
            raise ValueError("the co-fluctuation decoder needs at least 2 training runs")
        self.eigenvalues_, self.directions_ = self._directions(runs)
        run_x, run_y = self._run_means(runs, self.directions_)
        within_x, within_y = [], []
        for run in runs:
            power = self._powers(run)
            windowed = self._windowed(run, power)
            ok = run.valid_target & np.isfinite(windowed).all(1)
            if ok.sum() >= 2:
                within_x.append(windowed[ok] - windowed[ok].mean(0))
                within_y.append(run.target[ok] - run.target[ok].mean())
        if not within_x:
            raise ValueError("no training run is longer than window_s: no within-run samples")
        self.power_scale_ = run_x.std(0) + 1e-12  # one scale for both levels: the same powers
        self.run_level_errors_ = self._run_level_errors(runs)
        finite = np.isfinite(self.run_level_errors_)
        # the larger alpha wins ties; without 3 sessions, the first alpha
        self.run_alpha_ = (
            self.run_alphas[len(self.run_alphas) - 1 - int(np.argmin(self.run_level_errors_[::-1]))]
            if finite.all()
            else self.run_alphas[0]
        )
        self.run_coef_, self.run_intercept_ = _ridge(
            run_x / self.power_scale_, run_y, self.run_alpha_
        )
        within_x = np.concatenate(within_x) / self.power_scale_
        self.within_coef_, _ = _ridge(within_x, np.concatenate(within_y), self.alpha)
        self.training_sessions_ = tuple(sorted({run.key.session_key for run in runs}))
        return self

    def predict_run(self, run: RunData) -> np.ndarray:
        """Frame-level predictions (T,); NaN on frames not kept or without a full window."""
        _check_window(self, run)
        power = self._powers(run) / self.power_scale_
        pred = np.full(run.n_frames, np.nan)
        if not run.kept.any():
            return pred
        level = float(power[run.kept].mean(0) @ self.run_coef_) + self.run_intercept_
        within = self._windowed(run, power) @ self.within_coef_
        ok = run.kept & np.isfinite(within)
        if ok.any():
            pred[ok] = level + within[ok] - within[ok].mean()
        return pred

    def hyperparameters(self) -> dict:
        return {
            "rank": self.rank,
            "eigenvalues": [float(v) for v in self.eigenvalues_],
            "run_alpha": self.run_alpha_,
        }
