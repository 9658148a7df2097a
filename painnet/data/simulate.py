"""Synthetic pain-rating fMRI dataset in BIDS layout with fMRIPrep-style derivatives.

The simulator writes exactly the data contract of ``DESIGN.md`` (raw ratings, preprocessed BOLD,
confounds, an atlas), so simulated and real data take the same reading code path. The ground truth
(which parcels carry pain, latent pain per frame) goes to ``derivatives/simulation``.

Generative model, per participant / session / run:

* Latent pain: a smooth Ornstein-Uhlenbeck process plus occasional flares, in logit units, passed
  through a sigmoid, on the rating clock (``rating_hz``, from ``rating_start_s`` < 0). The rating is
  latent pain + a session reporting bias + slider noise, clipped to [0, 1].
* Parcel signals (percent signal change): HRF-convolved pain times participant-specific signed
  weights (activation set), plus a shared fluctuation whose amplitude grows with pain (coupled set,
  the co-fluctuation code), plus AR(1) noise, low-rank network noise, slow drift. Sessions differ by
  a signal gain, jittered weights, pain offset and noise level.
* Voxels: parcel signal + voxel noise + WM/CSF-like nuisance + a global scanner drift on an
  intensity baseline (100-1000), then head-motion artifacts: an intensity shift linear in the six
  rigid-body parameters (baseline gradient times displacement) and a spin-history dip at spikes.
* Head motion: slow drift + spikes that are more likely while pain is rising.

Randomness is derived from ``(seed, stream, subject, session, run)``, so every run is generated
independently of the others, and all gzip streams are written with ``mtime=0``: the same seed and
parameters give byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage, signal, special, stats
from scipy.spatial import cKDTree

SIMULATOR_VERSION = 1
SPACE = "MNI152NLin2009cAsym"
ATLAS_NAME = "Sim"
FD_RADIUS_MM = 50.0  # Power et al. framewise displacement: rotations as arc length on 50 mm
N_COMPCOR = 6
MAX_THREADS = 4  # sessions simulated in parallel (threads)
GZIP_LEVEL = 4  # float noise barely compresses further at higher levels; this is much faster
BRAIN_CENTRE_MM = np.array([0.0, -18.0, 16.0])  # centre of the simulated box in MNI space
BRAIN_ASPECT = np.array([0.80, 1.0, 0.75])  # x:y:z proportions of the ellipsoid mask
HRF_DURATION_S = 32.0
BURN_IN_S = 40.0  # latent pain simulated this long before the first rating (HRF history)
RATING_TAIL_S = 2.0  # ratings continue this long after the end of the last frame
MOTION_NAMES = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]

# Random-number streams: each gets its own seed so generation order never matters.
_STREAM_ATLAS, _STREAM_NETWORK, _STREAM_SESSION, _STREAM_RUN = 11, 23, 37, 51
_STREAM_REST = 67  # rest runs: their own stream, so adding them leaves the rating runs unchanged

_COMMON: dict = {
    "n_subjects": 2,
    "n_sessions": 3,  # int, or one int per subject
    "n_runs": 2,
    "run_s": 120.0,  # seconds per run
    "tr": 0.46,  # seconds
    "n_parcels": 12,
    "voxels_per_parcel": 10,  # approximate
    "voxel_mm": 3.0,
    "rating_hz": 60.0,
    "rating_start_s": -2.0,  # ratings start before the first volume
    "activation_gain": 1.0,  # % signal change per unit of (HRF-convolved) pain and unit weight
    "coupling_gain": 1.0,  # % amplitude of the shared fluctuation at pain = 1
    "n_pain_parcels": 3,  # activation set size
    "n_coupled_parcels": 3,  # co-fluctuation set size
    "noise_sd": 1.0,  # % AR(1) noise per parcel
    "ar_coef": 0.6,  # AR(1) coefficient of the parcel noise (per frame)
    "n_network_components": 4,
    "network_sd": 0.8,  # % low-rank noise shared across parcels
    "drift_sd": 0.6,  # % slow drift per parcel (linear + cosines longer than 150 s)
    "voxel_noise_sd": 1.5,  # % independent noise per voxel
    "nuisance_sd": 0.8,  # % WM/CSF-like physiological nuisance per voxel
    "motion_drift_mm": 0.15,  # sd of slow head drift (translations; rotations / 50 mm)
    "spike_mm": 0.5,  # mean spike size (mm, rotations counted at 50 mm)
    "motion_spike_rate": 1.5,  # spikes per minute on average
    "spike_rise_factor": 4.0,  # spike rate while pain rises / while it falls
    "motion_artifact": 0.5,  # scales the intensity-gradient motion artifact
    "spin_history_pct": 1.5,  # % intensity drop per mm of FD at a spike
    "pain_tau_s": 20.0,  # time constant of the latent pain process
    "pain_sd_logit": 1.0,  # sd of the latent pain process in logit units
    "flare_rate_per_min": 0.5,
    "flare_logit": 1.2,  # mean flare height in logit units
    "slider_noise_sd": 0.02,
    "session_gain_sd": 0.2,  # log-sd of the per-session signal gain
    "session_weight_jitter": 0.15,  # relative per-session jitter of the pain weights
    "session_offset_logit": 0.5,  # sd of the per-session pain offset (logit units)
    "rating_bias_sd": 0.03,  # sd of the per-session reporting bias of the slider
    "bold_format": "nii.gz",
    "task": "rating",
    # Unlabelled runs per session (task-rest: BOLD and confounds, no ratings), for
    # self-supervised pretraining. Left out of params.json at 0, so the datasets written before
    # this option existed (and their folder names) stay valid.
    "rest_runs": 0,
}
# Parameters recorded in params.json only when they differ from these values.
_RECORDED_IF_SET = {"rest_runs": 0}
REST_TASK = "rest"

PRESETS: dict[str, dict] = {
    # Tests: seconds to generate, strong signal.
    "tiny": {
        **_COMMON,
        "activation_gain": 14.0,
        "coupling_gain": 6.0,
        "noise_sd": 0.7,
        "network_sd": 0.5,
        # Fast pain and little head drift: 120-s runs leave few independent pain swings after
        # the first 30 s are dropped, and slow regressors would absorb them.
        "pain_tau_s": 5.0,
        "motion_drift_mm": 0.03,
        "session_offset_logit": 0.3,
    },
    # The README's main job: moderate signal, well under a minute to generate.
    "demo": {
        **_COMMON,
        "n_sessions": 8,
        "n_runs": 3,
        "run_s": 300.0,
        "n_parcels": 100,
        "voxels_per_parcel": 8,
        "n_pain_parcels": 10,
        "n_coupled_parcels": 10,
        "activation_gain": 2.0,
        "coupling_gain": 2.0,
    },
    # The reference study's size (Lee et al. 2026): 23 and 28 sessions, 3 x 600 s runs.
    "paper": {
        **_COMMON,
        "n_sessions": [23, 28],
        "n_runs": 3,
        "run_s": 600.0,
        "n_parcels": 400,
        "voxels_per_parcel": 4,
        "n_pain_parcels": 30,
        "n_coupled_parcels": 30,
        "activation_gain": 1.0,
        "coupling_gain": 1.0,
    },
    # Decoder variants (benchmarks/decoders.py): where pain lives, at demo-like signal levels,
    # with TR, run length, parcel count and rating rate all unlike demo. Tuned on: demo and
    # var_both; reported only: the others (see benchmarks/decoders.md).
    "var_cofluct": {  # pain only in co-fluctuation
        **_COMMON,
        "n_sessions": 7,
        "n_runs": 2,
        "run_s": 300.0,
        "tr": 0.8,
        "rating_hz": 10.0,
        "n_parcels": 80,
        "voxels_per_parcel": 8,
        "n_pain_parcels": 10,
        "n_coupled_parcels": 10,
        "activation_gain": 0.0,
        "coupling_gain": 2.5,
    },
    "var_activation": {  # pain only in activation (z-scoring hides its session level)
        **_COMMON,
        "n_sessions": 6,
        "n_runs": 3,
        "run_s": 360.0,
        "tr": 1.0,
        "rating_hz": 5.0,
        "n_parcels": 60,
        "voxels_per_parcel": 8,
        "n_pain_parcels": 8,
        "n_coupled_parcels": 8,
        "activation_gain": 2.0,
        "coupling_gain": 0.0,
    },
    "var_both": {  # both codes, large session-level pain offsets
        **_COMMON,
        "n_sessions": 7,
        "n_runs": 2,
        "run_s": 300.0,
        "tr": 0.72,
        "rating_hz": 30.0,
        "n_parcels": 90,
        "voxels_per_parcel": 8,
        "n_pain_parcels": 10,
        "n_coupled_parcels": 10,
        "activation_gain": 2.0,
        "coupling_gain": 2.0,
        "session_offset_logit": 1.0,
    },
    "var_both_slow": {  # both codes, session offsets, slow TR and a 1 Hz slider
        **_COMMON,
        "n_sessions": 8,
        "n_runs": 3,
        "run_s": 420.0,
        "tr": 2.0,
        "rating_hz": 1.0,
        "n_parcels": 50,
        "voxels_per_parcel": 10,
        "n_pain_parcels": 6,
        "n_coupled_parcels": 6,
        "activation_gain": 2.0,
        "coupling_gain": 2.0,
        "session_offset_logit": 0.8,
    },
    # Held out, added after the others were read: both codes and session offsets with a
    # session count nearer the study's (23 and 28), where a stack has more inner sessions.
    "var_both_long": {
        **_COMMON,
        "n_sessions": 14,
        "n_runs": 3,
        "run_s": 360.0,
        "tr": 1.2,
        "rating_hz": 2.0,
        "n_parcels": 70,
        "voxels_per_parcel": 8,
        "n_pain_parcels": 8,
        "n_coupled_parcels": 8,
        "activation_gain": 2.0,
        "coupling_gain": 2.0,
        "session_offset_logit": 0.8,
    },
    # Held out, added with the stack's session-scaled within-run weights (before any loop ran on
    # them; benchmarks/decoders.py runs them with a fresh seed): co-fluctuation only with few,
    # slow frames, and both codes at weaker gains with many parcels and a short TR.
    "var_cofluct_sparse": {
        **_COMMON,
        "n_sessions": 9,
        "n_runs": 2,
        "run_s": 270.0,
        "tr": 1.5,
        "rating_hz": 4.0,
        "n_parcels": 40,
        "voxels_per_parcel": 10,
        "n_pain_parcels": 6,
        "n_coupled_parcels": 6,
        "activation_gain": 0.0,
        "coupling_gain": 2.5,
    },
    "var_both_dense": {
        **_COMMON,
        "n_sessions": 10,
        "n_runs": 2,
        "run_s": 240.0,
        "tr": 0.6,
        "rating_hz": 3.0,
        "n_parcels": 120,
        "voxels_per_parcel": 6,
        "n_pain_parcels": 12,
        "n_coupled_parcels": 12,
        "activation_gain": 1.5,
        "coupling_gain": 1.5,
        "session_offset_logit": 0.5,
    },
    # Held out, added with the stack's fitted anchor weights and leave-one-session-out inner
    # predictions (before any loop ran on them; seeds 13 and 21): both codes at a coarse TR with a
    # slow slider, and co-fluctuation only over many parcels.
    "var_both_coarse": {
        **_COMMON,
        "n_sessions": 7,
        "n_runs": 3,
        "run_s": 480.0,
        "tr": 2.5,
        "rating_hz": 0.5,
        "n_parcels": 64,
        "voxels_per_parcel": 10,
        "n_pain_parcels": 7,
        "n_coupled_parcels": 7,
        "activation_gain": 1.5,
        "coupling_gain": 2.0,
        "session_offset_logit": 0.6,
    },
    "var_cofluct_wide": {
        **_COMMON,
        "n_sessions": 10,
        "n_runs": 2,
        "run_s": 300.0,
        "tr": 1.0,
        "rating_hz": 20.0,
        "n_parcels": 100,
        "voxels_per_parcel": 8,
        "n_pain_parcels": 8,
        "n_coupled_parcels": 8,
        "activation_gain": 0.0,
        "coupling_gain": 2.0,
        "session_offset_logit": 0.7,
    },
    # Held out, added with the stack's screened anchors and correlation-weighted within-run
    # parts (before any loop ran on them; seeds 29 and 37): both codes in many short runs, and
    # co-fluctuation only in long runs with a slow slider.
    "var_both_brief": {
        **_COMMON,
        "n_sessions": 8,
        "n_runs": 4,
        "run_s": 240.0,
        "tr": 1.8,
        "rating_hz": 1.5,
        "n_parcels": 56,
        "voxels_per_parcel": 10,
        "n_pain_parcels": 7,
        "n_coupled_parcels": 7,
        "activation_gain": 1.5,
        "coupling_gain": 2.0,
        "session_offset_logit": 0.9,
    },
    "var_cofluct_slow": {
        **_COMMON,
        "n_sessions": 8,
        "n_runs": 2,
        "run_s": 540.0,
        "tr": 2.0,
        "rating_hz": 0.8,
        "n_parcels": 72,
        "voxels_per_parcel": 8,
        "n_pain_parcels": 8,
        "n_coupled_parcels": 8,
        "activation_gain": 0.0,
        "coupling_gain": 2.0,
        "session_offset_logit": 0.5,
    },
    # Held out, added after the seventh run's stack rule was fixed (before any loop ran on them;
    # seeds 41 and 43): activation only in runs of the study's length, and both codes with the
    # co-fluctuation code weaker than the activation code over many parcels.
    "var_activation_long": {
        **_COMMON,
        "n_sessions": 6,
        "n_runs": 2,
        "run_s": 600.0,
        "tr": 0.8,
        "rating_hz": 10.0,
        "n_parcels": 80,
        "voxels_per_parcel": 8,
        "n_pain_parcels": 10,
        "n_coupled_parcels": 10,
        "activation_gain": 1.5,
        "coupling_gain": 0.0,
        "session_offset_logit": 0.6,
    },
    "var_both_weak": {
        **_COMMON,
        "n_sessions": 9,
        "n_runs": 3,
        "run_s": 300.0,
        "tr": 1.4,
        "rating_hz": 2.5,
        "n_parcels": 110,
        "voxels_per_parcel": 6,
        "n_pain_parcels": 11,
        "n_coupled_parcels": 11,
        "activation_gain": 2.0,
        "coupling_gain": 1.2,
        "session_offset_logit": 0.8,
    },
    # Held out, added with the stack's common run-level origin (eighth run; before any loop ran
    # on them; seeds 47 and 53): both codes with a weak activation code in short runs, and
    # activation only at a slow TR.
    "var_both_lowact": {
        **_COMMON,
        "n_sessions": 8,
        "n_runs": 3,
        "run_s": 200.0,
        "tr": 0.9,
        "rating_hz": 2.0,
        "n_parcels": 84,
        "voxels_per_parcel": 8,
        "n_pain_parcels": 9,
        "n_coupled_parcels": 9,
        "activation_gain": 1.0,
        "coupling_gain": 1.8,
        "session_offset_logit": 0.7,
    },
    "var_activation_slow": {
        **_COMMON,
        "n_sessions": 7,
        "n_runs": 2,
        "run_s": 480.0,
        "tr": 2.2,
        "rating_hz": 1.0,
        "n_parcels": 48,
        "voxels_per_parcel": 10,
        "n_pain_parcels": 6,
        "n_coupled_parcels": 6,
        "activation_gain": 2.0,
        "coupling_gain": 0.0,
        "session_offset_logit": 0.5,
    },
}
# Tests: tiny with pain only in co-fluctuation (half the parcels coupled, 4-min runs: a
# co-fluctuation amplitude is a slow, noisy read-out and needs pairs and frames to show).
PRESETS["tiny_cofluct"] = {
    **PRESETS["tiny"],
    "run_s": 240.0,
    "n_pain_parcels": 0,
    "n_coupled_parcels": 6,
    "activation_gain": 0.0,
    "coupling_gain": 8.0,
    "network_sd": 0.3,
}


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
def resolve_params(preset: str, overrides: Mapping | None = None) -> dict:
    """The full parameter dict of ``preset`` with ``overrides`` applied, coerced and validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown simulation preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[preset]
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ValueError(
            f"unknown simulation parameter(s) {unknown}; valid keys: {', '.join(sorted(base))}"
        )
    params = dict(base)
    for key, value in overrides.items():
        params[key] = _coerce(key, value, base[key])
    _validate(params)
    return params


def _coerce(key: str, value, default):
    """Cast an override to the type of the preset's value (so 0 and 0.0 are the same dataset)."""
    if key == "n_sessions":
        if isinstance(value, Sequence) and not isinstance(value, str):
            return [_as_int(key, v) for v in value]
        return _as_int(key, value)
    if isinstance(default, str):
        return str(value)
    if isinstance(default, int):
        return _as_int(key, value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise ValueError(f"simulation parameter {key} must be a number, got {value!r}")
        return float(value)
    return value


def _as_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ValueError(f"simulation parameter {key} must be an integer, got {value!r}")
    if float(value) != int(value):
        raise ValueError(f"simulation parameter {key} must be an integer, got {value!r}")
    return int(value)


def _validate(p: dict) -> None:
    """Raise ValueError naming the first inconsistent parameter."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"invalid simulation parameters: {message}")

    need(p["n_subjects"] >= 1, f"n_subjects must be >= 1, got {p['n_subjects']}")
    sessions = p["n_sessions"]
    if isinstance(sessions, list):
        need(
            len(sessions) == p["n_subjects"],
            f"n_sessions lists {len(sessions)} values for {p['n_subjects']} subjects",
        )
    need(min(sessions_per_subject(p)) >= 1, f"n_sessions must be >= 1, got {sessions}")
    need(p["n_runs"] >= 1, f"n_runs must be >= 1, got {p['n_runs']}")
    need(p["rest_runs"] >= 0, f"rest_runs must be >= 0, got {p['rest_runs']}")
    need(p["tr"] > 0, f"tr must be > 0, got {p['tr']}")
    need(p["run_s"] >= 10 * p["tr"], f"run_s={p['run_s']} is shorter than 10 frames")
    need(p["rating_hz"] > 0, f"rating_hz must be > 0, got {p['rating_hz']}")
    need(p["rating_start_s"] <= 0, f"rating_start_s must be <= 0, got {p['rating_start_s']}")
    need(
        2 <= p["n_parcels"] <= 32767,
        f"n_parcels must be in 2..32767 (int16 labels), got {p['n_parcels']}",
    )
    need(p["voxels_per_parcel"] >= 1, "voxels_per_parcel must be >= 1")
    need(2.0 <= p["voxel_mm"] <= 4.0, f"voxel_mm must be within 2-4 mm, got {p['voxel_mm']}")
    need(
        p["n_pain_parcels"] >= 0
        and p["n_coupled_parcels"] >= 0
        and p["n_pain_parcels"] + p["n_coupled_parcels"] <= p["n_parcels"],
        "n_pain_parcels + n_coupled_parcels must be between 0 and n_parcels",
    )
    need(0.0 <= p["ar_coef"] < 1.0, f"ar_coef must be in [0, 1), got {p['ar_coef']}")
    need(p["n_network_components"] >= 0, "n_network_components must be >= 0")
    need(p["pain_tau_s"] > 0, "pain_tau_s must be > 0")
    need(p["spike_rise_factor"] > 0, "spike_rise_factor must be > 0")
    for key in (
        "activation_gain", "coupling_gain", "noise_sd", "network_sd", "drift_sd", "voxel_noise_sd",
        "nuisance_sd", "motion_drift_mm", "spike_mm", "motion_spike_rate", "motion_artifact",
        "spin_history_pct", "pain_sd_logit", "flare_rate_per_min", "flare_logit",
        "slider_noise_sd", "session_gain_sd", "session_weight_jitter", "session_offset_logit",
        "rating_bias_sd",
    ):  # fmt: skip
        need(p[key] >= 0, f"{key} must be >= 0, got {p[key]}")
    need(
        p["bold_format"] in ("nii.gz", "nii"),
        f"bold_format must be 'nii.gz' or 'nii', got {p['bold_format']!r}",
    )
    need(str(p["task"]).isalnum(), f"task must be alphanumeric (a BIDS label), got {p['task']!r}")
    need(
        not (p["rest_runs"] and p["task"] == REST_TASK),
        f"task must not be {REST_TASK!r} when rest_runs > 0 (the rest runs use that label)",
    )


def sessions_per_subject(params: dict) -> list[int]:
    """Number of sessions of each subject (``n_sessions`` may be one int or a list)."""
    sessions = params["n_sessions"]
    if isinstance(sessions, list):
        return [int(s) for s in sessions]
    return [int(sessions)] * int(params["n_subjects"])


def n_frames_per_run(params: dict) -> int:
    return int(round(params["run_s"] / params["tr"]))


def _rng(seed: int, stream: int, *indices: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream, *indices])


# --------------------------------------------------------------------------------------------
# Geometry: voxel grid, parcels, spatial patterns
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """The voxel grid shared by every run and the atlas.

    shape: box shape (X, Y, Z); affine: (4, 4) voxel -> MNI mm; mask: (X, Y, Z) bool.
    Per mask voxel (M voxels, C order of ``mask``): parcel (M,) int 0..P-1; baseline (M,)
    intensity; motion_basis (M, 6) intensity change per mm / per radian of the six rigid-body
    parameters; nuisance_loadings (N_COMPCOR, M) in units of ``nuisance_sd``; spin_pattern (M,).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    parcel: np.ndarray
    parcel_names: list[str]
    baseline: np.ndarray
    motion_basis: np.ndarray
    nuisance_loadings: np.ndarray
    spin_pattern: np.ndarray

    @property
    def n_voxels(self) -> int:
        return int(self.parcel.size)


def make_grid(params: dict, seed: int) -> Grid:
    """Box with an ellipsoid brain mask of about ``n_parcels * voxels_per_parcel`` voxels."""
    rng = _rng(seed, _STREAM_ATLAS)
    n_target = max(params["n_parcels"] * params["voxels_per_parcel"], params["n_parcels"])
    scale = (3.0 * n_target / (4.0 * np.pi * np.prod(BRAIN_ASPECT))) ** (1.0 / 3.0)
    semi = np.maximum(scale * BRAIN_ASPECT, 1.0)  # ellipsoid semi-axes in voxels
    shape = tuple(int(np.ceil(2 * s)) + 3 for s in semi)
    centre = (np.array(shape) - 1) / 2.0
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    radius = np.sqrt((((ijk - centre) / semi) ** 2).sum(axis=-1))  # 1 at the ellipsoid surface
    mask = radius <= 1.0
    if mask.sum() < params["n_parcels"]:  # tiny ellipsoids can miss the target: grow the mask
        mask = radius <= np.sort(radius.ravel())[params["n_parcels"] - 1]

    vox = params["voxel_mm"]
    affine = np.diag([vox, vox, vox, 1.0])
    affine[:3, 3] = BRAIN_CENTRE_MM - vox * centre
    coords = ijk[mask].astype(float)  # (M, 3) voxel indices, C order
    parcel = _parcellate(coords, params["n_parcels"], rng)
    parcel, names = _order_parcels(parcel, coords * vox + affine[:3, 3], params["n_parcels"])
    labels = np.zeros(shape, dtype=np.int16)
    labels[mask] = parcel + 1

    intensity = _baseline_image(radius, rng)
    gradient = np.stack(np.gradient(intensity, vox), axis=-1)[mask]  # (M, 3) per mm
    offset_mm = (coords - centre) * vox  # lever arm of rotations about the box centre
    motion_basis = np.concatenate([gradient, np.cross(offset_mm, gradient)], axis=1)
    r = radius[mask]
    return Grid(
        shape=shape,
        affine=affine,
        mask=mask,
        labels=labels,
        parcel=parcel,
        parcel_names=names,
        baseline=intensity[mask],
        motion_basis=motion_basis,
        nuisance_loadings=_nuisance_loadings(mask, r, rng),
        spin_pattern=0.5 + r,
    )


def _parcellate(coords: np.ndarray, n_parcels: int, rng: np.random.Generator) -> np.ndarray:
    """Contiguous blobs: farthest-point seeds refined by a few k-means steps. Returns (M,) 0..P-1."""
    first = int(rng.integers(coords.shape[0]))
    seeds = [first]
    dist = np.linalg.norm(coords - coords[first], axis=1)
    for _ in range(n_parcels - 1):
        nxt = int(np.argmax(dist))
        seeds.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(coords - coords[nxt], axis=1))
    fallback = cKDTree(coords[seeds]).query(coords)[1]  # every seed owns at least itself
    centres = coords[seeds]
    for _ in range(6):
        assign = cKDTree(centres).query(coords)[1]
        counts = np.bincount(assign, minlength=n_parcels)
        if counts.min() == 0:
            break
        centres = np.stack([np.bincount(assign, coords[:, d]) / counts for d in range(3)], 1)
    assign = cKDTree(centres).query(coords)[1]
    return assign if np.bincount(assign, minlength=n_parcels).min() > 0 else fallback


def _order_parcels(parcel: np.ndarray, mm: np.ndarray, n_parcels: int):
    """Relabel parcels left hemisphere first, then posterior to anterior; name them."""
    counts = np.bincount(parcel, minlength=n_parcels)
    centroid = np.stack([np.bincount(parcel, mm[:, d]) / counts for d in range(3)], 1)
    hemi = np.where(centroid[:, 0] < 0, 0, 1)
    order = np.lexsort((centroid[:, 2], centroid[:, 1], hemi))
    new_index = np.empty(n_parcels, dtype=int)
    new_index[order] = np.arange(n_parcels)
    names = [f"{'LR'[hemi[old]]}H_Sim_{i + 1:03d}" for i, old in enumerate(order)]
    return new_index[parcel], names


def _smooth_field(shape, rng: np.random.Generator, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="nearest")
    return field / field.std()


def _baseline_image(radius: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mean intensity over the whole box: tissue texture inside a soft brain edge (100-1000)."""
    texture = 600.0 + 120.0 * _smooth_field(radius.shape, rng, 1.0)
    envelope = special.expit((1.05 - radius) * 8.0)  # soft edge: strong gradient at the border
    return np.clip(texture, 250.0, 1000.0) * (0.15 + 0.85 * envelope)


def _nuisance_loadings(mask: np.ndarray, r: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N_COMPCOR, M): CSF-like (edge), WM-like (core), then smooth random spatial patterns."""
    csf = r**4 / np.mean(r**4)
    wm = np.clip(1.0 - r**2, 0.0, None)
    wm = wm / wm.mean()
    others = [_smooth_field(mask.shape, rng, 2.0)[mask] * 0.5 for _ in range(N_COMPCOR - 2)]
    return np.stack([csf, wm, *others]) / np.sqrt(2.0)


# --------------------------------------------------------------------------------------------
# Participants and sessions
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Network:
    """A participant's pain network (indices 0-based into parcels).

    act_idx (A,), act_weight (A,) signed; coup_idx (C,), coup_loading (C,) signed;
    net_loadings (P, K) of the network noise; hrf_shape: gamma shape of the HRF's first lobe
    (peak at ``hrf_shape - 1`` s); pain_mu: mean latent pain in logit units.
    """

    act_idx: np.ndarray
    act_weight: np.ndarray
    coup_idx: np.ndarray
    coup_loading: np.ndarray
    net_loadings: np.ndarray
    hrf_shape: float
    pain_mu: float


def draw_network(params: dict, seed: int, subject: int) -> Network:
    """Participant-specific activation and co-fluctuation sets (disjoint within a participant)."""
    rng = _rng(seed, _STREAM_NETWORK, subject)
    n_act, n_coup = params["n_pain_parcels"], params["n_coupled_parcels"]
    order = rng.permutation(params["n_parcels"])
    act_idx, coup_idx = np.sort(order[:n_act]), np.sort(order[n_act : n_act + n_coup])
    k = params["n_network_components"]
    # Each network component loads on about 60% of the parcels.
    net = rng.standard_normal((params["n_parcels"], k)) * (
        rng.random((params["n_parcels"], k)) < 0.6
    )
    return Network(
        act_idx=act_idx,
        act_weight=rng.choice([-1.0, 1.0], n_act) * rng.uniform(0.5, 1.5, n_act),
        coup_idx=coup_idx,
        coup_loading=rng.choice([-1.0, 1.0], n_coup) * rng.uniform(0.7, 1.3, n_coup),
        net_loadings=net / np.sqrt(max(k, 1) * 0.6),
        hrf_shape=float(rng.uniform(5.5, 7.0)),
        pain_mu=float(rng.normal(-0.3, 0.4)),
    )


@dataclass(frozen=True)
class SessionState:
    """What differs between a participant's sessions."""

    gain: float  # multiplies activation and co-fluctuation signals
    act_weight: np.ndarray  # (A,) session-jittered activation weights
    coup_loading: np.ndarray  # (C,) session-jittered coupling loadings
    pain_offset: float  # logit units, shifts the whole session's pain
    rating_bias: float  # slider reporting bias (rating units)
    noise_scale: float
    motion_scale: float
    resp_hz: float  # breathing frequency of the CSF-like nuisance


def draw_session(params: dict, net: Network, seed: int, subject: int, session: int) -> SessionState:
    rng = _rng(seed, _STREAM_SESSION, subject, session)
    jitter = params["session_weight_jitter"]
    return SessionState(
        gain=float(np.exp(rng.normal(0.0, params["session_gain_sd"]))),
        act_weight=net.act_weight * (1.0 + jitter * rng.standard_normal(net.act_weight.size)),
        coup_loading=net.coup_loading * (1.0 + jitter * rng.standard_normal(net.coup_loading.size)),
        pain_offset=float(rng.normal(0.0, params["session_offset_logit"])),
        rating_bias=float(rng.normal(0.0, params["rating_bias_sd"])),
        noise_scale=float(np.exp(rng.normal(0.0, 0.1))),
        motion_scale=float(np.exp(rng.normal(0.0, 0.3))),
        resp_hz=float(rng.uniform(0.22, 0.33)),
    )


# --------------------------------------------------------------------------------------------
# Time series building blocks
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def double_gamma_hrf(dt: float, shape: float = 6.0) -> np.ndarray:
    """Canonical double-gamma HRF sampled every ``dt`` s over 32 s, summing to 1.

    The first lobe is a gamma density with this shape (peak at ``shape - 1`` s, ~5 s for the
    canonical 6), minus an undershoot (shape 16) of one sixth.
    """
    t = np.arange(0.0, HRF_DURATION_S, dt)
    h = stats.gamma.pdf(t, shape) - stats.gamma.pdf(t, 16.0) / 6.0
    h = h / h.sum()
    h.setflags(write=False)  # cached: shared by every caller
    return h


def hrf_noise(rng: np.random.Generator, n: int, k: int, tr: float) -> np.ndarray:
    """(n, k) unit-variance BOLD-like fluctuations: white neural noise convolved with the HRF."""
    h = double_gamma_hrf(tr)
    burn = h.size
    white = rng.standard_normal((n + burn, k))
    out = signal.fftconvolve(white, h[:, None], axes=0)[burn : burn + n]
    return out / np.sqrt(np.sum(h**2))


def ar1_noise(rng: np.random.Generator, n: int, k: int, coef: float) -> np.ndarray:
    """(n, k) stationary AR(1) noise with unit marginal variance."""
    eps = rng.standard_normal((n, k))
    eps[0] /= np.sqrt(1.0 - coef**2)  # start in the stationary distribution
    return signal.lfilter([np.sqrt(1.0 - coef**2)], [1.0, -coef], eps, axis=0)


def slow_drift(rng: np.random.Generator, n: int, k: int, tr: float, sd: float) -> np.ndarray:
    """(n, k) linear trend + cosines with periods >= 150 s, total sd about ``sd``."""
    t = np.arange(n) * tr
    duration = n * tr
    n_cos = max(1, int(2 * duration / 150.0))
    basis = [2.0 * t / duration - 1.0]
    basis += [np.cos(np.pi * j * (t + tr / 2) / duration) for j in range(1, n_cos + 1)]
    basis = np.stack(basis, axis=1) * np.sqrt(2.0)  # each column ~unit variance
    coef = rng.standard_normal((basis.shape[1], k)) * sd / np.sqrt(basis.shape[1])
    return basis @ coef


def _smooth_ou(rng: np.random.Generator, n: int, dt: float, tau: float, smooth_s: float):
    """(n,) Ornstein-Uhlenbeck process (time constant ``tau``) low-passed over ``smooth_s``.

    Starts in the stationary state; unit variance (continuous-time approximation).
    """
    a = np.exp(-dt / tau)
    x0 = rng.standard_normal()
    ou = signal.lfilter([np.sqrt(1 - a**2)], [1.0, -a], rng.standard_normal(n), zi=[a * x0])[0]
    b = np.exp(-dt / smooth_s)
    smooth = signal.lfilter([1 - b], [1.0, -b], ou, zi=[b * ou[0]])[0]
    return smooth / np.sqrt(tau / (tau + smooth_s))


def _flares(rng: np.random.Generator, t: np.ndarray, rate_per_min: float, mean_logit: float):
    """(len(t),) sum of pain flares: fast rise (4-12 s), slow decay (20-60 s), exponential heights."""
    span = t[-1] - t[0] + 60.0
    out = np.zeros_like(t)
    for _ in range(rng.poisson(rate_per_min * span / 60.0)):
        onset = t[0] - 60.0 + rng.uniform(0.0, span)
        height, rise, decay = rng.exponential(mean_logit), rng.uniform(4, 12), rng.uniform(20, 60)
        s = np.clip(t - onset, 0.0, None)
        peak = decay / (rise + decay) * (rise / (rise + decay)) ** (rise / decay)
        out += height * (1.0 - np.exp(-s / rise)) * np.exp(-s / decay) / peak
    return out


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------
@dataclass
class PainTrace:
    """Latent pain on the rating clock and its frame-level versions.

    ratings: (N,) in [0, 1], sample k at ``rating_start_s + k / rating_hz``.
    frame_*: (T,) at frame centres ``(i + 0.5) * tr``: latent pain, HRF-convolved pain,
    slope of latent pain (per s).
    """

    ratings: np.ndarray
    frame_pain: np.ndarray
    frame_pain_hrf: np.ndarray
    frame_slope: np.ndarray


def simulate_pain(params, net: Network, sess: SessionState, rng, n_frames: int) -> PainTrace:
    hz, start, tr = params["rating_hz"], params["rating_start_s"], params["tr"]
    dt = 1.0 / hz
    n_burn = int(np.ceil(BURN_IN_S * hz))
    n_rec = int(np.floor((n_frames * tr + RATING_TAIL_S - start) * hz)) + 1
    t = start + np.arange(-n_burn, n_rec) * dt
    logit = (
        net.pain_mu
        + sess.pain_offset
        + params["pain_sd_logit"] * _smooth_ou(rng, t.size, dt, params["pain_tau_s"], 2.0)
        + _flares(rng, t, params["flare_rate_per_min"], params["flare_logit"])
    )
    latent = special.expit(logit)
    slider = params["slider_noise_sd"] * _smooth_ou(rng, t.size, dt, 1.0, 0.2)
    ratings = np.clip(latent + sess.rating_bias + slider, 0.0, 1.0)[n_burn:]

    pain_hrf = signal.fftconvolve(latent, double_gamma_hrf(dt, net.hrf_shape))[: t.size]
    slope = np.gradient(latent, dt)
    centres = (np.arange(n_frames) + 0.5) * tr
    return PainTrace(
        ratings=ratings,
        frame_pain=np.interp(centres, t, latent),
        frame_pain_hrf=np.interp(centres, t, pain_hrf),
        frame_slope=np.interp(centres, t, slope),
    )


@dataclass
class Motion:
    """params: (T, 6) trans (mm) and rot (rad); fd: (T,) Power FD, NaN at frame 0;
    spikes: (T,) bool, frames where a spike starts."""

    params: np.ndarray
    fd: np.ndarray
    spikes: np.ndarray


def simulate_motion(params, sess: SessionState, rng, slope: np.ndarray) -> Motion:
    """Head position: slow drift, breathing pseudo-motion and spikes; spikes are
    ``spike_rise_factor`` times likelier while pain rises than while it falls."""
    tr, n = params["tr"], slope.size
    lever = np.array([1, 1, 1, FD_RADIUS_MM, FD_RADIUS_MM, FD_RADIUS_MM], dtype=float)
    pos = _head_drift(rng, n, tr) * params["motion_drift_mm"] * sess.motion_scale
    pos += _breathing_motion(rng, n, tr, sess.resp_hz) * sess.motion_scale

    rising = slope > 0
    factor = params["spike_rise_factor"]
    mean_rate = params["motion_spike_rate"] / 60.0 * tr  # spikes per frame
    relative = np.where(rising, factor, 1.0) / np.mean(np.where(rising, factor, 1.0))
    spikes = rng.random(n) < np.clip(mean_rate * relative * sess.motion_scale, 0.0, 1.0)
    for onset in np.flatnonzero(spikes):
        direction = rng.standard_normal(6)
        size = rng.exponential(params["spike_mm"])
        jump = direction / np.abs(direction).sum() * size  # FD of the jump ~ size
        recover, keep = rng.uniform(1.0, 6.0), rng.uniform(0.0, 0.15)
        k = np.arange(n - onset)
        pos[onset:] += np.outer(keep + (1 - keep) * np.exp(-k / recover), jump)
    motion = pos / lever  # rotations stored in radians
    fd = np.empty(n)
    fd[0] = np.nan
    fd[1:] = np.abs(np.diff(pos, axis=0)).sum(axis=1)
    return Motion(params=motion, fd=fd, spikes=spikes)


def _head_drift(rng, n: int, tr: float) -> np.ndarray:
    """(n, 6) slow drift in mm (rotations as mm at 50 mm), about unit size over a minute.

    Real drift is low-rank (the head sinks into the cushion: z and pitch move together), so two
    smooth random walks are mixed into the six parameters; the initial position is random.
    """
    walks = np.cumsum(rng.standard_normal((n, 2)), axis=0) * np.sqrt(tr / 60.0)
    walks = ndimage.gaussian_filter1d(walks, 2.0 / tr, axis=0, mode="nearest")
    mixing = rng.standard_normal((2, 6)) / np.sqrt(2.0)
    return walks @ mixing + rng.standard_normal(6) * 2.0


def _breathing_motion(rng, n: int, tr: float, resp_hz: float) -> np.ndarray:
    """(n, 6) apparent motion from breathing (B0 changes), mostly along y and z, ~0.02 mm."""
    t = np.arange(n) * tr
    wave = np.sin(2 * np.pi * resp_hz * t + rng.uniform(0, 2 * np.pi))
    amplitude = np.array([0.005, 0.02, 0.03, 0.02, 0.005, 0.005]) * rng.uniform(0.5, 1.5)
    return np.outer(wave, amplitude) + 0.003 * rng.standard_normal((n, 6))


def nuisance_series(rng, n: int, tr: float, resp_hz: float) -> np.ndarray:
    """(n, N_COMPCOR) unit-variance physiological nuisance: column 0 CSF-like (breathing +
    slow), column 1 WM-like (slow), others slow."""
    out = hrf_noise(rng, n, N_COMPCOR, tr)
    t = np.arange(n) * tr
    envelope = 1.0 + 0.3 * hrf_noise(rng, n, 1, tr)[:, 0]
    breathing = np.sin(2 * np.pi * resp_hz * t + rng.uniform(0, 2 * np.pi)) * envelope
    out[:, 0] = (out[:, 0] + np.sqrt(2.0) * breathing) / np.sqrt(2.0)
    return out


def parcel_signals(params, net: Network, sess: SessionState, pain: PainTrace, rng) -> np.ndarray:
    """(T, P) parcel time series in percent signal change."""
    tr, n, p = params["tr"], pain.frame_pain_hrf.size, params["n_parcels"]
    x = params["noise_sd"] * sess.noise_scale * ar1_noise(rng, n, p, params["ar_coef"])
    k = params["n_network_components"]
    if k:
        x += params["network_sd"] * hrf_noise(rng, n, k, tr) @ net.net_loadings.T
    x += slow_drift(rng, n, p, tr, params["drift_sd"])
    # Activation code: signed weights on HRF-convolved pain (centred so 0.5 is neutral).
    centred = pain.frame_pain_hrf - 0.5
    x[:, net.act_idx] += params["activation_gain"] * sess.gain * np.outer(centred, sess.act_weight)
    # Co-fluctuation code: one shared BOLD-like fluctuation whose amplitude grows with pain.
    shared = hrf_noise(rng, n, 1, tr)[:, 0] * pain.frame_pain_hrf
    x[:, net.coup_idx] += params["coupling_gain"] * sess.gain * np.outer(shared, sess.coup_loading)
    return x


@dataclass
class RunOutput:
    ratings: np.ndarray  # (N,)
    bold: np.ndarray  # (T, M) float32 intensities of the mask voxels
    confounds: pd.DataFrame  # (T, columns)
    latent: pd.DataFrame  # (T, columns)


def simulate_run(params, grid: Grid, net: Network, sess: SessionState, rng) -> RunOutput:
    """Everything of one run: ratings, voxel BOLD, confounds, ground-truth latent table."""
    tr, n = params["tr"], n_frames_per_run(params)
    pain = simulate_pain(params, net, sess, rng, n)
    motion = simulate_motion(params, sess, rng, pain.frame_slope)
    x = parcel_signals(params, net, sess, pain, rng)

    pct = x.astype(np.float32)[:, grid.parcel]  # (T, M)
    pct += rng.standard_normal(pct.shape, dtype=np.float32) * np.float32(params["voxel_noise_sd"])
    nuisance = nuisance_series(rng, n, tr, sess.resp_hz)
    pct += (params["nuisance_sd"] * nuisance @ grid.nuisance_loadings).astype(np.float32)
    pct += slow_drift(rng, n, 1, tr, 1.0).astype(np.float32)  # scanner drift, all voxels
    fd0 = np.nan_to_num(motion.fd)
    pct -= np.float32(params["spin_history_pct"]) * np.outer(fd0, grid.spin_pattern).astype(
        np.float32
    )
    bold = grid.baseline.astype(np.float32) * (1.0 + 0.01 * pct)
    bold -= (params["motion_artifact"] * motion.params @ grid.motion_basis.T).astype(np.float32)

    confounds = confounds_table(motion, nuisance, bold, rng)
    latent = pd.DataFrame(
        {
            "frame": np.arange(n),
            "onset_s": np.arange(n) * tr,
            "pain": pain.frame_pain,
            "pain_hrf": pain.frame_pain_hrf,
            "pain_slope": pain.frame_slope,
            "motion_spike": motion.spikes.astype(int),
        }
    )
    return RunOutput(pain.ratings, bold, confounds, latent)


def confounds_table(motion: Motion, nuisance: np.ndarray, bold: np.ndarray, rng) -> pd.DataFrame:
    """fMRIPrep-style confounds: (T, columns), NaN where fMRIPrep writes n/a."""
    n = motion.fd.size
    cols: dict[str, np.ndarray] = {
        "global_signal": bold.mean(axis=1, dtype=np.float64),
        "csf": 850.0 * (1 + 0.01 * 1.5 * nuisance[:, 0]) + rng.normal(0.0, 1.0, n),
        "white_matter": 700.0 * (1 + 0.01 * 1.0 * nuisance[:, 1]) + rng.normal(0.0, 0.7, n),
    }
    for j, name in enumerate(MOTION_NAMES):
        value = motion.params[:, j]
        deriv = np.concatenate([[np.nan], np.diff(value)])
        cols[name] = value
        cols[f"{name}_derivative1"] = deriv
        cols[f"{name}_power2"] = value**2
        cols[f"{name}_derivative1_power2"] = deriv**2
    cols["framewise_displacement"] = motion.fd
    centred = nuisance - nuisance.mean(axis=0)
    u = np.linalg.svd(centred + 0.05 * rng.standard_normal(centred.shape), full_matrices=False)[0]
    for j in range(N_COMPCOR):
        cols[f"a_comp_cor_{j:02d}"] = u[:, j] * np.sign(u[0, j] or 1.0)
    # fMRIPrep's tissue-specific aCompCor (the study regresses 5 WM + 5 CSF components,
    # DEIPP preprocessing_cocoan_func.m:351-354): components of the nuisance led by its CSF-like
    # (column 0) or WM-like (column 1) signal. No random draw, so the rest of the run is unchanged.
    for prefix, lead in (("c_comp_cor", 0), ("w_comp_cor", 1)):
        weights = np.where(np.arange(centred.shape[1]) == lead, 3.0, 1.0)
        v = np.linalg.svd(centred * weights, full_matrices=False)[0]
        for j in range(N_COMPCOR):
            cols[f"{prefix}_{j:02d}"] = v[:, j] * np.sign(v[0, j] or 1.0)
    return pd.DataFrame(cols)


# --------------------------------------------------------------------------------------------
# Writing (deterministic bytes)
# --------------------------------------------------------------------------------------------
def _gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_json(path: Path, obj) -> None:
    _write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _tsv_bytes(df: pd.DataFrame, float_format: str = "%.8g") -> bytes:
    buf = io.StringIO()
    df.to_csv(
        buf, sep="\t", index=False, na_rep="n/a", float_format=float_format, lineterminator="\n"
    )
    return buf.getvalue().encode()


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, tr: float | None) -> bytes:
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code="mni")
    img.set_qform(affine, code="mni")
    if tr is not None:
        img.header.set_zooms(img.header.get_zooms()[:3] + (float(tr),))
    return img.to_bytes()


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, tr: float | None = None) -> None:
    raw = _nifti_bytes(data, affine, tr)
    _write(path, _gzip_bytes(raw) if path.name.endswith(".gz") else raw)


def _labels(params: dict) -> tuple[list[str], list[list[str]]]:
    subjects = [f"{i + 1:02d}" for i in range(params["n_subjects"])]
    sessions = [[f"{j + 1:02d}" for j in range(n)] for n in sessions_per_subject(params)]
    return subjects, sessions


def run_prefix(sub: str, ses: str, task: str, run: int | str) -> str:
    return f"sub-{sub}_ses-{ses}_task-{task}_run-{run}"


def _write_run(
    root: Path,
    params: dict,
    grid: Grid,
    sub: str,
    ses: str,
    run: int,
    out: RunOutput,
    task: str | None = None,
):
    """Write one run's ratings (+ sidecar), BOLD (+ sidecar), confounds and latent table; a
    rest run (``task=REST_TASK``) has no ratings."""
    task, tr = task or params["task"], params["tr"]
    prefix = run_prefix(sub, ses, task, run)
    func = root / f"sub-{sub}" / f"ses-{ses}" / "func"
    if task != REST_TASK:
        ratings = "\n".join(f"{v:.5f}" for v in out.ratings) + "\n"
        _write(func / f"{prefix}_recording-pain_physio.tsv.gz", _gzip_bytes(ratings.encode()))
        meta = {
            "SamplingFrequency": params["rating_hz"],
            "StartTime": params["rating_start_s"],
            "Columns": ["pain"],
        }
        _write_json(func / f"{prefix}_recording-pain_physio.json", meta)

    prep = root / "derivatives" / "fmriprep" / f"sub-{sub}" / f"ses-{ses}" / "func"
    volume = np.zeros((*grid.shape, out.bold.shape[0]), dtype=np.float32)
    volume[grid.mask] = out.bold.T
    bold_name = f"{prefix}_space-{SPACE}_desc-preproc_bold"
    _write_nifti(prep / f"{bold_name}.{params['bold_format']}", volume, grid.affine, tr)
    _write_json(prep / f"{bold_name}.json", {"RepetitionTime": tr, "TaskName": task})
    _write(prep / f"{prefix}_desc-confounds_timeseries.tsv", _tsv_bytes(out.confounds))

    sim = root / "derivatives" / "simulation" / f"sub-{sub}" / f"ses-{ses}"
    _write(sim / f"{prefix}_latent.tsv.gz", _gzip_bytes(_tsv_bytes(out.latent)))


def _description(name: str, derivative: bool) -> dict:
    desc = {
        "Name": name,
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative" if derivative else "raw",
    }
    if derivative:
        desc["GeneratedBy"] = [{"Name": "painnet.data.simulate", "Version": str(SIMULATOR_VERSION)}]
    return desc


def _write_dataset_files(root: Path, params: dict, grid: Grid) -> None:
    """Dataset-level files: descriptions, participants, atlas."""
    subjects, sessions = _labels(params)
    _write_json(
        root / "dataset_description.json", _description("painnet simulated pain ratings", False)
    )
    participants = pd.DataFrame(
        {"participant_id": [f"sub-{s}" for s in subjects], "n_sessions": [len(x) for x in sessions]}
    )
    _write(root / "participants.tsv", _tsv_bytes(participants))
    for name in ("fmriprep", "atlas", "simulation"):
        _write_json(
            root / "derivatives" / name / "dataset_description.json",
            _description(f"simulated {name}", True),
        )
    atlas = root / "derivatives" / "atlas"
    _write_nifti(atlas / f"atlas-{ATLAS_NAME}_space-{SPACE}_dseg.nii.gz", grid.labels, grid.affine)
    table = pd.DataFrame(
        {"index": np.arange(1, len(grid.parcel_names) + 1), "name": grid.parcel_names}
    )
    _write(atlas / f"atlas-{ATLAS_NAME}_dseg.tsv", _tsv_bytes(table))


def _ground_truth(params: dict, nets: list[Network], sess: dict) -> dict:
    """JSON-ready ground truth. Parcel indices are atlas labels (1-based)."""
    subjects, sessions = _labels(params)
    truth: dict = {
        "parcels": "atlas labels, 1..n_parcels",
        "activation": "activation_gain * session gain * session weight * (pain_hrf - 0.5), in %",
        "co_fluctuation": "coupling_gain * session gain * session loading * pain_hrf * s(t), in %;"
        " s: one unit-variance BOLD-like fluctuation shared by the coupled parcels",
        "hrf": "double gamma; first-lobe gamma shape per subject (peak near shape - 1 s)",
        "latent": "sub-*/ses-*/*_latent.tsv.gz: per frame, latent pain and pain_hrf at the frame centre",
        "subjects": {},
    }
    for i, (sub, net) in enumerate(zip(subjects, nets)):
        truth["subjects"][sub] = {
            "activation_parcels": [int(p) + 1 for p in net.act_idx],
            "activation_weights": [round(float(w), 6) for w in net.act_weight],
            "coupled_parcels": [int(p) + 1 for p in net.coup_idx],
            "coupling_loadings": [round(float(w), 6) for w in net.coup_loading],
            "hrf_shape": round(net.hrf_shape, 6),
            "hrf_peak_s": round(net.hrf_shape - 1.0, 6),
            "pain_mu_logit": round(net.pain_mu, 6),
            "sessions": {
                ses: {
                    "gain": round(sess[i, j].gain, 6),
                    "pain_offset_logit": round(sess[i, j].pain_offset, 6),
                    "rating_bias": round(sess[i, j].rating_bias, 6),
                    "activation_weights": [round(float(w), 6) for w in sess[i, j].act_weight],
                    "coupling_loadings": [round(float(w), 6) for w in sess[i, j].coup_loading],
                }
                for j, ses in enumerate(sessions[i])
            },
        }
    return truth


def _record(params: dict, seed: int) -> dict:
    """What params.json holds; two datasets are the same iff these records are equal."""
    recorded = {
        k: v for k, v in params.items() if k not in _RECORDED_IF_SET or v != _RECORDED_IF_SET[k]
    }
    return {"simulator_version": SIMULATOR_VERSION, "seed": int(seed), "params": recorded}


def _write_session(root: Path, params: dict, grid: Grid, net: Network, seed: int, i: int, j: int):
    """Simulate and write every run of subject ``i``, session ``j`` (0-based); return its state."""
    subjects, sessions = _labels(params)
    state = draw_session(params, net, seed, i, j)
    for r in range(params["n_runs"]):
        out = simulate_run(params, grid, net, state, _rng(seed, _STREAM_RUN, i, j, r))
        _write_run(root, params, grid, subjects[i], sessions[i][j], r + 1, out)
    for r in range(params["rest_runs"]):  # the same generative model, ratings not written
        out = simulate_run(params, grid, net, state, _rng(seed, _STREAM_REST, i, j, r))
        _write_run(root, params, grid, subjects[i], sessions[i][j], r + 1, out, task=REST_TASK)
    return state


def _write_all(root: Path, params: dict, seed: int) -> None:
    """Write the whole dataset under ``root``; params.json last."""
    grid = make_grid(params, seed)
    _write_dataset_files(root, params, grid)
    subjects, sessions = _labels(params)
    nets = [draw_network(params, seed, i) for i in range(len(subjects))]
    jobs = [(i, j) for i in range(len(subjects)) for j in range(len(sessions[i]))]
    # Threads suffice: zlib and most numpy kernels release the GIL, and every run has its own
    # random stream, so the bytes do not depend on scheduling.
    workers = max(1, min(MAX_THREADS, os.cpu_count() or 1, len(jobs)))
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {
            (i, j): pool.submit(_write_session, root, params, grid, nets[i], seed, i, j)
            for i, j in jobs
        }
        states = {key: future.result() for key, future in futures.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C or an error: stop promptly
    sim = root / "derivatives" / "simulation"
    _write_json(sim / "ground_truth.json", _ground_truth(params, nets, states))
    _write_json(sim / "params.json", _record(params, seed))  # last: marks the dataset complete


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def params_path(root: str | Path) -> Path:
    return Path(root) / "derivatives" / "simulation" / "params.json"


def read_params(root: str | Path) -> dict | None:
    """The record in ROOT's params.json, or None if ROOT holds no complete simulated dataset."""
    path = params_path(root)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def simulate_dataset(
    root: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False, **overrides
) -> Path:
    """Write a simulated dataset under ``root`` and return ``root``.

    overrides replace preset keys (unknown key -> ValueError listing the valid keys). If ``root``
    already holds a complete dataset with the same parameters and seed, nothing is rewritten. A
    different or incomplete dataset in a non-empty ``root`` raises FileExistsError unless
    ``overwrite``. The dataset is written to ``ROOT.tmp-<host>-<pid>`` and renamed into place,
    with params.json written last, so an interrupted run never looks complete; such folders left
    by killed processes are removed on the next call (``painnet.data.cache.is_stale_temporary``).
    """
    root = Path(root)
    params = resolve_params(preset, overrides)
    record = _record(params, seed)
    if _holds(root, record):
        return root
    _check_replaceable(root, record, overwrite)

    from painnet.data.cache import remove_stale, temp_tag

    if root.parent.is_dir():  # folders of killed simulations (their pid is gone)
        remove_stale(root.parent.glob("sim-*.tmp-*"))
        remove_stale(root.parent.glob(f"{root.name}.tmp-*"))
    tmp = root.parent / f"{root.name}.{temp_tag()}"
    if tmp.exists():  # left by an interrupted run of a process that had our pid
        shutil.rmtree(tmp)
    try:
        _write_all(tmp, params, seed)
        _move_into_place(tmp, root, record, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    return root


def _holds(root: Path, record: dict) -> bool:
    """Whether ``root`` holds a complete dataset written with exactly this record."""
    return read_params(root) == json.loads(json.dumps(record))


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _check_replaceable(root: Path, record: dict, overwrite: bool) -> None:
    """Raise FileExistsError unless ``root`` is absent, empty, or may be overwritten."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: exists and is not a directory")
    if overwrite or not root.exists() or _is_empty_dir(root):
        return
    existing = read_params(root)
    what = (
        "an incomplete or foreign dataset" if existing is None else _describe_diff(existing, record)
    )
    raise FileExistsError(f"{root}: holds {what}; pass overwrite=True to replace it")


def _describe_diff(existing: dict, record: dict) -> str:
    old, new = existing.get("params", {}), record["params"]
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if existing.get("seed") != record["seed"]:
        keys.insert(0, "seed")
    if existing.get("simulator_version") != record["simulator_version"]:
        keys.insert(0, "simulator_version")
    return f"a simulated dataset with different {', '.join(keys) or 'parameters'}"


def _move_into_place(tmp: Path, root: Path, record: dict, overwrite: bool) -> None:
    """Rename the finished dataset in ``tmp`` to ``root``.

    Another process may have finished the same dataset meanwhile: then ours is dropped. Anything
    else that appeared in ``root`` is only replaced with ``overwrite``.
    """
    if _holds(root, record):
        return
    _check_replaceable(root, record, overwrite)
    if root.exists() and not _is_empty_dir(root):
        shutil.rmtree(root)
    try:
        os.replace(tmp, root)
    except OSError:
        if not _holds(root, record):
            raise


def _parse_set(items: Sequence[str]) -> dict:
    """``["n_parcels=50", "n_sessions=[3,4]"]`` -> dict; values parsed as JSON, else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m painnet.data.simulate ROOT --preset demo --seed 0 --set n_parcels=50``."""
    parser = argparse.ArgumentParser(
        prog="python -m painnet.data.simulate",
        description="Write a simulated BIDS pain-rating dataset with fMRIPrep-style derivatives.",
        epilog="parameters: " + ", ".join(sorted(_COMMON)),
    )
    parser.add_argument("root", type=Path, help="dataset folder to create")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter (repeatable; JSON values)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        root = simulate_dataset(
            args.root, args.preset, args.seed, args.overwrite, **_parse_set(args.set)
        )
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(
        f"{root}: {args.preset} dataset ready ({size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
