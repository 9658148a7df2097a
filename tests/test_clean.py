"""Cleaning removes confounds, drift and slow trends, drops the start and censors motion."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from painnet.data.clean import CleanConfig, clean_series, confound_columns, read_confounds

TR = 0.46
MOTION_COLUMNS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


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


def _confounds_file(tmp_path, n=8, **cells):
    """A confounds table of n rows; ``cells`` = {column: {row: text}} written verbatim."""
    cols = MOTION_COLUMNS + ["trans_x_derivative1", "white_matter", "csf", "framewise_displacement"]
    table = pd.DataFrame(np.arange(n * len(cols), dtype=float).reshape(n, -1) % 7, columns=cols)
    table = table.astype(object)
    for column, rows in cells.items():
        for row, text in rows.items():
            table.loc[row, column] = text
    path = tmp_path / "sub-01_desc-confounds_timeseries.tsv"
    table.to_csv(path, sep="\t", index=False)
    return path


def test_leading_na_of_derivative_and_fd_columns_is_filled_with_zero(tmp_path):
    """fMRIPrep leaves the first row(s) of derivative columns and FD empty: those become 0."""
    path = _confounds_file(
        tmp_path, trans_x_derivative1={0: "n/a"}, framewise_displacement={0: "n/a", 1: "n/a"}
    )
    cfg = CleanConfig(motion=0, wm_csf=True)
    matrix, fd = read_confounds(path, cfg, n_frames=8)
    assert fd[:2].tolist() == [0.0, 0.0] and np.isfinite(fd).all()
    assert np.isfinite(matrix).all()


@pytest.mark.parametrize("column", ["csf", "framewise_displacement"])
@pytest.mark.parametrize("value", ["n/a", "NaN", "abc"])
def test_a_gap_inside_a_used_confounds_column_names_file_column_and_row(tmp_path, column, value):
    path = _confounds_file(tmp_path, **{column: {4: value}})
    with pytest.raises(ValueError, match=f"{path.name}.*'{column}'.*at row 4 \\(frame 4, line 6"):
        read_confounds(path, CleanConfig(motion=0), n_frames=8)


def test_motion_columns_for_computed_fd_must_be_complete(tmp_path):
    path = _confounds_file(tmp_path, rot_y={0: "n/a"})
    with pytest.raises(ValueError, match=f"{path.name}.*'rot_y'.*at row 0"):
        read_confounds(path, CleanConfig(motion=0, fd_source="motion"), n_frames=8)


def test_an_unused_column_is_not_checked(tmp_path):
    path = _confounds_file(tmp_path, csf={4: "n/a"})
    read_confounds(path, CleanConfig(motion=6, wm_csf=False), n_frames=8)


# ---- the study's cleaning options (DEIPP preprocessing_cocoan_func.m:318-364) ---------------


def step_motion(n_frames=200):
    """Motion parameters (T, 6): a 1 mm step in trans_x at frame 100, 0.01 rad in rot_z at 120."""
    motion = np.zeros((n_frames, 6))
    motion[100:, 0] = 1.0
    motion[120:, 5] = 0.01
    return motion


def test_fd_from_motion_sums_translations_and_50_mm_arcs():
    from painnet.data.clean import framewise_displacement

    fd = framewise_displacement(step_motion())
    expected = np.zeros(200)
    expected[100] = 1.0
    expected[120] = 0.01 * 50.0  # rotation as arc length on a 50 mm sphere
    np.testing.assert_allclose(fd, expected, atol=1e-12)


def test_low_passed_fd_spreads_a_step_below_the_study_threshold():
    from scipy.signal import butter, filtfilt

    from painnet.data.clean import framewise_displacement

    motion = step_motion()
    fd = framewise_displacement(motion, tr=TR, low_pass_hz=0.1)
    # independent computation: 2nd-order Butterworth at 0.1 Hz, forward-backward, MATLAB padding
    b, a = butter(2, 0.1 / (0.5 / TR))
    smooth = filtfilt(b, a, motion, axis=0, padtype="odd", padlen=6)
    smooth[:, 3:] *= 50.0
    np.testing.assert_allclose(fd, np.r_[0.0, np.abs(np.diff(smooth, axis=0)).sum(1)])
    assert fd.max() < 0.15  # a slow 1 mm drift-like step is not censored at the study's 0.15 mm
    assert 1.5 <= fd.sum() < 2.0  # spread (plus the filter's ringing), not lost


def test_read_confounds_computes_fd_from_motion_and_adds_tissue_compcor(tmp_path):
    path = tmp_path / "sub-01_desc-confounds_timeseries.tsv"
    table = pd.DataFrame(step_motion(), columns=MOTION_COLUMNS)
    table["framewise_displacement"] = 9.9  # ignored with fd_source=motion
    for prefix in ("w_comp_cor", "c_comp_cor"):
        for j in range(6):
            table[f"{prefix}_{j:02d}"] = np.sin(np.arange(200) / (j + 3))
    table.to_csv(path, sep="\t", index=False)
    cfg = CleanConfig(
        fd_source="motion", fd_threshold=0.15, wm_csf=False, n_wm_compcor=5, n_csf_compcor=5
    )
    matrix, fd = read_confounds(path, cfg, n_frames=200)
    assert matrix.shape == (200, 6 + 5 + 5)
    assert fd[100] == 1.0 and fd[120] == pytest.approx(0.5) and fd.max() == 1.0
    names = confound_columns(cfg, list(table.columns))
    assert names[6:] == [f"w_comp_cor_{j:02d}" for j in range(5)] + [
        f"c_comp_cor_{j:02d}" for j in range(5)
    ]
    with pytest.raises(ValueError, match="needs the run's TR"):
        read_confounds(path, replace(cfg, fd_low_pass_hz=0.1), n_frames=200)
    with pytest.raises(ValueError, match="n_wm_compcor=7 but only 6"):
        confound_columns(CleanConfig(n_wm_compcor=7), list(table.columns))
    with pytest.raises(ValueError, match="fd_source=motion"):
        CleanConfig(fd_low_pass_hz=0.1)


def test_interpolated_censoring_ignores_the_values_of_censored_frames():
    """3dTproject -cenmode NTRP: censored frames are replaced by interpolation before the fit,
    so whatever they held cannot leak into their kept neighbours."""
    series, confounds, fd, _ = synthetic_run()
    cfg = CleanConfig(censor_mode="interpolate", drop_initial_s=10.0)
    cleaned, kept = clean_series(series, TR, cfg, confounds, fd)
    spiked = series.copy()
    spiked[fd > 0.5] = 1e4
    cleaned_spiked, kept_spiked = clean_series(spiked, TR, cfg, confounds, fd)
    np.testing.assert_array_equal(kept, kept_spiked)
    np.testing.assert_allclose(cleaned_spiked, cleaned, atol=1e-5)
    assert not kept[fd > 0.5].any() and np.all(cleaned[~kept] == 0)
    np.testing.assert_allclose(cleaned[kept].std(0, ddof=1), 1, atol=1e-4)


def test_rest_runs_are_band_passed():
    cfg = CleanConfig(rest_low_pass_hz=0.1)
    assert cfg.for_task("rest").low_pass_hz == 0.1
    assert cfg.for_task("rating").low_pass_hz is None
