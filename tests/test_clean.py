"""Cleaning removes confounds, drift and slow trends, drops the start and censors motion."""

import numpy as np
import pandas as pd
import pytest

from painnet.data.clean import CleanConfig, clean_series, confound_columns, read_confounds

TR = 0.46


def synthetic_run(n_frames=600, n_parcels=8, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames) * TR
    neural = rng.standard_normal((n_frames, n_parcels))
    motion = np.cumsum(rng.standard_normal((n_frames, 6)) * 0.05, axis=0)
    wm, csf = rng.standard_normal(n_frames), rng.standard_normal(n_frames)
    nuisance = (
        motion @ rng.standard_normal((6, n_parcels)) * 3 + np.outer(wm, np.ones(n_parcels)) * 2
    )
    drift = np.outer(t / t[-1], np.linspace(5, 10, n_parcels))
    series = 100 + neural + nuisance + drift + np.outer(csf, np.ones(n_parcels))
    fd = np.abs(rng.standard_normal(n_frames)) * 0.1
    fd[[100, 250, 251, 400]] = 2.0
    confounds = np.column_stack([motion, wm, csf])
    return series.astype(np.float32), confounds, fd, neural


def test_confounds_trend_and_scale_are_removed():
    series, confounds, fd, neural = synthetic_run()
    cleaned, kept = clean_series(series, TR, CleanConfig(high_pass_hz=None), confounds, fd)
    assert cleaned.dtype == np.float32 and cleaned.shape == series.shape
    for p in range(series.shape[1]):
        r = np.corrcoef(cleaned[kept, p], neural[kept, p])[0, 1]
        assert r > 0.9, f"parcel {p}: cleaned signal lost the neural part (r={r:.2f})"
        assert abs(np.corrcoef(cleaned[kept, p], confounds[kept, 0])[0, 1]) < 0.1
    np.testing.assert_allclose(cleaned[kept].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(cleaned[kept].std(0, ddof=1), 1, atol=1e-4)


def test_initial_frames_are_dropped_and_high_motion_frames_censored_in_place():
    series, confounds, fd, _ = synthetic_run()
    cfg = CleanConfig(drop_initial_s=30.0, fd_threshold=0.5)
    cleaned, kept = clean_series(series, TR, cfg, confounds, fd)
    n_drop = int(np.ceil(30.0 / TR))
    assert not kept[:n_drop].any() and kept[n_drop]
    assert not kept[[100, 250, 251, 400]].any()
    assert kept.sum() == series.shape[0] - n_drop - 4
    # marked invalid, never shifted: censored frames hold 0 and their neighbours keep their index
    assert np.all(cleaned[~kept] == 0)
    assert cleaned.shape[0] == series.shape[0]


def test_high_pass_removes_slow_oscillations():
    t = np.arange(1300) * TR
    slow = np.sin(2 * np.pi * 0.002 * t)  # below the study's 0.005 Hz cut-off
    fast = np.sin(2 * np.pi * 0.05 * t)
    series = np.column_stack([slow + fast, slow + fast]).astype(np.float32)
    cfg = CleanConfig(motion=0, wm_csf=False, fd_threshold=None, linear_trend=False)
    cleaned, kept = clean_series(series, TR, cfg)
    assert np.corrcoef(cleaned[kept, 0], fast[kept])[0, 1] > 0.95


def test_24_parameter_strategy_names_fmriprep_columns(tmp_path):
    names = confound_columns(
        CleanConfig(motion=24, n_acompcor=2), [f"a_comp_cor_0{i}" for i in range(5)]
    )
    assert len(names) == 24 + 2 + 2
    assert "rot_z_derivative1_power2" in names and names[-1] == "a_comp_cor_01"


def test_confounds_with_too_few_rows_name_the_file(tmp_path):
    path = tmp_path / "sub-01_desc-confounds_timeseries.tsv"
    cols = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "white_matter", "csf"]
    pd.DataFrame(np.zeros((5, 8)), columns=cols).assign(framewise_displacement=0.0).to_csv(
        path, sep="\t", index=False
    )
    with pytest.raises(ValueError, match=f"{path.name}.*5 rows.*10 frames"):
        read_confounds(path, CleanConfig(), n_frames=10)
    with pytest.raises(ValueError, match="missing"):
        read_confounds(path, CleanConfig(motion=24), n_frames=5)
