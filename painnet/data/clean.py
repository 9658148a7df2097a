"""Cleaning of parcel time series: confound regression, detrending, high-pass, censoring.

Follows the reference study: linear trend, 6 motion parameters, WM and CSF signals, high-pass
0.005 Hz, first 30 s dropped, high-motion frames censored, z-scored per run. Frames are never
removed from the returned arrays: dropped and censored frames are marked ``kept=False`` and
hold 0.0 (the z-scored mean), so frame indices always match the BOLD file.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from nilearn import signal
from scipy.signal import butter, filtfilt

MOTION_6 = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
FD_SOURCES = ("column", "motion")
CENSOR_MODES = ("exclude", "interpolate")


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
    fd_source: ``column`` reads fMRIPrep's ``framewise_displacement``; ``motion`` computes FD
        from the six motion parameters (:func:`framewise_displacement`), optionally low-pass
        filtered first (``fd_low_pass_hz``; the study: 0.1 Hz, because multiband TR 0.46 s
        makes raw FD follow respiration) with rotations as arc length on ``head_radius_mm``
        (50) -- preprocessing_cocoan_func.m:330-360. The study censors FD > 0.15 mm
        (``fd_threshold``, line 331; its reporting summary says 0.2).
    n_wm_compcor / n_csf_compcor: leading fMRIPrep ``w_comp_cor_XX`` / ``c_comp_cor_XX``
        components to regress (the study: 5 + 5 from eroded WM / CSF masks, lines 346-354).
    censor_mode: ``exclude`` (nilearn ``sample_mask``: censored frames leave the confound fit,
        are interpolated only for the Butterworth filter); ``interpolate`` (the study's AFNI
        ``3dTproject -cenmode NTRP``, line 363: censored frames are replaced by linear
        interpolation of their kept neighbours before the regression and filter, then dropped;
        z-scoring uses the kept frames only).
    rest_low_pass_hz: low-pass cut-off used instead of ``low_pass_hz`` for rest runs (see
        :meth:`for_task`; the study band-passes rest runs 0.005-0.1 Hz and only high-passes
        rating runs at 0.005 Hz, lines 333-337).
    causal: clean with past frames only (:mod:`painnet.data.causal`, the real-time path):
        exponentially weighted confound regression whose forgetting is the high-pass,
        running z-score; ``low_pass_hz`` is not supported and ``filter`` is not used.
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
    causal: bool = False
    fd_source: str = "column"
    fd_low_pass_hz: float | None = None
    head_radius_mm: float = 50.0
    n_wm_compcor: int = 0
    n_csf_compcor: int = 0
    censor_mode: str = "exclude"
    rest_low_pass_hz: float | None = None

    def __post_init__(self):
        if self.fd_source not in FD_SOURCES:
            raise ValueError(f"clean.fd_source must be one of {FD_SOURCES}, got {self.fd_source!r}")
        if self.censor_mode not in CENSOR_MODES:
            raise ValueError(
                f"clean.censor_mode must be one of {CENSOR_MODES}, got {self.censor_mode!r}"
            )
        if self.fd_low_pass_hz is not None and not self.fd_low_pass_hz > 0:
            raise ValueError(f"clean.fd_low_pass_hz must be > 0 or null, got {self.fd_low_pass_hz}")
        if self.fd_low_pass_hz is not None and self.fd_source != "motion":
            raise ValueError(
                "clean.fd_low_pass_hz filters the motion parameters: it needs "
                "clean.fd_source=motion (the framewise_displacement column is already computed)"
            )
        if not self.head_radius_mm > 0:
            raise ValueError(f"clean.head_radius_mm must be > 0, got {self.head_radius_mm}")
        for name in ("n_wm_compcor", "n_csf_compcor", "n_acompcor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"clean.{name} must be an int >= 0, got {value!r}")
        if self.causal and self.censor_mode == "interpolate":
            raise ValueError("clean.censor_mode=interpolate needs future frames: not with causal")
        if self.causal and self.low_pass_hz is not None:
            raise ValueError("clean.low_pass_hz must be null with clean.causal=true")
        if self.motion not in (0, 6, 24):
            raise ValueError(f"clean.motion must be 0, 6 or 24, got {self.motion}")
        if self.filter not in ("butterworth", "cosine"):
            raise ValueError(f"clean.filter must be 'butterworth' or 'cosine', got {self.filter!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    def for_task(self, task: str) -> CleanConfig:
        """The config for a run of ``task``: rest runs use ``rest_low_pass_hz`` (if set) as
        their low-pass, i.e. a band-pass with ``high_pass_hz``."""
        if task == "rest" and self.rest_low_pass_hz is not None:
            return replace(self, low_pass_hz=self.rest_low_pass_hz)
        return self


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
    for prefix, count, key in (
        ("w_comp_cor_", config.n_wm_compcor, "n_wm_compcor"),
        ("c_comp_cor_", config.n_csf_compcor, "n_csf_compcor"),
    ):
        found = sorted(c for c in available if c.startswith(prefix))
        if count > len(found):
            raise ValueError(
                f"clean.{key}={count} but only {len(found)} {prefix}XX columns exist "
                "(fMRIPrep writes them with its tissue-specific aCompCor)"
            )
        columns += found[:count]
    return columns


def framewise_displacement(
    motion: np.ndarray,
    tr: float | None = None,
    low_pass_hz: float | None = None,
    head_radius_mm: float = 50.0,
) -> np.ndarray:
    """Framewise displacement (T,) in mm from motion parameters (T, 6).

    ``motion`` columns as fMRIPrep: trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z
    (radians). The study (preprocessing_cocoan_func.m:356-359): low-pass the parameters with a
    2nd-order Butterworth filter applied forward and backward (MATLAB ``filtfilt``, reproduced
    with scipy's odd padding of ``3 (order + 1 - 1)`` samples), turn rotations into arc length
    on a ``head_radius_mm`` sphere, and sum the absolute frame-to-frame differences; the first
    frame has FD 0. ``low_pass_hz=None`` skips the filter (Power et al.'s FD).
    """
    params = np.asarray(motion, dtype=np.float64)
    if params.ndim != 2 or params.shape[1] != 6:
        raise ValueError(f"motion parameters must be (T, 6), got {params.shape}")
    if low_pass_hz is not None:
        if tr is None or not tr > 0:
            raise ValueError("framewise_displacement: a low-pass filter needs the TR in seconds")
        nyquist = 0.5 / tr
        if not low_pass_hz < nyquist:
            raise ValueError(
                f"clean.fd_low_pass_hz={low_pass_hz} is not below the Nyquist frequency "
                f"{nyquist:.3g} Hz of TR {tr} s"
            )
        b, a = butter(2, low_pass_hz / nyquist, btype="low")
        pad = 3 * (max(len(a), len(b)) - 1)  # MATLAB filtfilt's edge padding
        if params.shape[0] <= pad:
            raise ValueError(f"framewise_displacement: {params.shape[0]} frames are too few")
        params = filtfilt(b, a, params, axis=0, padtype="odd", padlen=pad)
    moved = np.column_stack([params[:, :3], params[:, 3:] * head_radius_mm])
    return np.r_[0.0, np.abs(np.diff(moved, axis=0)).sum(axis=1)]


def read_confounds(
    path: Path, config: CleanConfig, n_frames: int | None, tr: float | None = None
) -> tuple[np.ndarray | None, np.ndarray]:
    """(confound matrix (T, C) or None, framewise displacement (T,)) from an fMRIPrep table.

    FD is the ``framewise_displacement`` column (``clean.fd_source=column``) or computed from
    the six motion columns (``motion``, see :func:`framewise_displacement`; a low-pass filter
    needs ``tr``). ``n_frames=None`` skips the row-count check (the table is then checked on
    its own, before the BOLD file is read).

    Missing values (``n/a``, NaN, inf, text) in a used column: fMRIPrep writes ``n/a`` in the
    *leading* row(s) of columns that need a previous frame (``*_derivative1*``,
    ``framewise_displacement``): nothing moved before the first frame, so those leading values
    are filled with 0. A missing value *after* the column's first number is damage, never
    filled: a ValueError names the file, the column and the first bad row. The motion
    columns read for ``fd_source=motion`` must be complete (no leading n/a either).
    """
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a", "NaN", "nan"])
    except Exception as err:
        raise ValueError(f"{path}: cannot read confounds table ({err})") from err
    if n_frames is not None and len(table) != n_frames:
        raise ValueError(f"{path}: {len(table)} rows but the BOLD run has {n_frames} frames")
    columns = confound_columns(config, list(table.columns))
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: confound columns missing for the chosen strategy: {missing}")
    matrix = (
        np.column_stack([_confound_values(table, c, path) for c in columns]) if columns else None
    )
    if config.fd_source == "motion":
        absent = [c for c in MOTION_6 if c not in table.columns]
        if absent:
            raise ValueError(f"{path}: motion columns {absent} missing (clean.fd_source=motion)")
        if config.fd_low_pass_hz is not None and tr is None:
            raise ValueError(
                f"{path}: clean.fd_low_pass_hz needs the run's TR; pass tr= to read_confounds"
            )
        motion = np.column_stack(
            [_confound_values(table, c, path, leading_na=False) for c in MOTION_6]
        )
        fd = framewise_displacement(motion, tr, config.fd_low_pass_hz, config.head_radius_mm)
        return matrix, fd
    if config.fd_threshold is not None and "framewise_displacement" not in table.columns:
        raise ValueError(f"{path}: no framewise_displacement column (needed for censoring)")
    if config.fd_threshold is not None:
        fd = _confound_values(table, "framewise_displacement", path)
    elif "framewise_displacement" in table.columns:  # not used for censoring: read leniently
        fd = pd.to_numeric(table["framewise_displacement"], errors="coerce")
        fd = fd.fillna(0.0).to_numpy(np.float64)
    else:
        fd = np.zeros(len(table))
    return matrix, fd


def _confound_values(
    table: pd.DataFrame, column: str, path: Path, leading_na: bool = True
) -> np.ndarray:
    """One used confounds column as floats; leading n/a rows are 0 when ``leading_na``, any
    other missing or non-numeric value is a ValueError naming the file, column and row."""
    values = np.array(pd.to_numeric(table[column], errors="coerce"), dtype=np.float64)
    bad = ~np.isfinite(values)
    if not bad.any():
        return values
    if bad.all():
        raise ValueError(f"{path}: confounds column {column!r} holds no number (all n/a)")
    lead = int(np.argmax(~bad)) if leading_na else 0
    later = np.flatnonzero(bad[lead:])
    if later.size:
        row = lead + int(later[0])
        where = "after its first number" if lead or row else "in its first row"
        raise ValueError(
            f"{path}: confounds column {column!r} has a missing or non-numeric value "
            f"({table[column].iloc[row]!r}) at row {row} (frame {row}, line {row + 2} of the "
            f"file), {where}; only the leading rows of derivative columns and "
            "framewise_displacement may be n/a (fMRIPrep), and a gap is not filled"
        )
    values[:lead] = 0.0  # fMRIPrep's leading n/a: nothing moved before the first frame
    return values


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
    censor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Clean one run. Returns (cleaned (T, P) float32 with 0 on non-kept frames, kept (T,) bool).

    ``censor`` (bool (T,), True = censor) marks more frames to censor like high-motion ones,
    e.g. frames with non-finite voxels inside parcels (:mod:`painnet.data.preprocess`).

    Confounds, trend and filter are fitted on the retained frames (after the initial drop).
    ``censor_mode="exclude"``: censored frames are excluded from the fit through nilearn's
    ``sample_mask`` (nilearn interpolates them before Butterworth filtering, so neighbours are
    not shifted). ``"interpolate"`` (the study's ``3dTproject -cenmode NTRP``,
    preprocessing_cocoan_func.m:363): censored frames are first replaced by linear
    interpolation of the kept frames around them, the whole retained stretch is regressed and
    filtered, then censored frames are dropped and the kept ones z-scored.
    """
    n_frames, n_parcels = series.shape
    fd = np.zeros(n_frames) if fd is None else fd
    kept = kept_frames(n_frames, tr, fd, config)
    if censor is not None:
        censor = np.asarray(censor, dtype=bool)
    n_extra = 0 if censor is None else int(np.count_nonzero(censor & kept))
    if censor is not None:
        kept &= ~censor
    retained = np.arange(n_frames) * tr >= config.drop_initial_s - 1e-9
    out = np.zeros((n_frames, n_parcels), dtype=np.float32)
    n_kept = int(kept.sum())
    if n_kept < 3:
        raise ValueError(
            f"{source}: only {n_kept} frames left after dropping {config.drop_initial_s} s and"
            f" censoring FD > {config.fd_threshold}"
            + (f" and {n_extra} frames with non-finite values" if n_extra else "")
            + f" (of {n_frames}); check the run or the settings"
        )
    retained_idx = np.flatnonzero(retained)
    sample_mask = np.flatnonzero(kept[retained_idx])
    data = series[retained_idx].astype(np.float64, copy=False)
    interpolate = config.censor_mode == "interpolate" and sample_mask.size < retained_idx.size
    if interpolate:
        data = interpolate_censored(data, kept[retained_idx])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        cleaned = signal.clean(
            data,
            detrend=config.linear_trend,
            standardize="zscore_sample" if config.zscore and not interpolate else False,
            confounds=None if confounds is None else confounds[retained_idx],
            standardize_confounds=True,
            sample_mask=sample_mask
            if sample_mask.size < retained_idx.size and not interpolate
            else None,
            filter=config.filter if (config.high_pass_hz or config.low_pass_hz) else False,
            high_pass=config.high_pass_hz,
            low_pass=config.low_pass_hz,
            t_r=tr,
        )
    if interpolate:
        cleaned = cleaned[kept[retained_idx]]
        if config.zscore:
            sd = cleaned.std(axis=0, ddof=1)
            cleaned = (cleaned - cleaned.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    out[kept] = np.nan_to_num(cleaned.astype(np.float32))
    return out, kept


def interpolate_censored(data: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Copy of ``data`` (T, P) whose frames with ``kept`` false are linearly interpolated from
    the nearest kept frames (held constant before the first / after the last kept frame)."""
    kept = np.asarray(kept, dtype=bool)
    frames = np.arange(data.shape[0])
    out = np.array(data, dtype=np.float64, copy=True)
    good = frames[kept]
    for p in range(out.shape[1]):
        out[~kept, p] = np.interp(frames[~kept], good, out[kept, p])
    return out
