"""Specification of painnet.evaluation: bins, metrics, bootstrap, reports, paired comparison."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from rich.table import Table
from scipy.stats import pearsonr
from sklearn.metrics import mean_absolute_error, r2_score, roc_auc_score

from painnet.evaluation import (
    bin_predictions,
    compute_metrics,
    evaluate_by,
    evaluate_predictions,
    format_metrics_table,
    hierarchical_bootstrap,
    paired_bootstrap_difference,
    print_metrics,
)
from painnet.evaluation.bootstrap import (
    bin_hierarchy,
    draw_bin_counts,
    resolve_level,
    sort_bins,
    weighted_auc_rows,
    weighted_pearson_rows,
)
from painnet.evaluation.report import json_safe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BIN_SIZES = ("1min", "2min", "run", "session")


def make_table(
    n_sessions=6,
    n_runs=3,
    n_frames=300,
    tr=2.0,
    noise=1.0,
    signal=1.0,
    seed=0,
    subject="01",
    drop_s=30.0,
):
    """Synthetic prediction table: slow random-walk ratings, prediction = signal*rating + noise.

    The first ``drop_s`` seconds of every run have no rating (as after the study's 30 s drop).
    """
    rng = np.random.default_rng(seed)
    parts = []
    for ses in range(n_sessions):
        for run in range(n_runs):
            time_s = np.arange(n_frames) * tr
            walk = np.cumsum(rng.normal(0.0, 0.05, n_frames))
            rating = np.clip(0.5 + walk - walk.mean(), 0.0, 1.0)
            prediction = signal * rating + noise * rng.normal(0.0, 0.3, n_frames)
            rating[time_s < drop_s] = np.nan
            parts.append(
                pd.DataFrame(
                    {
                        "subject": subject,
                        "session": f"{ses + 1:02d}",
                        "run": str(run + 1),
                        "frame": np.arange(n_frames),
                        "time_s": time_s,
                        "rating": rating,
                        "prediction": prediction,
                        "fold": ses,
                        "run_duration_s": n_frames * tr,
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


def one_run(n_frames, tr=0.46, duration=None, seed=0):
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(
        {
            "subject": "01",
            "session": "01",
            "run": "1",
            "frame": np.arange(n_frames),
            "time_s": np.arange(n_frames) * tr,
            "rating": rng.random(n_frames),
            "prediction": rng.random(n_frames),
            "fold": 0,
        }
    )
    if duration is not None:
        table["run_duration_s"] = duration
    return table


def bin_by_hand(table, n_bins_per_run):
    """Reference binning written with pandas + np.array_split, independent of bins.py."""
    usable = table.dropna(subset=["rating", "prediction"]).sort_values(
        ["subject", "session", "run", "frame"]
    )
    pieces = []
    for _, run in usable.groupby(["subject", "session", "run"]):
        splits = np.array_split(np.arange(len(run)), n_bins_per_run)
        labels = np.concatenate([np.full(len(idx), i) for i, idx in enumerate(splits)])
        pieces.append(run.assign(bin=labels))
    frames = pd.concat(pieces)
    return (
        frames.groupby(["subject", "session", "run", "bin"])[["rating", "prediction"]]
        .mean()
        .reset_index()
    )


# ----------------------------------------------------------------------------- bins


def test_600s_run_at_tr_046_gives_10_one_minute_and_5_two_minute_equal_bins():
    table = one_run(1304, duration=600.0)
    for size, expected in (("1min", 10), ("2min", 5)):
        binned = bin_predictions(table, size)
        assert len(binned) == expected
        assert binned["n_frames"].sum() == 1304
        assert binned["n_frames"].max() - binned["n_frames"].min() <= 1
        assert list(binned["bin"]) == list(range(expected))


def test_300s_run_gives_5_one_minute_bins_with_or_without_run_duration():
    assert len(bin_predictions(one_run(652, duration=300.0), "1min")) == 5
    # without run_duration_s the span is 651 steps + one step = 299.9 s -> 5 bins
    assert len(bin_predictions(one_run(652), "1min")) == 5


def test_bin_count_follows_the_stored_run_length_not_the_usable_frames():
    table = one_run(1304, duration=600.0)
    table.loc[:64, "rating"] = np.nan  # the first 30 s lose their target
    binned = bin_predictions(table, "1min")
    assert len(binned) == 10
    assert binned["n_frames"].sum() == 1304 - 65


def test_nan_rating_frames_are_excluded_before_splitting():
    table = one_run(1304, duration=600.0)
    table.loc[:64, "rating"] = np.nan
    table.loc[500:509, "prediction"] = np.nan
    binned = bin_predictions(table, "1min")
    usable = table.dropna(subset=["rating", "prediction"])
    parts = [usable.iloc[idx] for idx in np.array_split(np.arange(len(usable)), 10)]
    assert list(binned["n_frames"]) == [len(p) for p in parts]
    np.testing.assert_allclose(binned["rating"], [p["rating"].mean() for p in parts])
    np.testing.assert_allclose(binned["prediction"], [p["prediction"].mean() for p in parts])


def test_run_and_session_bins_average_all_usable_frames():
    table = make_table(n_sessions=2, n_runs=3)
    usable = table.dropna(subset=["rating"])
    runs = bin_predictions(table, "run")
    sessions = bin_predictions(table, "session")
    assert len(runs) == 6 and len(sessions) == 2
    assert set(sessions["run"]) == {"all"}
    expected = usable.groupby("session")["rating"].mean().to_numpy()
    np.testing.assert_allclose(sessions["rating"], expected)
    np.testing.assert_allclose(runs["rating"], usable.groupby(["session", "run"])["rating"].mean())


def test_missing_columns_are_named_in_the_error():
    table = make_table(n_sessions=1).drop(columns=["prediction", "time_s"])
    with pytest.raises(ValueError, match=r"time_s.*prediction|prediction.*time_s"):
        bin_predictions(table, "1min")


def test_tables_mixing_models_or_duplicating_frames_are_rejected():
    a = make_table(n_sessions=1).assign(model="a")
    with pytest.raises(ValueError, match="several models"):
        evaluate_predictions(pd.concat([a, a.assign(model="b")]), n_boot=0)
    with pytest.raises(ValueError, match="duplicated"):
        bin_predictions(pd.concat([a, a.iloc[:3]]), "run")
    with pytest.raises(ValueError, match="unknown bin size"):
        bin_predictions(a, "5min")


# ----------------------------------------------------------------------------- metrics


def test_metrics_equal_scipy_and_sklearn_on_hand_binned_table():
    table = make_table(n_sessions=5, noise=2.0, seed=3)
    hand = bin_by_hand(table, n_bins_per_run=10)  # 600 s runs -> 10 one-minute bins
    rating, prediction = hand["rating"].to_numpy(), hand["prediction"].to_numpy()
    above = rating > np.median(rating)
    off_median = rating != np.median(rating)

    metrics = compute_metrics(bin_predictions(table, "1min"))

    assert metrics["n_bins"] == len(hand) == 150
    assert metrics["r"] == pytest.approx(pearsonr(rating, prediction)[0], abs=1e-12)
    assert metrics["auc"] == pytest.approx(
        roc_auc_score(above[off_median], prediction[off_median]), abs=1e-12
    )
    assert metrics["r2"] == pytest.approx(r2_score(rating, prediction), abs=1e-12)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(rating, prediction), abs=1e-12)


def test_auc_drops_bins_exactly_at_the_median():
    binned = pd.DataFrame(
        {
            "subject": "01",
            "session": "01",
            "run": "1",
            "rating": [0.1, 0.2, 0.5, 0.8, 0.9],  # median 0.5 belongs to neither class
            "prediction": [0.0, 1.0, 5.0, 0.5, 2.0],
        }
    )
    # positives {0.5, 2.0} vs negatives {0.0, 1.0}: 3 of 4 pairs ranked right
    assert compute_metrics(binned)["auc"] == pytest.approx(0.75)


def test_within_run_r_equals_hand_computation():
    table = make_table(n_sessions=3, noise=2.0, seed=5)
    hand = bin_by_hand(table, n_bins_per_run=10)
    per_run = [
        np.corrcoef(run["rating"], run["prediction"])[0, 1]
        for _, run in hand.groupby(["session", "run"])
    ]
    per_session = [
        np.corrcoef(ses["rating"], ses["prediction"])[0, 1] for _, ses in hand.groupby("session")
    ]
    metrics = compute_metrics(bin_predictions(table, "1min"))
    assert metrics["within_run_r"] == pytest.approx(np.mean(per_run), abs=1e-12)
    assert metrics["within_session_r"] == pytest.approx(np.mean(per_session), abs=1e-12)


def test_undefined_metrics_are_nan_not_errors():
    two_bins = pd.DataFrame(
        {"subject": "01", "session": "01", "run": "1", "rating": [0.1, 0.9], "prediction": [0, 1]}
    )
    metrics = compute_metrics(two_bins)
    assert np.isnan(metrics["r"]) and np.isnan(metrics["within_run_r"])
    assert metrics["mae"] == pytest.approx(0.1)

    # bin means of a constant 0.3 differ in the last bits: still constant, r undefined
    constant = make_table(n_sessions=2).assign(prediction=0.3)
    metrics = compute_metrics(bin_predictions(constant, "1min"))
    assert np.isnan(metrics["r"]) and np.isnan(metrics["within_run_r"])
    binned = bin_predictions(constant.assign(prediction=0.5), "1min")
    assert compute_metrics(binned)["auc"] == 0.5  # every pair tied
    assert np.isnan(hierarchical_bootstrap(binned, n_boot=100)["r"]["ci_low"])


# ----------------------------------------------------------------------------- bootstrap


def test_row_wise_statistics_equal_the_statistic_of_the_expanded_resample():
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=30), 1)  # rounding creates ties
    y = x + rng.normal(size=30)
    counts = rng.integers(0, 3, size=(50, 30)).astype(float)
    r_rows = weighted_pearson_rows(counts, y, x)
    auc_rows = weighted_auc_rows(counts, y, x)
    for i in range(50):
        ys, xs = np.repeat(y, counts[i].astype(int)), np.repeat(x, counts[i].astype(int))
        keep = ys != np.median(ys)
        assert r_rows[i] == pytest.approx(pearsonr(ys, xs)[0], abs=1e-10)
        assert auc_rows[i] == pytest.approx(
            roc_auc_score(ys[keep] > np.median(ys), xs[keep]), abs=1e-12
        )


def test_resamples_follow_the_session_run_bin_hierarchy():
    binned = sort_bins(bin_predictions(make_table(n_sessions=4, n_runs=3), "1min"))
    hierarchy = bin_hierarchy(binned)
    rng = np.random.default_rng(0)
    session_of_bin, run_of_bin = hierarchy.session_of_bin, hierarchy.run_of_bin
    by_session = draw_bin_counts(hierarchy, rng, 200, "session")
    by_run = draw_bin_counts(hierarchy, rng, 200, "run")
    by_bin = draw_bin_counts(hierarchy, rng, 200, "bin")
    for counts in (by_session, by_run, by_bin):
        # balanced design: every draw has as many samples as the data
        np.testing.assert_array_equal(counts.sum(axis=1), len(binned))
    for s in range(4):  # whole sessions move together
        assert (by_session[:, session_of_bin == s].std(axis=1) == 0).all()
    for r in range(12):  # whole runs move together
        assert (by_run[:, run_of_bin == r].std(axis=1) == 0).all()
    assert (by_bin[:, run_of_bin == 0].std(axis=1) > 0).any()
    assert resolve_level(hierarchy) == "bin"
    runs = sort_bins(bin_predictions(make_table(n_sessions=4), "run"))
    sessions = sort_bins(bin_predictions(make_table(n_sessions=4), "session"))
    assert resolve_level(bin_hierarchy(runs)) == "run"
    assert resolve_level(bin_hierarchy(sessions)) == "session"


def test_unequal_runs_and_bins_are_resampled_within_their_own_size():
    table = make_table(n_sessions=3, n_runs=3)
    # session 01 keeps one run; session 02's run 1 is half as long (5 one-minute bins)
    table = table[~((table["session"] == "01") & (table["run"] != "1"))]
    short = (table["session"] == "02") & (table["run"] == "1")
    table = table[~short | (table["time_s"] < 300)].copy()
    table.loc[short, "run_duration_s"] = 300.0
    binned = sort_bins(bin_predictions(table, "1min"))
    hierarchy = bin_hierarchy(binned)
    assert list(hierarchy.runs_per_session) == [1, 3, 3]
    assert list(hierarchy.bins_per_run) == [10, 5, 10, 10, 10, 10, 10]
    counts = draw_bin_counts(hierarchy, np.random.default_rng(1), 500, "bin")
    assert counts.shape == (500, 65)
    result = hierarchical_bootstrap(binned, n_boot=500, seed=0)
    assert np.isfinite(result["r"]["ci_low"]) and np.isfinite(result["auc"]["ci_high"])


def test_bootstrap_ci_covers_the_estimate_and_p_is_small_for_a_real_signal():
    binned = bin_predictions(make_table(n_sessions=8, noise=2.0, seed=1), "1min")
    point = compute_metrics(binned)
    result = hierarchical_bootstrap(binned, n_boot=1000, seed=0)
    for name in ("r", "auc"):
        assert result[name]["ci_low"] <= point[name] <= result[name]["ci_high"]
        assert result[name]["p"] == pytest.approx(1 / 1001)  # floored: no draw crosses null
        assert result[name]["se"] > 0
    assert result["level"] == "bin" and result["n_boot"] == 1000


def test_bootstrap_p_is_large_for_independent_noise():
    binned = bin_predictions(make_table(n_sessions=8, signal=0.0, seed=2), "1min")
    result = hierarchical_bootstrap(binned, n_boot=1000, seed=0)
    assert result["r"]["p"] > 0.2
    assert result["auc"]["p"] > 0.2
    assert result["r"]["ci_low"] < 0 < result["r"]["ci_high"]


def test_bootstrap_is_reproducible_for_a_seed():
    binned = bin_predictions(make_table(n_sessions=4, noise=3.0), "2min")
    first = hierarchical_bootstrap(binned, n_boot=500, seed=7)
    assert hierarchical_bootstrap(binned, n_boot=500, seed=7) == first
    assert hierarchical_bootstrap(binned, n_boot=500, seed=8) != first


# ----------------------------------------------------------------------------- report


FLAT_SUFFIXES = (
    "r_{s}",
    "auc_{s}",
    "within_run_r_{s}",
    "within_session_r_{s}",
    "r2_{s}",
    "mae_{s}",
    "n_bins_{s}",
    "r_{s}_ci_low",
    "r_{s}_ci_high",
    "r_{s}_p",
    "auc_{s}_ci_low",
    "auc_{s}_ci_high",
    "auc_{s}_p",
    "within_run_r_{s}_ci_low",
    "within_run_r_{s}_ci_high",
    "within_run_r_{s}_p",
    "within_session_r_{s}_ci_low",
    "within_session_r_{s}_ci_high",
    "within_session_r_{s}_p",
)


def test_evaluate_predictions_writes_metrics_tables_and_plots(tmp_path):
    table = make_table(n_sessions=3, noise=2.0)
    metrics = evaluate_predictions(table, out_dir=tmp_path, n_boot=500, seed=0)

    expected = {"n_sessions", "n_runs", "n_frames"}
    expected |= {key.format(s=s) for s in BIN_SIZES for key in FLAT_SUFFIXES}
    assert set(metrics) == expected
    assert (metrics["n_sessions"], metrics["n_runs"]) == (3, 9)
    assert metrics["n_frames"] == int(table["rating"].notna().sum())
    assert metrics["n_bins_1min"] == 90 and metrics["n_bins_2min"] == 45

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert set(written) == expected
    assert written["within_run_r_run"] is None  # one bin per run: undefined -> null
    assert written["r_1min"] == pytest.approx(metrics["r_1min"])

    csv = pd.read_csv(tmp_path / "metrics.csv", index_col="bin_size")
    assert list(csv.index) == list(BIN_SIZES)
    for col in ("r", "r_ci_low", "r_ci_high", "r_p", "auc", "auc_p", "within_run_r", "r2", "mae"):
        assert col in csv.columns
    assert csv.loc["2min", "r"] == pytest.approx(metrics["r_2min"])

    for size in BIN_SIZES:
        assert len(pd.read_csv(tmp_path / f"binned_{size}.csv")) == metrics[f"n_bins_{size}"]
    pngs = [f"timecourse_sub-01_ses-0{i}.png" for i in (1, 2, 3)]
    pngs += [f"scatter_{s}.png" for s in BIN_SIZES] + ["roc_1min.png"]
    for name in pngs:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name


def test_evaluate_predictions_without_bootstrap_or_files():
    metrics = evaluate_predictions(make_table(n_sessions=2), n_boot=0, bin_sizes=("run",))
    assert np.isnan(metrics["r_run_ci_low"]) and np.isnan(metrics["auc_run_p"])
    assert "r_1min" not in metrics
    with pytest.raises(ValueError, match="no frame"):
        evaluate_predictions(make_table(n_sessions=1).assign(rating=np.nan), n_boot=0)


def test_evaluate_by_gives_one_row_per_participant():
    table = pd.concat([make_table(n_sessions=2, subject="01"), make_table(subject="02", seed=9)])
    rows = evaluate_by(table, by=["subject", "model"], n_boot=200, bin_sizes=("1min",))
    assert list(rows["subject"]) == ["01", "02"]
    assert list(rows["n_sessions"]) == [2, 6]
    only_02 = evaluate_predictions(table[table["subject"] == "02"], n_boot=200, bin_sizes=["1min"])
    assert rows.iloc[1]["r_1min"] == pytest.approx(only_02["r_1min"])


def test_rich_table_has_one_row_per_bin_size():
    metrics = evaluate_predictions(make_table(n_sessions=2), n_boot=200)
    table = format_metrics_table(metrics)
    assert isinstance(table, Table) and table.row_count == 4
    console = Console(record=True, width=160)
    print_metrics(metrics, console=console)
    text = console.export_text()
    assert "1min" in text and "session" in text and f"{metrics['r_1min']:.2f}" in text
    # the same table renders from metrics read back from JSON (null instead of NaN)
    assert format_metrics_table(json.loads(json.dumps(json_safe(metrics)))).row_count == 4


# ----------------------------------------------------------------------------- compare


def test_paired_difference_detects_the_better_model():
    table_a = make_table(n_sessions=6, noise=1.0, seed=4)
    noise = np.random.default_rng(11).normal(0.0, 1.0, len(table_a))
    table_b = table_a.assign(prediction=table_a["prediction"] + noise)
    result = paired_bootstrap_difference(table_a, table_b, n_boot=1000, seed=0)
    assert result["r_a"] > result["r_b"]
    assert result["diff"] == pytest.approx(result["r_a"] - result["r_b"])
    assert result["diff"] > 0 and result["ci_low"] > 0
    assert result["p"] < 0.01
    assert result["auc_diff"] > 0


def test_paired_difference_of_identical_tables_is_zero():
    table = make_table(n_sessions=3, noise=2.0)
    result = paired_bootstrap_difference(table, table.copy(), n_boot=500)
    assert result["diff"] == 0 and result["auc_diff"] == 0
    assert result["ci_low"] == 0 and result["ci_high"] == 0
    assert result["p"] == 1.0


def test_paired_difference_requires_the_same_frames():
    table = make_table(n_sessions=2)
    with pytest.raises(ValueError, match="identical usable frames"):
        paired_bootstrap_difference(table, table.drop(index=100), n_boot=100)
    with pytest.raises(ValueError, match="ratings"):
        paired_bootstrap_difference(table, table.assign(rating=table["rating"] + 0.1), n_boot=100)
