"""Cleaning of parcel time series: confound regression, detrending, high-pass, censoring.

Follows the reference study: linear trend, 6 motion parameters, WM and CSF signals, high-pass
0.005 Hz, first 30 s dropped, high-motion frames censored, z-scored per run. Frames are never
removed from the returned arrays: dropped and censored frames are marked ``kept=False`` and
hold 0.0 (the z-scored mean), so frame indices always match the BOLD file.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from nilearn import signal

MOTION_6 = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


@dataclass(frozen=True)
class CleanConfig:
    """How a run is cleaned. Defaults reproduce the reference study.

    motion: 6 (the six rigid-body parameters), 24 (plus derivatives, squares and squared
        derivatives, fMRIPrep naming) or 0 (none).
    wm_csf: regress the ``white_matter`` and ``csf`` signals.
    n_acompcor: number of leading ``a_comp_cor_XX`` components to regress (0 = none).
    global_signal: regress ``global_signal``.
    linear_trend: remove a linear trend.
    high_pass_hz / low_pass_hz: filter cut-offs (None disables); ``filter`` is nilearn's
        ``butterworth`` or ``cosine`` (DCT regressors, SPM-style).
    drop_initial_s: frames with onset before this are dropped (scanner equilibration).
    fd_threshold: frames with framewise displacement above this (mm) are censored; None = off.
    zscore: z-score each parcel over the run's kept frames.
    """

    motion: int = 6
    wm_csf: bool = True
    n_acompcor: int = 0
    global_signal: bool = False
    linear_trend: bool = True
    high_pass_hz: float | None = 0.005
    low_pass_hz: float | None = None
    filter: str = "butterworth"
    drop_initial_s: float = 30.0
    fd_threshold: float | None = 0.5
    zscore: bool = True

    def __post_init__(self):
        if self.motion not in (0, 6, 24):
            raise ValueError(f"clean.motion must be 0, 6 or 24, got {self.motion}")
        if self.filter not in ("butterworth", "cosine"):
            raise ValueError(f"clean.filter must be 'butterworth' or 'cosine', got {self.filter!r}")

    def as_dict(self) -> dict:
        return asdict(self)


def confound_columns(config: CleanConfig, available: list[str]) -> list[str]:
    """Names of the confound columns the strategy asks for, in a fixed order."""
    columns: list[str] = []
    if config.motion:
        columns += MOTION_6
    if config.motion == 24:
        for name in MOTION_6:
            columns += [f"{name}_derivative1", f"{name}_power2", f"{name}_derivative1_power2"]
    if config.wm_csf:
        columns += ["white_matter", "csf"]
    if config.global_signal:
        columns += ["global_signal"]
    compcor = sorted(c for c in available if c.startswith("a_comp_cor_"))
    if config.n_acompcor > len(compcor):
        raise ValueError(
            f"clean.n_acompcor={config.n_acompcor} but only {len(compcor)} a_comp_cor columns exist"
        )
    columns += compcor[: config.n_acompcor]
    return columns


def read_confounds(
    path: Path, config: CleanConfig, n_frames: int
) -> tuple[np.ndarray | None, np.ndarray]:
    """(confound matrix (T, C) or None, framewise displacement (T,)) from an fMRIPrep table."""
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a", "NaN", "nan"])
    except Exception as err:
        raise ValueError(f"{path}: cannot read confounds table ({err})") from err
    if len(table) != n_frames:
        raise ValueError(f"{path}: {len(table)} rows but the BOLD run has {n_frames} frames")
    columns = confound_columns(config, list(table.columns))
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: confound columns missing for the chosen strategy: {missing}")
    if config.fd_threshold is not None and "framewise_displacement" not in table.columns:
        raise ValueError(f"{path}: no framewise_displacement column (needed for censoring)")
    # fMRIPrep leaves the first row of derivative-based columns empty: nothing moved before it.
    matrix = table[columns].fillna(0.0).to_numpy(np.float64) if columns else None
    fd = (
        table["framewise_displacement"].fillna(0.0).to_numpy(np.float64)
        if "framewise_displacement" in table.columns
        else np.zeros(n_frames)
    )
    return matrix, fd


def kept_frames(n_frames: int, tr: float, fd: np.ndarray, config: CleanConfig) -> np.ndarray:
    """Frames that survive the initial drop and motion censoring."""
    onsets = np.arange(n_frames) * tr
    kept = onsets >= config.drop_initial_s - 1e-9
    if config.fd_threshold is not None:
        kept &= fd <= config.fd_threshold
    return kept


def clean_series(
    series: np.ndarray,
    tr: float,
    config: CleanConfig,
    confounds: np.ndarray | None = None,
    fd: np.ndarray | None = None,
    source: str = "run",
) -> tuple[np.ndarray, np.ndarray]:
    """Clean one run. Returns (cleaned (T, P) float32 with 0 on non-kept frames, kept (T,) bool).

    Confounds, trend and filter are fitted on the retained frames (after the initial drop);
    censored frames are excluded from the fit through nilearn's ``sample_mask`` (nilearn
    interpolates them before Butterworth filtering, so neighbours are not shifted).
    """
    n_frames, n_parcels = series.shape
    fd = np.zeros(n_frames) if fd is None else fd
    kept = kept_frames(n_frames, tr, fd, config)
    retained = np.arange(n_frames) * tr >= config.drop_initial_s - 1e-9
    out = np.zeros((n_frames, n_parcels), dtype=np.float32)
    n_kept = int(kept.sum())
    if n_kept < 3:
        raise ValueError(
            f"{source}: only {n_kept} frames left after dropping {config.drop_initial_s} s and"
            f" censoring FD > {config.fd_threshold} (of {n_frames}); check the run or the settings"
        )
    retained_idx = np.flatnonzero(retained)
    sample_mask = np.flatnonzero(kept[retained_idx])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        cleaned = signal.clean(
            series[retained_idx].astype(np.float64, copy=False),
            detrend=config.linear_trend,
            standardize="zscore_sample" if config.zscore else False,
            confounds=None if confounds is None else confounds[retained_idx],
            standardize_confounds=True,
            sample_mask=sample_mask if sample_mask.size < retained_idx.size else None,
            filter=config.filter if (config.high_pass_hz or config.low_pass_hz) else False,
            high_pass=config.high_pass_hz,
            low_pass=config.low_pass_hz,
            t_r=tr,
        )
    out[kept] = np.nan_to_num(cleaned.astype(np.float32))
    return out, kept
