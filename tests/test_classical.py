"""Classical reference decoders: edge-PCR-LASSO (the study's model) and the window ridge baseline."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression, Ridge, lasso_path
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from painnet.data.types import RunData, RunKey
from painnet.models.classical import (
    EdgePCR,
    WindowRidge,
    _grouped_ridge_predictions,
    decile_labels,
    edge_vector_to_matrix,
    fit_predict,
)

TR = 0.46


# ---- synthetic runs ------------------------------------------------------------------------


def _rating_curve(rng: np.random.Generator, n_frames: int) -> np.ndarray:
    """A slowly drifting rating in [0, 1] (integrated smoothed noise)."""
    steps = np.convolve(rng.standard_normal(n_frames + 200), np.ones(40) / 40, mode="same")
    walk = steps[100 : 100 + n_frames].cumsum()
    return (walk - walk.min()) / np.ptp(walk)


def _run_from_signal(
    x: np.ndarray, rating: np.ndarray, session: str, run: str, n_drop: int, tr: float = TR
) -> RunData:
    """RunData as the data layer makes it: z-scored over kept frames, 0 and NaN elsewhere."""
    kept = np.ones(x.shape[0], dtype=bool)
    kept[:n_drop] = False
    z = np.zeros_like(x)
    z[kept] = (x[kept] - x[kept].mean(0)) / x[kept].std(0)
    return RunData(
        key=RunKey("01", session, "rating", run),
        tr=tr,
        series=z.astype(np.float32),
        kept=kept,
        target=np.where(kept, rating, np.nan).astype(np.float32),
        time_s=np.arange(x.shape[0]) * tr,
    )


def _make_run(
    rng: np.random.Generator,
    session: str,
    run: str,
    coding: str,
    n_frames: int = 300,
    n_parcels: int = 10,
    n_drop: int = 8,
) -> RunData:
    """Synthetic run whose pain is coded by co-fluctuation ("edge") or activation ("activation").

    edge: parcels 0-3 share one white fluctuation whose amplitude grows with the rating, so
    their pairwise products (edges) track pain while each parcel's mean does not.
    activation: parcels 0-2 carry the rating itself on top of noise.
    """
    rating = _rating_curve(rng, n_frames)
    x = rng.standard_normal((n_frames, n_parcels))
    if coding == "edge":
        x[:, :4] += ((0.2 + 1.5 * rating) * rng.standard_normal(n_frames))[:, None]
    else:
        x[:, :3] += 1.5 * rating[:, None]
    return _run_from_signal(x, rating, session, run, n_drop)


def _dataset(seed: int, coding: str, n_sessions: int = 5, n_runs: int = 2, **kw) -> list[RunData]:
    rng = np.random.default_rng(seed)
    return [
        _make_run(rng, f"{s:02d}", str(r), coding, **kw)
        for s in range(1, n_sessions + 1)
        for r in range(1, n_runs + 1)
    ]


def _explicit_edges(series: np.ndarray) -> np.ndarray:
    """The (T, E) edge time series z_i(t) z_j(t), i < j — built only for checks."""
    i, j = np.triu_indices(series.shape[1], 1)
    return series[:, i].astype(np.float64) * series[:, j]


def _explicit_decile_features(runs: list[RunData], n_deciles: int, min_segment: int):
    """Decile edge features and ratings straight from explicit edge time series."""
    feats, ratings, sessions = [], [], []
    for run in runs:
        labels = decile_labels(run.target, run.valid_target, n_deciles, min_segment)
        edges = _explicit_edges(run.series)
        for d in np.unique(labels[labels >= 0]):
            feats.append(edges[labels == d].mean(0))
            ratings.append(run.target[labels == d].astype(np.float64).mean())
            sessions.append(run.key.session)
    return np.array(feats), np.array(ratings), np.array(sessions)


def _pooled_r(preds: dict, runs: list[RunData], bin_frames: int = 1) -> float:
    """Pearson r of predictions vs ratings over valid frames, optionally averaged in bins."""
    p_all, y_all = [], []
    for run in runs:
        p, y = preds[run.key], run.target.astype(np.float64)
        ok = np.isfinite(p) & np.isfinite(y)
        for start in range(0, run.n_frames, bin_frames):
            sel = ok[start : start + bin_frames]
            if sel.any():
                p_all.append(p[start : start + bin_frames][sel].mean())
                y_all.append(y[start : start + bin_frames][sel].mean())
    return float(np.corrcoef(p_all, y_all)[0, 1])


def _split(runs: list[RunData], test_session: str):
    train = [r for r in runs if r.key.session != test_session]
    test = [r for r in runs if r.key.session == test_session]
    return train, test


# ---- quadratic form ------------------------------------------------------------------------


def test_quadratic_form_prediction_equals_linear_model_on_explicit_edges():
    rng = np.random.default_rng(0)
    n_parcels = 6
    w = rng.standard_normal(n_parcels * (n_parcels - 1) // 2)
    series = rng.standard_normal((50, n_parcels)).astype(np.float32)
    model = EdgePCR()
    model.weights_ = edge_vector_to_matrix(w, n_parcels)
    model.intercept_ = 0.7
    model.n_parcels_ = n_parcels
    kept = np.ones(50, dtype=bool)
    kept[:3] = False
    run = RunData(
        RunKey("01", "01", "rating", "1"), TR, series, kept, np.zeros(50), np.arange(50.0)
    )

    pred = model.predict_run(run)

    explicit = _explicit_edges(series) @ w + 0.7
    np.testing.assert_allclose(pred[kept], explicit[kept], rtol=1e-10, atol=1e-10)
    assert np.isnan(pred[~kept]).all()
    assert np.allclose(model.weights_, model.weights_.T)
    assert np.all(np.diag(model.weights_) == 0)


# ---- decile samples ------------------------------------------------------------------------

# 13 frames, frame 6 unrated. Valid ratings ranked 1..12; 3 deciles of 4 ranks each:
#   decile 0: 0.05 (f10), 0.10 (f0), 0.15 (f2), 0.20 (f1)
#   decile 1: 0.50 (f5), 0.52 (f7), 0.55 (f4), 0.60 (f3)
#   decile 2: 0.80 (f11), 0.85 (f12), 0.90 (f8), 0.95 (f9)
# Segments (frame 6 breaks them): f0-2 d0 (3), f3-5 d1 (3), f7 d1 (1), f8-9 d2 (2), f10 d0 (1),
# f11-12 d2 (2).
HAND_TARGET = np.array(
    [0.10, 0.20, 0.15, 0.60, 0.55, 0.50, np.nan, 0.52, 0.90, 0.95, 0.05, 0.80, 0.85]
)


def test_decile_labels_match_hand_worked_example():
    valid = np.isfinite(HAND_TARGET)

    labels = decile_labels(HAND_TARGET, valid, n_deciles=3, min_segment=2)
    # f7 and f10 are alone in their segments; f6 has no rating.
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, -1, -1, 2, 2, -1, 2, 2]

    labels = decile_labels(HAND_TARGET, valid, n_deciles=3, min_segment=3)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] + [-1] * 7

    labels = decile_labels(HAND_TARGET, valid, n_deciles=3, min_segment=1)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, -1, 1, 2, 2, 0, 2, 2]


def test_tied_ratings_share_one_decile():
    target = np.array([0.3] * 6 + [0.9] * 4)
    labels = decile_labels(target, np.ones(10, dtype=bool), n_deciles=10, min_segment=1)
    # Average ranks 3.5 and 8.5 of 10 -> deciles floor(2.5) = 2 and floor(7.5) = 7.
    assert labels.tolist() == [2] * 6 + [7] * 4


def test_prepared_samples_average_edges_and_ratings_per_decile():
    rng = np.random.default_rng(1)
    series = rng.standard_normal((13, 4)).astype(np.float32)
    kept = np.isfinite(HAND_TARGET)
    run = RunData(RunKey("01", "01", "rating", "1"), TR, series, kept, HAND_TARGET, np.arange(13.0))

    samples = EdgePCR(n_deciles=3, min_segment=2, dtype="float64").prepare([run])

    assert samples.decile.tolist() == [0, 1, 2]
    assert samples.n_frames.tolist() == [3, 3, 4]
    np.testing.assert_allclose(samples.rating, [0.15, 0.55, 0.875], rtol=1e-6)
    edges = _explicit_edges(series)
    for row, frames in enumerate([[0, 1, 2], [3, 4, 5], [8, 9, 11, 12]]):
        np.testing.assert_allclose(samples.features[row], edges[frames].mean(0), rtol=1e-12)
    np.testing.assert_allclose(samples.gram, samples.features @ samples.features.T)


# ---- the Gram route equals the edge-space computation ----------------------------------------


def _edge_space_fit(x: np.ndarray, y: np.ndarray, k: int):
    """The straightforward pipeline: sklearn PCA on explicit features → lasso_path on the
    standardised PC scores (as the study's MATLAB ``lasso``) → OLS on the raw scores."""
    pca = PCA(svd_solver="full").fit(x)
    scores = pca.transform(x)
    keep = pca.explained_variance_ > 1e-9 * pca.explained_variance_[0]
    scores = scores[:, keep]
    standardised = StandardScaler().fit_transform(scores)
    yc = y - y.mean()
    _, coefs, _ = lasso_path(standardised, yc, alphas=100, eps=1e-9)
    nonzero = coefs != 0
    entered = np.flatnonzero(nonzero.any(1))
    strength = np.abs(standardised.T @ yc)
    order = entered[np.lexsort((-strength[entered], nonzero[entered].argmax(1)))]
    sel = order[:k]
    ols = LinearRegression().fit(scores[:, sel], y)
    w = pca.components_[keep][sel].T @ ols.coef_
    return w, ols.intercept_ - pca.mean_ @ w


@pytest.mark.parametrize(("n_parcels", "n_sessions", "k"), [(6, 3, 4), (12, 2, 7)])
def test_gram_pca_lasso_ols_equals_edge_space_computation(n_parcels, n_sessions, k):
    # (6 parcels: more samples than edges; 12 parcels: fewer samples than edges.)
    runs = _dataset(2, "edge", n_sessions=n_sessions, n_parcels=n_parcels, n_frames=200)
    x, y, _ = _explicit_decile_features(runs, 10, 5)
    w_expected, b_expected = _edge_space_fit(x, y, k)

    model = EdgePCR(inner_cv=False, max_components=k, dtype="float64", lasso_solver="sklearn")
    model.fit(runs)

    iu = np.triu_indices(n_parcels, 1)
    assert model.n_components_ == k
    np.testing.assert_allclose(2 * model.weights_[iu], w_expected, rtol=1e-6, atol=1e-9)
    assert model.intercept_ == pytest.approx(b_expected, rel=1e-6, abs=1e-9)


def test_analytic_lasso_order_matches_sklearn_lasso_path():
    runs = _dataset(3, "edge", n_sessions=3, n_parcels=8, n_frames=200)
    samples = EdgePCR().prepare(runs)

    fast = EdgePCR(lasso_solver="analytic").fit(samples)
    slow = EdgePCR(lasso_solver="sklearn").fit(samples)

    assert fast.component_order_.tolist() == slow.component_order_.tolist()
    assert fast.cv_scores_ == pytest.approx(slow.cv_scores_)
    np.testing.assert_allclose(fast.weights_, slow.weights_, rtol=1e-10, atol=1e-12)


def test_inner_cv_picks_the_best_scoring_number_of_components():
    runs = _dataset(4, "edge", n_sessions=4)

    model = EdgePCR(component_grid=[1, 2, 5, 20]).fit(runs)

    assert list(model.cv_scores_) == [1, 2, 5, 20]
    best = max(model.cv_scores_, key=model.cv_scores_.get)
    assert model.n_components_ == min(best, model.component_order_.size)


def test_single_training_session_holds_out_runs_in_the_inner_cv():
    runs = _dataset(15, "edge", n_sessions=1, n_runs=3)

    model = EdgePCR(max_components=5).fit(runs)

    assert list(model.cv_scores_) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="inner cross-validation needs"):
        EdgePCR().fit(runs[:1])
    assert EdgePCR(inner_cv=False, max_components=2).fit(runs[:1]).n_components_ == 2


# ---- learning on held-out sessions -----------------------------------------------------------


def test_edgepcr_decodes_cofluctuation_coded_pain_in_held_out_session():
    runs = _dataset(5, "edge", n_sessions=5)
    train, test = _split(runs, "05")

    preds = fit_predict(EdgePCR(), train, test)

    assert set(preds) == {r.key for r in test}
    # ~14 s bins, as the evaluation averages predictions into time bins
    assert _pooled_r(preds, test, bin_frames=30) > 0.5
    assert _pooled_r(preds, test) > 0.15  # single frames: one noisy product per edge


@pytest.mark.parametrize("summary", ["mean", "flatten"])
def test_window_ridge_decodes_activation_coded_pain_in_held_out_session(summary):
    runs = _dataset(6, "activation", n_sessions=4)
    train, test = _split(runs, "04")

    model = WindowRidge(window_s=3.0, summary=summary, stride=2)
    preds = fit_predict(model, train, test)

    assert _pooled_r(preds, test) > 0.5
    assert model.alpha_ in model.alphas
    assert set(model.cv_scores_) == set(model.alphas)


def test_within_run_ridge_fits_only_the_shape_of_each_run():
    """target="within_run": each run's ratings are centred before the fit, so a session's pain
    level (which per-run z-scored activity cannot carry) neither enters the fit nor the inner
    CV score; predictions have no run level and keep the within-run shape."""
    runs = _dataset(6, "activation", n_sessions=4)
    offsets = {"01": 3.0, "02": -2.0, "03": 5.0, "04": 0.0}  # large session-level pain
    for run in runs:
        run.target[:] += offsets[run.key.session]
    train, test = _split(runs, "04")

    model = WindowRidge(window_s=3.0, summary="mean", target="within_run")
    preds = fit_predict(model, train, test)

    assert model.pipeline_[-1].intercept_ == pytest.approx(0.0, abs=1e-9)
    for run in test:
        p, y = preds[run.key], run.target.astype(np.float64)
        ok = np.isfinite(p) & np.isfinite(y)
        assert abs(p[ok].mean()) < 0.1 * p[ok].std()  # no run level of its own
        assert np.corrcoef(p[ok], y[ok])[0, 1] > 0.5
    # The inner CV scores run-centred held-out windows: the offsets cannot raise or lower them.
    plain = WindowRidge(window_s=3.0, summary="mean", target="within_run").fit(
        [_with_target(r, r.target - offsets[r.key.session]) for r in train]
    )
    assert plain.cv_scores_ == pytest.approx(model.cv_scores_, abs=1e-9)
    with pytest.raises(ValueError, match="target must be one of"):
        WindowRidge(target="session")


def _with_target(run: RunData, target: np.ndarray) -> RunData:
    return RunData(run.key, run.tr, run.series, run.kept, target, run.time_s)


def test_fitted_models_survive_pickling(tmp_path):
    runs = _dataset(16, "activation", n_sessions=3)
    train, test = _split(runs, "03")
    for model in (EdgePCR(), WindowRidge(window_s=2.0, summary="mean")):
        model.fit(train)
        path = tmp_path / f"{type(model).__name__}.pkl"
        path.write_bytes(pickle.dumps(model))
        loaded = pickle.loads(path.read_bytes())
        np.testing.assert_array_equal(loaded.predict_run(test[0]), model.predict_run(test[0]))


# ---- no leakage from sessions the model was not given ----------------------------------------


def test_edgepcr_fit_on_prepared_subset_uses_only_those_sessions():
    runs = _dataset(7, "edge", n_sessions=4)
    train, test = _split(runs, "04")
    train_sessions = sorted({r.key.session_key for r in train})

    direct = EdgePCR().fit(train)
    cached = EdgePCR().fit(EdgePCR().prepare(runs), sessions=train_sessions)
    # Replace the held-out session's data by noise: the fit must not change at all.
    rng = np.random.default_rng(0)
    scrambled = train + [
        _run_from_signal(rng.standard_normal((300, 10)) * 5, rng.random(300), "04", r.key.run, 8)
        for r in test
    ]
    cached_scrambled = EdgePCR().fit(EdgePCR().prepare(scrambled), sessions=train_sessions)

    assert direct.training_sessions_ == cached.training_sessions_ == tuple(train_sessions)
    for other in (cached, cached_scrambled):
        np.testing.assert_allclose(other.weights_, direct.weights_, rtol=1e-6, atol=1e-10)
        assert other.intercept_ == pytest.approx(direct.intercept_, rel=1e-6)
        assert other.cv_scores_ == pytest.approx(direct.cv_scores_, rel=1e-6)


def test_loso_outer_folds_share_inner_fits_without_changing_results():
    runs = _dataset(14, "edge", n_sessions=4)
    samples = EdgePCR().prepare(runs)
    sessions = samples.sessions

    fits = {
        held: EdgePCR().fit(samples, sessions=[s for s in sessions if s != held])
        for held in sessions
    }

    # "train without sessions a and b" is computed once and read again: one hit per pair.
    assert samples.cache_hits == 4 * 3 // 2
    for held, fit in fits.items():
        fresh = EdgePCR(n_jobs=1).fit([r for r in runs if r.key.session_key != held])
        np.testing.assert_allclose(fit.weights_, fresh.weights_, rtol=1e-6, atol=1e-10)
        assert fit.cv_scores_ == pytest.approx(fresh.cv_scores_, rel=1e-6)
        assert held not in fit.training_sessions_


def test_window_ridge_standardises_with_training_windows_only():
    runs = _dataset(8, "activation", n_sessions=3)
    train, _ = _split(runs, "03")
    model = WindowRidge(window_s=2.0, summary="mean").fit(train)

    train_x = np.concatenate(
        [model.window_features(r, model.window_ends(r, training=True)) for r in train]
    )
    np.testing.assert_allclose(model.pipeline_[0].mean_, train_x.mean(0), rtol=1e-5, atol=1e-6)
    assert model.training_sessions_ == (("01", "01"), ("01", "02"))


# ---- window ridge internals --------------------------------------------------------------------


def test_windows_are_causal_and_start_at_the_first_kept_frame():
    series = np.arange(16, dtype=np.float32).reshape(8, 2)  # frame t = [2t, 2t + 1]
    kept = np.ones(8, dtype=bool)
    kept[:2] = False
    target = np.where(kept, np.linspace(0, 1, 8), np.nan)
    run = RunData(RunKey("01", "01", "rating", "1"), 1.0, series, kept, target, np.arange(8.0))
    model = WindowRidge(window_s=3.0, summary="flatten")  # L = 3 frames

    ends = model.window_ends(run, training=True)
    flat = model.window_features(run, ends)
    means = WindowRidge(window_s=3.0, summary="mean").window_features(run, ends)

    assert ends.tolist() == [4, 5, 6, 7]  # first window = frames 2, 3, 4
    # parcel-major: parcel 0 over frames 2..4, then parcel 1 over frames 2..4
    assert flat[0].tolist() == [4, 6, 8, 5, 7, 9]
    np.testing.assert_allclose(means[0], [6, 7])
    np.testing.assert_allclose(means[-1], [12, 13])


@pytest.mark.parametrize("n_per_group", [30, 3])  # more training rows than features, then fewer
def test_grouped_ridge_cv_equals_sklearn_pipeline_per_fold_and_alpha(n_per_group):
    rng = np.random.default_rng(9)
    n_rows = 4 * n_per_group
    x = (rng.standard_normal((n_rows, 12)) * rng.uniform(0.5, 3, 12) + 2).astype(np.float32)
    y = x[:, 0] - x[:, 3] + rng.standard_normal(n_rows)
    groups = np.repeat(np.arange(4), n_per_group)
    folds = list(GroupKFold(n_splits=4).split(x, y, groups))
    alphas = (0.1, 10.0, 1000.0)

    got = _grouped_ridge_predictions(x, y, folds, alphas)

    for (train, test), pred in zip(folds, got):
        for col, alpha in enumerate(alphas):
            ref = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x[train], y[train])
            np.testing.assert_allclose(pred[:, col], ref.predict(x[test]), rtol=1e-5, atol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------


def test_runs_with_different_parcel_counts_are_rejected():
    rng = np.random.default_rng(10)
    runs = [_make_run(rng, "01", "1", "edge"), _make_run(rng, "02", "1", "edge", n_parcels=7)]
    for model in (EdgePCR(), WindowRidge(window_s=2.0, summary="mean")):
        with pytest.raises(ValueError, match="parcels"):
            model.fit(runs)


def test_run_without_valid_targets_is_rejected():
    rng = np.random.default_rng(11)
    runs = [_make_run(rng, "01", "1", "edge"), _make_run(rng, "02", "1", "edge")]
    runs[1].target[:] = np.nan
    for model in (EdgePCR(), WindowRidge(window_s=2.0, summary="mean")):
        with pytest.raises(ValueError, match="sub-01_ses-02_task-rating_run-1.*no valid target"):
            model.fit(runs)


def test_predicting_a_run_with_another_parcellation_is_rejected():
    runs = _dataset(12, "edge", n_sessions=2)
    model = EdgePCR(inner_cv=False, max_components=3).fit(runs)
    other = _make_run(np.random.default_rng(0), "03", "1", "edge", n_parcels=9)
    with pytest.raises(ValueError, match="9 parcels"):
        model.predict_run(other)


def test_fit_predict_refuses_a_test_session_that_is_also_trained_on():
    runs = _dataset(13, "edge", n_sessions=2)
    with pytest.raises(ValueError, match="both the training and the test"):
        fit_predict(EdgePCR(), runs, runs[:1])
