"""Causal cleaning (data.clean.causal=true): every frame cleaned from itself and the past only."""

from __future__ import annotations

import numpy as np
import pytest
from hydra.utils import instantiate

from painnet.data.causal import CausalCleaner, clean_series_causal, forgetting_factor
from painnet.data.clean import CleanConfig, kept_frames
from painnet.data.preprocess import cleaned_key, extract_cached
from painnet.data.types import RunFiles

TR = 0.5


def _run(n_frames=240, n_parcels=5, n_conf=3, seed=0):
    rng = np.random.default_rng(seed)
    confounds = rng.standard_normal((n_frames, n_conf)).cumsum(0) * 0.1
    series = (
        600
        + rng.standard_normal((n_frames, n_parcels))
        + confounds @ rng.normal(size=(n_conf, n_parcels))
    )
    fd = np.abs(rng.normal(0, 0.2, n_frames))
    return series.astype(np.float32), confounds, fd


def test_no_output_depends_on_a_later_frame():
    series, confounds, fd = _run()
    config = CleanConfig(drop_initial_s=5.0, fd_threshold=0.4)
    out, kept = clean_series_causal(series, TR, config, confounds, fd)
    changed_series, changed_conf, changed_fd = series.copy(), confounds.copy(), fd.copy()
    cut = 150
    changed_series[cut:] += 50.0
    changed_conf[cut:] *= -3
    changed_fd[cut:] = 0.0
    out2, kept2 = clean_series_causal(changed_series, TR, config, changed_conf, changed_fd)
    np.testing.assert_array_equal(out[:cut], out2[:cut])
    np.testing.assert_array_equal(kept[:cut], kept2[:cut])
    assert not np.array_equal(out[cut:], out2[cut:])


def test_kept_frames_are_those_of_the_standard_cleaning():
    series, confounds, fd = _run()
    config = CleanConfig(drop_initial_s=10.0, fd_threshold=0.3, causal=True)
    out, kept = clean_series_causal(series, TR, config, confounds, fd)
    np.testing.assert_array_equal(kept, kept_frames(len(series), TR, fd, config))
    assert np.all(out[~kept] == 0.0)
    assert out.dtype == np.float32


def test_without_confounds_or_forgetting_it_is_a_running_demean_and_zscore():
    series, _, _ = _run(n_frames=60, n_parcels=3)
    config = CleanConfig(
        motion=0, wm_csf=False, linear_trend=False, high_pass_hz=None, drop_initial_s=0.0,
        fd_threshold=None,
    )  # fmt: skip
    out, kept = clean_series_causal(series, TR, config)
    x = series.astype(np.float64)
    resid = np.array([x[t] - x[: t + 1].mean(0) for t in range(len(x))])
    expected = np.zeros_like(resid)
    for t in range(1, len(x)):
        expected[t] = (resid[t] - resid[: t + 1].mean(0)) / resid[: t + 1].std(0, ddof=1)
    assert kept.all()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_forgetting_is_a_high_pass_at_the_configured_cutoff():
    cutoff = 0.01
    t = np.arange(4000) * TR
    config = CleanConfig(
        motion=0, wm_csf=False, high_pass_hz=cutoff, drop_initial_s=0.0, fd_threshold=None,
        zscore=False,
    )  # fmt: skip
    gains = {}
    for f in (cutoff / 10, cutoff, cutoff * 10):
        x = np.sin(2 * np.pi * f * t)[:, None]
        out, _ = clean_series_causal(x, TR, config)
        gains[f] = out[2000:, 0].std() / x[2000:, 0].std()
    assert gains[cutoff / 10] < 0.15
    assert gains[cutoff] == pytest.approx(2**-0.5, abs=0.05)  # −3 dB at the cut-off
    assert gains[cutoff * 10] > 0.95
    assert forgetting_factor(None, TR) == 1.0


def test_confound_driven_signal_is_regressed_out():
    rng = np.random.default_rng(1)
    n = 600
    confound = rng.standard_normal((n, 1))
    noise = rng.standard_normal((n, 1))
    series = 5.0 * confound + noise
    config = CleanConfig(motion=0, wm_csf=False, drop_initial_s=0.0, fd_threshold=None)
    cleaner = CausalCleaner(config, TR, n_parcels=1, n_confounds=1)
    out = np.array([cleaner.step(series[t], confound[t])[0] for t in range(n)])
    late = slice(100, None)
    assert abs(np.corrcoef(out[late, 0], confound[late, 0])[0, 1]) < 0.1
    assert np.corrcoef(out[late, 0], noise[late, 0])[0, 1] > 0.95


def test_missing_frames_are_not_kept_and_time_still_passes():
    config = CleanConfig(motion=0, wm_csf=False, drop_initial_s=0.0, fd_threshold=None)
    cleaner = CausalCleaner(config, TR, n_parcels=2)
    for _ in range(5):
        cleaner.step(np.ones(2))
    out, kept = cleaner.step(None)
    assert not kept and np.all(out == 0) and cleaner.frame == 6


def test_frames_censored_for_other_reasons_are_not_kept():
    series, confounds, fd = _run()
    config = CleanConfig(drop_initial_s=5.0, fd_threshold=None)
    censor = np.zeros(len(series), bool)
    censor[[50, 51, 120]] = True
    out, kept = clean_series_causal(series, TR, config, confounds, fd, censor=censor)
    assert not kept[censor].any() and np.all(out[censor] == 0)
    assert kept[20:50].all() and kept[52:120].all()


def test_bad_settings_are_errors_naming_the_key():
    with pytest.raises(ValueError, match="low_pass_hz"):
        CleanConfig(causal=True, low_pass_hz=0.1)
    with pytest.raises(ValueError, match="fd_low_pass_hz"):
        CausalCleaner(CleanConfig(causal=True, fd_source="motion", fd_low_pass_hz=0.1), TR, 3, 8)
    cleaner = CausalCleaner(CleanConfig(drop_initial_s=0.0, fd_threshold=None), TR, 3, 8)
    with pytest.raises(ValueError, match="confound values"):
        cleaner.step(np.zeros(3), np.zeros(2))


def test_data_clean_causal_selects_the_causal_cleaning(make_cfg, tiny_root):
    cfg = make_cfg("data=tiny", "data.clean.causal=true")
    dm = instantiate(cfg.data, split=cfg.split, _recursive_=False)
    dm.prepare_data()
    dm.setup("fit")
    run, files = dm.runs[0], dm.run_files[0]
    assert isinstance(files, RunFiles)
    from painnet.data.clean import read_confounds

    raw = extract_cached(files, dm.atlas, dm.cache)["series"]
    confounds, fd = read_confounds(files.confounds, dm.clean, raw.shape[0])
    expected, kept = clean_series_causal(raw, files.tr, dm.clean, confounds, fd)
    np.testing.assert_array_equal(run.series, expected)
    np.testing.assert_array_equal(run.kept, kept)
    standard = CleanConfig(**{**dm.clean.as_dict(), "causal": False})
    assert cleaned_key(files, dm.atlas, dm.clean) != cleaned_key(files, dm.atlas, standard)
