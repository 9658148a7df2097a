"""Conformance with the reference study's code (cocoanlab/DEIPP), one test per rule.

Each test builds a small hand-made table on which the study's rule gives a known answer and
checks painnet's implementation of that rule (``EvalProtocol.lee2026()``, ``EdgePCR`` with the
study's decile rule, the training-size statistic, the cleaning options). File:line references
point into cocoanlab/DEIPP's ``analysis/`` folder.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from painnet.evaluation.bins import bin_predictions, discretize_positions
from painnet.evaluation.bootstrap import (
    bin_hierarchy,
    bootstrap_draws,
    draw_counts,
    hierarchical_bootstrap,
    sort_bins,
    summarize_draws,
    weighted_auc_rows,
)
from painnet.evaluation.metrics import compute_metrics
from painnet.evaluation.protocol import EvalProtocol, as_protocol
from painnet.evaluation.report import evaluate_predictions

STUDY = EvalProtocol.lee2026()


def run_table(rating, prediction=None, session="01", run="1", tr=0.46, subject="01"):
    """Frame-level prediction table of one run (frame onsets every ``tr`` seconds)."""
    rating = np.asarray(rating, dtype=float)
    prediction = rating.copy() if prediction is None else np.asarray(prediction, dtype=float)
    n = rating.size
    return pd.DataFrame(
        {
            "subject": subject,
            "session": session,
            "run": run,
            "frame": np.arange(n),
            "time_s": np.arange(n) * tr,
            "rating": rating,
            "prediction": prediction,
            "fold": 0,
        }
    )


def binned_table(sessions: dict[str, dict[str, tuple]]) -> pd.DataFrame:
    """Binned table from {session: {run: (ratings, predictions)}}, one row per bin."""
    rows = []
    for session, runs in sessions.items():
        for run, (ratings, predictions) in runs.items():
            for b, (a, p) in enumerate(zip(ratings, predictions, strict=True)):
                rows.append(("01", session, run, b, float(a), float(p)))
    return pd.DataFrame(rows, columns=["subject", "session", "run", "bin", "rating", "prediction"])


# ----------------------------------------------------------------------------- bins


def test_study_bins_follow_matlab_discretize_of_the_kept_frames():
    """analysis_rating.m:95: tbin_idx = discretize(1:numel(rating_dat), nbin), after censoring."""
    assert np.bincount(discretize_positions(304, 5)).tolist() == [69, 70, 70, 70, 25]
    # 320 frames, 16 censored (no rating): the 304 kept frames are binned by their position
    censored = np.arange(40, 56)
    rating = np.linspace(0.0, 1.0, 320)
    rating[censored] = np.nan
    table = run_table(rating)
    binned = bin_predictions(table, "2min", STUDY)  # bins_per_run: 5 two-minute bins
    assert binned["n_frames"].tolist() == [69, 70, 70, 70, 25]
    kept = np.flatnonzero(np.isfinite(rating))
    assert binned["rating"].iloc[0] == pytest.approx(rating[kept[:69]].mean())
    assert binned["rating"].iloc[4] == pytest.approx(rating[kept[-25:]].mean())
    # painnet's default rule: equal counts, 304 = 61 + 61 + 61 + 61 + 60
    equal = EvalProtocol(bins_per_run={"2min": 5})
    assert bin_predictions(table, "2min", equal)["n_frames"].tolist() == [61, 61, 61, 61, 60]


def test_study_bin_counts_are_fixed_per_run_whatever_its_length():
    """The study always cuts a run into 10 (1 min) or 5 (2 min) bins (nbin = [2 5 10])."""
    table = run_table(np.linspace(0, 1, 652))  # a 300-s run
    assert len(bin_predictions(table, "1min", STUDY)) == 10
    assert len(bin_predictions(table, "1min")) == 5  # painnet: round(300 s / 60 s)


def test_session_value_is_the_mean_of_the_run_means():
    """analysis_visualize_model_test.m:53-54: x{3} = run means, x{4} = mean(x{3})."""
    short = run_table(np.zeros(10), np.full(10, 2.0), run="1")
    long = run_table(np.ones(30), np.full(30, 4.0), run="2")
    table = pd.concat([short, long])
    session = bin_predictions(table, "session", STUDY)
    assert session["rating"].item() == pytest.approx(0.5)
    assert session["prediction"].item() == pytest.approx(3.0)
    frames = bin_predictions(table, "session", EvalProtocol(session_value="frames"))
    assert frames["rating"].item() == pytest.approx(0.75)


# ----------------------------------------------------------------------------- AUC


def test_a_bin_exactly_at_the_median_counts_as_low():
    """analysis_visualize_model_test.m:61: labels = a > quantile(a(:), 0.5)."""
    binned = binned_table({"01": {"1": ([0.1, 0.2, 0.5, 0.8, 0.9], [0.0, 1.0, 5.0, 0.5, 2.0])}})
    # study: positives {0.5, 2.0} vs negatives {0.0, 1.0, 5.0}: 3 of 6 pairs ranked right
    assert compute_metrics(binned, STUDY)["auc"] == pytest.approx(0.5)
    # painnet's default drops the median bin: 3 of 4 pairs
    assert compute_metrics(binned)["auc"] == pytest.approx(0.75)


def test_auc_labels_come_from_the_observed_pooled_median_in_every_draw():
    """analysis_visualize_model_test.m:61,265-266: xall_hvl is indexed by the draw, not redone."""
    rng = np.random.default_rng(3)
    ratings = {s: {r: (rng.random(6), rng.random(6)) for r in "12"} for s in ("01", "02", "03")}
    binned = sort_bins(binned_table(ratings))
    rating, prediction = binned["rating"].to_numpy(), binned["prediction"].to_numpy()
    observed = rating > np.median(rating)
    protocol = STUDY.replace(one_class="nan")  # no redraw: draws match draw_counts exactly
    (draws,), level = bootstrap_draws([binned], n_boot=50, seed=11, protocol=protocol)
    counts = draw_counts(bin_hierarchy(binned), np.random.default_rng(11), 50, level).bins
    for row, auc in zip(counts.astype(int), draws["auc"], strict=True):
        labels, scores = np.repeat(observed, row), np.repeat(prediction, row)
        expected = roc_auc_score(labels, scores) if 0 < labels.sum() < labels.size else np.nan
        np.testing.assert_allclose(auc, expected, atol=1e-12)
    # the row-wise statistic with fixed labels equals sklearn on the expanded draw, ties included
    pred_ties = np.round(prediction, 1)
    fixed = weighted_auc_rows(counts, rating, pred_ties, labels=observed)
    row = counts[0].astype(int)
    assert fixed[0] == pytest.approx(
        roc_auc_score(np.repeat(observed, row), np.repeat(pred_ties, row)), abs=1e-12
    )


@pytest.mark.parametrize("labels", ["per_draw", "observed"])
@pytest.mark.parametrize("median_tie", ["drop", "low"])
def test_row_wise_auc_equals_sklearn_on_every_expanded_draw(labels, median_tie):
    """Each bootstrap AUC equals perfcurve's / sklearn's AUC of the expanded draw, for both
    label rules and both median-tie rules, with tied ratings and predictions."""
    from painnet.evaluation.bootstrap import _TableDraws
    from painnet.evaluation.metrics import median_labels

    rng = np.random.default_rng(7)
    rating, prediction = np.round(rng.random(15), 1), np.round(rng.random(15), 1)
    binned = binned_table({"01": {"1": (rating, prediction)}})
    protocol = EvalProtocol(auc_labels=labels, median_tie=median_tie)
    stats = _TableDraws(binned, bin_hierarchy(binned), protocol)
    counts = rng.integers(0, 3, size=(25, 15)).astype(float)
    auc = stats.auc_rows(counts)[0]
    for row, value in zip(counts.astype(int), auc, strict=True):
        a, p = np.repeat(rating, row), np.repeat(prediction, row)
        if labels == "observed":
            above, keep = (np.repeat(m, row) for m in median_labels(rating, median_tie))
        else:
            above, keep = median_labels(a, median_tie)
        y, score = above[keep], p[keep]
        expected = roc_auc_score(y, score) if 0 < y.sum() < y.size else np.nan
        np.testing.assert_allclose(value, expected, atol=1e-12)


def test_one_class_draws_are_redrawn_for_every_metric_of_that_bin_size():
    """analysis_visualize_model_test.m:91: `continue` before storing the draw's indices, so the
    r of that bin size is computed on the same redrawn set."""
    # each session holds one class; within a session prediction falls as rating rises (r = -1),
    # across sessions both rise: a draw of one session only has r = -1 and one AUC class
    binned = binned_table(
        {
            "01": {"1": ([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1])},
            "02": {"1": ([0.6, 0.7, 0.8, 0.9], [1.4, 1.3, 1.2, 1.1])},
        }
    )
    n = 400
    (redrawn,), _ = bootstrap_draws([binned], n_boot=n, seed=0, protocol=STUDY)
    assert np.isfinite(redrawn["auc"]).all()
    assert (redrawn["r"][np.isfinite(redrawn["r"])] > 0).all()  # no single-session draw left
    (kept,), _ = bootstrap_draws(
        [binned], n_boot=n, seed=0, protocol=STUDY.replace(one_class="nan")
    )
    one_class = np.isnan(kept["auc"])
    assert 0.3 < one_class.mean() < 0.7  # P(both draws hit the same session) = 1/2
    assert (kept["r"][one_class & np.isfinite(kept["r"])] < 0).all()
    result = hierarchical_bootstrap(binned, n_boot=n, seed=0, protocol=STUDY.replace(min_units=2))
    assert 0.5 * n < result["n_redrawn"] < 1.5 * n  # about one failure per success at p = 1/2


def test_a_table_of_one_class_is_not_redrawn_forever():
    constant = binned_table({f"0{s}": {"1": ([0.5] * 4, [0.1, 0.2, 0.3, 0.4])} for s in range(6)})
    result = hierarchical_bootstrap(constant, n_boot=2000, seed=0, protocol=STUDY)
    assert result["n_redrawn"] == 0 and np.isnan(result["auc"]["p"])
    assert "one class" in result["reasons"]["auc"]


# ----------------------------------------------------------------------------- p and CI


def test_p_value_is_twice_the_smaller_tail_plus_one_uncapped():
    """Functions/boot2cip.m:20-22: p = 2 min((k_le + 1)/(n + 1), (k_ge + 1)/(n + 1))."""
    draws = np.array([-0.2, 0.0, 0.0, 0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9])
    p = summarize_draws(draws, null=0.0, n_boot=10, p_value="study")["p"]
    assert p == pytest.approx(2 * min(4 / 11, 10 / 11))  # k_le = 3, k_ge = 9
    # AUC null 0.5; every draw at the null: both tails hold all draws -> 2 (not capped)
    assert summarize_draws(np.full(4, 0.5), 0.5, 4, p_value="study")["p"] == pytest.approx(2.0)
    # a NaN draw counts in n but in neither tail (MATLAB comparisons with NaN are false)
    with_nan = np.r_[draws, np.nan]
    assert summarize_draws(with_nan, 0.0, 11, p_value="study")["p"] == pytest.approx(8 / 12)
    # no draw on the null side: 2 / (n + 1), never 0
    assert summarize_draws(np.linspace(0.1, 1, 9), 0.0, 9, p_value="study")["p"] == 0.2


def test_ci_is_the_matlab_order_statistic_round_0025n():
    """Functions/boot2cip.m:18-19: sorted(round([n 0.025, n 0.975])), 1-based, halves up."""
    rng = np.random.default_rng(0)
    for n, (low, high) in {10_000: (250, 9750), 100: (3, 98), 30: (1, 29), 10: (1, 10)}.items():
        draws = rng.permutation(np.arange(1, n + 1, dtype=float))  # value == 1-based rank
        summary = summarize_draws(draws, 0.0, n, ci="study")
        assert (summary["ci_low"], summary["ci_high"]) == (low, high), n


def test_within_run_and_within_session_r_are_bootstrapped_over_runs_and_sessions():
    """analysis_visualize_model_test.m:171-174, 215-218: the per-run (per-session) r of 1-min bins
    is fixed; each draw averages it over the drawn runs (sessions)."""
    rng = np.random.default_rng(5)
    spec = {f"0{s}": {r: (rng.random(5), rng.random(5)) for r in "123"} for s in range(1, 5)}
    binned = sort_bins(binned_table(spec))
    h = bin_hierarchy(binned)
    run_r = np.array([np.corrcoef(*spec[s][r])[0, 1] for s in spec for r in "123"])
    session_r = np.array(
        [
            np.corrcoef(
                np.r_[[spec[s][r][0] for r in "123"]].ravel(),
                np.r_[[spec[s][r][1] for r in "123"]].ravel(),
            )[0, 1]
            for s in spec
        ]
    )
    protocol = STUDY.replace(one_class="nan")
    (draws,), level = bootstrap_draws([binned], n_boot=30, seed=2, protocol=protocol)
    counts = draw_counts(h, np.random.default_rng(2), 30, level)
    np.testing.assert_allclose(
        draws["within_run_r"], counts.runs @ run_r / counts.runs.sum(1), atol=1e-12
    )
    np.testing.assert_allclose(
        draws["within_session_r"], counts.sessions @ session_r / counts.sessions.sum(1), atol=1e-12
    )
    point = compute_metrics(binned, STUDY)
    assert point["within_run_r"] == pytest.approx(run_r.mean())


def test_too_few_units_give_no_ci_or_p_and_say_why():
    """Issue 13: 3 runs of one session cannot support a bootstrap; no floor p is reported."""
    binned = binned_table({"01": {r: ([v], [v * 2]) for r, v in zip("123", (0.1, 0.5, 0.9))}})
    result = hierarchical_bootstrap(binned, n_boot=200, seed=0)
    assert result["level"] == "run"
    assert np.isnan(result["r"]["p"]) and np.isnan(result["auc"]["ci_low"])
    assert "only 3 runs" in result["reasons"]["r"]


def test_the_study_protocol_runs_end_to_end_and_is_named_in_config():
    table = pd.concat(
        [
            run_table(
                np.sin(np.arange(1304) / 80 + k) + 1,
                np.sin(np.arange(1304) / 80 + k) + 1.2,
                session=f"0{k // 3 + 1}",
                run=str(k % 3 + 1),
            )
            for k in range(6)
        ]
    )
    metrics = evaluate_predictions(table, n_boot=200, plots=False, protocol="lee2026")
    assert metrics["n_bins_1min"] == 60 and metrics["n_bins_2min"] == 30
    assert np.isfinite(metrics["within_run_r_1min_ci_low"])
    assert as_protocol({"preset": "lee2026", "min_units": 3}).min_units == 3
    with pytest.raises(ValueError, match="eval.protocol.median_tie"):
        as_protocol({"median_tie": "high"})
    with pytest.raises(ValueError, match="unknown key"):
        as_protocol({"bins": 10})


# ----------------------------------------------------------------------------- edge model


def _pc_problem(seed=0, n=60, n_features=300):
    """Seeded 60 x 300 sample matrix whose |cov| and |corr| PC orders differ from the first PC."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_features)) * np.linspace(3.0, 0.2, n_features)
    y = x[:, -5:].sum(1) + 0.5 * rng.standard_normal(n)  # rating lives in low-variance PCs
    return x, y


def test_edge_pcs_enter_by_their_correlation_with_the_rating_down_to_lambda_zero():
    """analysis_predict_rating_modeling.m:70-77: lasso on the PC scores with MATLAB's default
    standardisation, so PCs enter by |corr(score, y)|; the path runs to df = all PCs."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import lasso_path
    from sklearn.preprocessing import StandardScaler

    from painnet.models.classical import _fit_gram_pcr

    x, y = _pc_problem()
    fit = _fit_gram_pcr(x @ x.T, y, 100, "analytic")
    # reference: sklearn PCA, standardised scores, lasso_path to 1e-9 of the largest penalty
    scores = PCA(svd_solver="full").fit_transform(x)[:, : fit.lam.size]
    standardised = StandardScaler().fit_transform(scores)
    yc = y - y.mean()
    _, coefs, _ = lasso_path(standardised, yc, alphas=200, eps=1e-9)
    first_step = np.argmax(coefs != 0, axis=1)
    strength = np.abs(standardised.T @ yc)
    reference = np.lexsort((-strength, first_step))
    assert fit.order.tolist() == reference.tolist()
    assert fit.n_entered == x.shape[0] - 1  # every PC of 60 centred samples enters
    by_cov = np.argsort(-np.abs(scores.T @ yc), kind="stable")
    assert by_cov[0] != fit.order[0]  # painnet's former |cov| order differed from the first PC
    corr = [abs(np.corrcoef(scores[:, j], y)[0, 1]) for j in fit.order[:10]]
    assert corr == sorted(corr, reverse=True)


def test_fixed_components_reproduce_the_inner_cv_choice_without_inner_cv():
    """A training-size job fixes the fold's number of PCs (the study fixes its λ there,
    analysis_predict_rating_trainsize.m:109)."""
    from painnet.data.types import RunData, RunKey
    from painnet.models.classical import EdgePCR

    rng = np.random.default_rng(4)
    runs = []
    for session in ("01", "02", "03"):
        for run in ("1", "2"):
            z = rng.standard_normal((160, 6)).astype(np.float32)
            rating = 0.5 + 0.4 * np.sin(np.arange(160) / 12 + rng.uniform(0, 6))
            z[:, 1] = (rating - 0.5) * z[:, 0] + 0.3 * z[:, 1]  # co-fluctuation codes pain
            kept = np.ones(160, bool)
            runs.append(
                RunData(
                    RunKey("01", session, "rating", run),
                    0.46,
                    z,
                    kept,
                    rating.astype(np.float32),
                    np.arange(160) * 0.46,
                )
            )
    full = EdgePCR(dtype="float64").fit(runs)
    hyper = full.hyperparameters()
    assert hyper == {"fixed_components": full.n_components_}
    fixed = EdgePCR(dtype="float64", **hyper).fit(runs)
    assert fixed.cv_scores_ == {} and fixed.n_components_ == full.n_components_
    np.testing.assert_allclose(fixed.weights_, full.weights_, atol=1e-12)
    with pytest.raises(ValueError, match="fixed_components"):
        EdgePCR(fixed_components=0)
    with pytest.raises(ValueError, match="not fitted"):
        EdgePCR().hyperparameters()


# 12 frames, frame 5 censored; kept sequence 0.1 0.1 0.9 0.9 0.9 | 0.9 0.1 0.1 0.1 0.9 0.9
DECILE_TARGET = np.array([0.1, 0.1, 0.9, 0.9, 0.9, np.nan, 0.9, 0.1, 0.1, 0.1, 0.9, 0.9])


def test_study_deciles_break_ties_by_position_span_censoring_and_spare_the_last_segment():
    """analysis_rating.m:81-93. Ranks by a stable sort: the five 0.1 get 1-5, the six 0.9 get
    6-11; with 2 bins the threshold is quantile(1:11, 0.5) = 6, so the first 0.9 (rank 6) is
    low. Segments run over the kept frames only (frame 5 does not end one), and the last
    segment (2 frames) is never checked against the minimum."""
    from painnet.models.classical import decile_labels

    valid = np.isfinite(DECILE_TARGET)
    study = decile_labels(DECILE_TARGET, valid, n_deciles=2, min_segment=3, rule="study")
    assert study.tolist() == [0, 0, 0, 1, 1, -1, 1, 0, 0, 0, 1, 1]
    strict = decile_labels(DECILE_TARGET, valid, n_deciles=2, min_segment=4, rule="study")
    assert strict.tolist() == [-1] * 10 + [1, 1]
    # painnet's rule: tied ratings share a decile, the censored frame ends a segment, and every
    # segment (the last included) must reach the minimum
    painnet = decile_labels(DECILE_TARGET, valid, n_deciles=2, min_segment=3)
    assert painnet.tolist() == [-1, -1, 1, 1, 1, -1, -1, 0, 0, 0, -1, -1]


# ----------------------------------------------------------------------------- training size


def test_minimum_sessions_is_the_count_of_n_below_half_plus_one_on_a_non_monotone_curve():
    """analysis_visualize_model_trainsize.m:111-116: sig = mean(p < 0.05 & r > 0) over repeats;
    minimum sessions = sum(sig < 0.5) + 1."""
    from painnet.experiments.learning_curve import minimum_sessions, size_summary

    frac = {1: 0.1, 2: 0.5, 3: 0.3, 4: 0.7, 5: 0.8, 6: 0.9}  # dips below half again at n = 3
    rows = []
    for n, f in frac.items():
        for rep in range(10):
            significant = rep < round(f * 10)
            rows.append(
                {
                    "subject": "01",
                    "model": "edge_pcr",
                    "mode": "random",
                    "n_train": n,
                    "repeat": rep,
                    "r_1min": 0.4 if significant else -0.1,
                    "r_1min_p": 0.01 if significant else 0.5,
                    "auc_1min": 0.6,
                }
            )
    summary = size_summary(pd.DataFrame(rows), bin_sizes=("1min",)).iloc[0]
    assert summary["min_sessions_study"] == 3  # n = 1 and n = 3 are below half
    assert summary["first_n_half_significant"] == 2
    assert summary["min_n_significant"] == 4
    direct = minimum_sessions(pd.Series(list(frac)), pd.Series(list(frac.values())))
    assert direct["min_sessions_study"] == 3
