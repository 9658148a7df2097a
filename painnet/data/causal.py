"""Causal cleaning: every frame is cleaned from that frame and the frames before it only.

This is the cleaning of ``data.clean.causal=true`` and of the real-time path
(:mod:`painnet.realtime`): both call :class:`CausalCleaner.step` frame after frame, so a model
trained on causally cleaned runs sees, offline, exactly the inputs the scanner stream gives it.

At frame ``t`` (onset ``t·TR``), with ``x_t`` the raw parcel means and ``d_t`` the confounds of
the strategy (:func:`painnet.data.clean.confound_columns`):

1. **Initial drop and censoring**, decided per frame exactly as the standard cleaning
   (:func:`painnet.data.clean.kept_frames`): frames before ``drop_initial_s`` and frames with
   framewise displacement above ``fd_threshold`` (which fMRIPrep computes from frames ``t−1``
   and ``t``) are not kept; they hold 0.0 and do not enter any statistic. A volume that never
   arrived (real time) is treated like a censored frame.
2. **Confound regression with exponential forgetting.** Exponentially weighted means and
   (cross-)covariances of ``x`` and ``d`` over the kept frames so far, each past frame weighted
   ``λ^(t−s)``; the residual is ``(x_t − m_x) − (d_t − m_d)·β_t`` with ``β_t`` the weighted
   least-squares coefficients. The weighted mean is a one-pole high-pass: ``λ = exp(−2π·f_c·TR)``
   puts its −3 dB point at ``high_pass_hz`` (0.005 Hz: a memory of ≈ 32 s). So one recursive
   regression does the study's detrending, high-pass and confound regression together.
   With ``high_pass_hz=null`` nothing is forgotten (``λ = 1``) and ``linear_trend`` adds the
   frame time as a regressor: the causal form of the standard whole-run regression. With
   forgetting, the trend regressor is not added: a local mean already follows slow drifts, and
   a local slope on top of it would remove the slow pain fluctuations too.
   Coefficients are shrunk towards 0 by a prior worth :data:`PRIOR_FRAMES` frames per
   regressor (ridge ``(k/W)·diag(S_dd)``), so the first frames of a run, where few frames
   estimate many coefficients, are not fitted to zero residual.
3. **Running z-score**: mean and sample SD (Welford) of each parcel's residual over the run's
   kept frames up to ``t``; fewer than two kept frames give 0.0.

Design choice (z-score statistics): they start from the run's own first kept frames, not from
the participant's training sessions. The cleaned series of a run is then a function of that run
alone, so its cache key is the standard one (with ``causal: true`` in the settings), every
fold of a leave-one-session-out study reuses it, no statistic of another session can leak in,
and the real-time path needs nothing from training but the model. The price is a noisier scale
in the first seconds after ``drop_initial_s``; the "price of causality" comparison in the
README measures the whole cost.

The study's offline steps this replaces (one regression of trend, motion and aCompCor,
high-pass, whole-run z-score) are in cocoanlab/DEIPP ``preprocessing_cocoan_func.m``.
"""

from __future__ import annotations

import math

import numpy as np

from painnet.data.clean import CleanConfig

# Prior strength of the confound coefficients, in frames' worth of evidence per regressor.
PRIOR_FRAMES = 1.0


def forgetting_factor(high_pass_hz: float | None, tr: float) -> float:
    """Per-frame weight ``λ`` of the past: ``exp(−2π·f_c·TR)``, or 1.0 without a high-pass."""
    if high_pass_hz is None:
        return 1.0
    if high_pass_hz <= 0 or tr <= 0:
        raise ValueError(f"clean.high_pass_hz and the TR must be > 0, got {high_pass_hz}, {tr}")
    return math.exp(-2.0 * math.pi * float(high_pass_hz) * float(tr))


class CausalCleaner:
    """Cleans one run frame by frame (state: a few running moments, nothing of the future).

    ``step`` must be called for every stored frame in order, ``t = 0, 1, ...``; pass
    ``x=None`` for a frame that is missing (real time). The output of frame ``t`` depends only
    on the inputs of frames ``0 … t``.
    """

    def __init__(self, config: CleanConfig, tr: float, n_parcels: int, n_confounds: int = 0):
        if config.low_pass_hz is not None:
            raise ValueError("clean.low_pass_hz must be null for causal cleaning")
        if getattr(config, "fd_low_pass_hz", None) is not None:
            raise ValueError(
                "clean.fd_low_pass_hz filters the motion parameters forward and backward in time"
                " (future frames): set it to null with clean.causal=true"
            )
        if tr <= 0:
            raise ValueError(f"TR must be > 0, got {tr}")
        self.config = config
        self.tr = float(tr)
        self.n_parcels = int(n_parcels)
        self.n_confounds = int(n_confounds)
        self.forget = forgetting_factor(config.high_pass_hz, tr)
        self.use_trend = bool(config.linear_trend) and self.forget == 1.0
        k = self.n_confounds + int(self.use_trend)
        self.n_regressors = k
        self.frame = 0
        # Exponentially weighted moments (kept frames only) of x (P,) and regressors d (k,).
        self._weight = 0.0
        self._mean_x = np.zeros(self.n_parcels)
        self._mean_d = np.zeros(k)
        self._s_dd = np.zeros((k, k))
        self._s_dx = np.zeros((k, self.n_parcels))
        # Welford running mean / sum of squares of the residuals (kept frames, no forgetting).
        self._n = 0
        self._mean_r = np.zeros(self.n_parcels)
        self._m2_r = np.zeros(self.n_parcels)
        self.n_kept = 0

    def is_kept(self, t: int, fd: float) -> bool:
        """Whether frame ``t`` with framewise displacement ``fd`` survives drop and censoring."""
        if t * self.tr < self.config.drop_initial_s - 1e-9:
            return False
        thr = self.config.fd_threshold
        return thr is None or bool(fd <= thr)

    def step(
        self, x: np.ndarray | None, confounds: np.ndarray | None = None, fd: float = 0.0
    ) -> tuple[np.ndarray, bool]:
        """Clean the next frame. Returns ``(cleaned (P,) float32, kept)``."""
        t = self.frame
        self.frame += 1
        out = np.zeros(self.n_parcels, dtype=np.float32)
        retained = t * self.tr >= self.config.drop_initial_s - 1e-9
        if retained and self._weight > 0:
            self._decay()  # time passes for censored and missing frames too
        if x is None or not self.is_kept(t, fd):
            return out, False
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.n_parcels,):
            raise ValueError(f"frame {t}: expected {self.n_parcels} parcel values, got {x.shape}")
        d = self._regressors(t, confounds)
        residual = self._update_regression(x, d)
        out[:] = self._running_z(residual)
        self.n_kept += 1
        return out, True

    # -- internals --------------------------------------------------------------------------
    def _regressors(self, t: int, confounds: np.ndarray | None) -> np.ndarray:
        parts = []
        if self.n_confounds:
            if confounds is None:
                raise ValueError(f"frame {t}: {self.n_confounds} confound values are needed")
            c = np.asarray(confounds, dtype=np.float64).reshape(-1)
            if c.size != self.n_confounds:
                raise ValueError(
                    f"frame {t}: {c.size} confound values, expected {self.n_confounds}"
                )
            parts.append(np.nan_to_num(c))
        if self.use_trend:
            parts.append([t * self.tr / 60.0])  # minutes: keeps the moments well scaled
        return np.concatenate(parts) if parts else np.zeros(0)

    def _decay(self) -> None:
        lam = self.forget
        if lam == 1.0:
            return
        self._weight *= lam
        self._s_dd *= lam
        self._s_dx *= lam

    def _update_regression(self, x: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Add frame (x, d) to the weighted moments; residual of x at this frame."""
        self._weight += 1.0
        w = self._weight
        dx_old = x - self._mean_x
        dd_old = d - self._mean_d
        self._mean_x += dx_old / w
        self._mean_d += dd_old / w
        dd_new = d - self._mean_d
        self._s_dd += np.outer(dd_old, dd_new)
        self._s_dx += np.outer(dd_old, x - self._mean_x)
        centred_x = x - self._mean_x
        if self.n_regressors == 0 or w < 2.0:
            return centred_x
        diag = np.diag(self._s_dd).copy()
        ridge = (PRIOR_FRAMES / w) * diag + 1e-12 * (diag.max() + 1e-300)
        gram = self._s_dd + np.diag(ridge)
        live = diag > 0  # a regressor without variance so far has no coefficient yet
        if not live.any():
            return centred_x
        beta = np.linalg.solve(gram[np.ix_(live, live)], self._s_dx[live])
        return centred_x - dd_new[live] @ beta

    def _running_z(self, r: np.ndarray) -> np.ndarray:
        self._n += 1
        delta = r - self._mean_r
        self._mean_r += delta / self._n
        self._m2_r += delta * (r - self._mean_r)
        if not self.config.zscore:
            return r
        if self._n < 2:
            return np.zeros_like(r)
        sd = np.sqrt(self._m2_r / (self._n - 1))
        safe = np.where(sd > 0, sd, 1.0)
        return np.where(sd > 0, (r - self._mean_r) / safe, 0.0)


def clean_series_causal(
    series: np.ndarray,
    tr: float,
    config: CleanConfig,
    confounds: np.ndarray | None = None,
    fd: np.ndarray | None = None,
    source: str = "run",
    censor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Clean a stored run causally; same contract as :func:`painnet.data.clean.clean_series`.

    ``censor`` (bool (T,)) marks more frames to censor (e.g. non-finite voxels): they are
    handled like a missing volume. Returns ``(cleaned (T, P) float32, 0.0 on frames not kept;
    kept (T,) bool)``.
    """
    series = np.asarray(series)
    if series.ndim != 2:
        raise ValueError(f"{source}: series must be (frames, parcels), got shape {series.shape}")
    n_frames, n_parcels = series.shape
    fd = np.zeros(n_frames) if fd is None else np.asarray(fd, dtype=np.float64)
    n_conf = 0 if confounds is None else int(confounds.shape[1])
    cleaner = CausalCleaner(config, tr, n_parcels, n_conf)
    out = np.zeros((n_frames, n_parcels), dtype=np.float32)
    kept = np.zeros(n_frames, dtype=bool)
    censor = np.zeros(n_frames, bool) if censor is None else np.asarray(censor, dtype=bool)
    for t in range(n_frames):
        out[t], kept[t] = cleaner.step(
            None if censor[t] else series[t],
            None if confounds is None else confounds[t],
            float(fd[t]),
        )
    if kept.sum() < 3:
        raise ValueError(
            f"{source}: only {int(kept.sum())} frames left after dropping {config.drop_initial_s}"
            f" s and censoring FD > {config.fd_threshold} (of {n_frames}); check the run or the"
            " settings"
        )
    return out, kept
