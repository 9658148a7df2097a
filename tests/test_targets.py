"""Ratings are placed on their own clock, averaged per frame and paired with the lagged frame."""

import gzip
import json

import numpy as np
import pytest

from painnet.data.targets import frame_ratings, lag_frames, lagged_targets, run_targets
from painnet.data.types import RunFiles, RunKey

TR = 0.46


def write_ratings(tmp_path, samples, fs, start):
    tsv = tmp_path / "sub-01_ses-01_task-rating_run-1_recording-pain_physio.tsv.gz"
    with gzip.open(tsv, "wt") as fh:
        fh.write("\n".join(f"{v:.6f}" for v in samples) + "\n")
    meta = tmp_path / "sub-01_ses-01_task-rating_run-1_recording-pain_physio.json"
    meta.write_text(json.dumps({"SamplingFrequency": fs, "StartTime": start, "Columns": ["pain"]}))
    return RunFiles(
        RunKey("01", "01", "rating", "1"), tmp_path / "bold", None, None, tsv, meta, "nifti", TR
    )


def test_study_lag_is_13_frames():
    assert lag_frames(6.0, TR) == 13


def test_ramp_lands_on_the_expected_frames_after_the_lag(tmp_path):
    fs, start, n_frames = 60.0, -2.0, 200
    t = start + np.arange(int((n_frames * TR - start) * fs) + 1) / fs
    files = write_ratings(tmp_path, (t - start) / 100.0, fs, start)  # rating = (time + 2) / 100

    target = run_targets(files, n_frames, lag_s=6.0)

    assert np.isnan(target[:13]).all()  # nothing was rated 6 s before the first frames
    frames = np.arange(13, n_frames)
    # a frame's rating is the mean over its interval: the ramp at the interval centre
    rated_frame = frames - 13
    expected = (rated_frame * TR + TR / 2 - start) / 100.0
    np.testing.assert_allclose(target[frames], expected, atol=1.0 / fs / 100.0)


def test_frames_beyond_the_recording_have_no_rating():
    fs, start = 10.0, 0.5  # starts after frame 0 and frame 1 begin
    samples = np.linspace(0, 1, 50)  # covers 0.5 s … 5.5 s
    per_frame = frame_ratings(samples, fs, start, n_frames=20, tr=TR)
    onsets = np.arange(20) * TR
    covered = (onsets >= start) & (onsets + TR <= start + samples.size / fs)
    assert np.isnan(per_frame[~covered]).all()
    assert np.isfinite(per_frame[covered]).all()


def test_slow_ratings_are_interpolated_at_frame_centres():
    fs = 1.0  # one sample per second: most 0.46 s frames contain none
    samples = np.arange(30, dtype=float)  # value = time in s
    per_frame = frame_ratings(samples, fs, 0.0, n_frames=50, tr=TR)
    finite = np.isfinite(per_frame)
    assert finite.sum() > 40
    centres = np.arange(50) * TR + TR / 2
    # a frame holding one sample takes that sample; others the interpolated centre value
    assert np.all(np.abs(per_frame[finite] - centres[finite]) <= TR)


def test_lagged_targets_shift_without_wrapping():
    target = lagged_targets(np.arange(10.0), 3)
    assert np.isnan(target[:3]).all()
    np.testing.assert_array_equal(target[3:], np.arange(7.0))
    with pytest.raises(ValueError):
        lagged_targets(np.arange(3.0), -1)


def test_midpoint_alignment_interpolates_at_frame_centres_like_the_study():
    # cocoanlab/DEIPP analysis/analysis_rating.m:74-75: interp1(time, rating, onset + TR/2 …)
    fs, start, n_frames = 60.0, -2.0, 100
    rng = np.random.default_rng(0)
    samples = np.clip(np.cumsum(rng.normal(0, 0.01, int(50 * fs))) + 0.5, 0, 1)
    times = start + np.arange(samples.size) / fs
    centres = np.arange(n_frames) * TR + TR / 2

    per_frame = frame_ratings(samples, fs, start, n_frames, TR, alignment="midpoint")

    inside = centres <= times[-1]
    np.testing.assert_allclose(per_frame[inside], np.interp(centres[inside], times, samples))
    assert np.isnan(per_frame[~inside]).all()  # never extrapolated


def test_gaps_longer_than_the_limit_leave_frames_uncovered_in_both_alignments():
    fs = 10.0
    samples = np.linspace(0, 1, 300)  # 30 s
    samples[100:150] = np.nan  # 5 s gap from t = 10 s
    onsets = np.arange(60) * TR
    # last finite sample at 9.9 s, next at 15.0 s: interval_mean needs the whole frame covered,
    # midpoint needs finite samples on both sides of the frame centre
    needs = {"interval_mean": (onsets + TR > 9.9) & (onsets < 15.0)}
    needs["midpoint"] = (onsets + TR / 2 > 9.9) & (onsets + TR / 2 < 15.0)
    for alignment, in_gap in needs.items():
        per_frame = frame_ratings(samples, fs, 0.0, 60, TR, max_gap_s=1.0, alignment=alignment)
        assert np.isnan(per_frame[in_gap]).all(), alignment
        bridged = frame_ratings(samples, fs, 0.0, 60, TR, max_gap_s=6.0, alignment=alignment)
        assert np.isfinite(bridged).all(), alignment
