"""The stacked decoder (``model=stack``: painnet/models/stacking.py, painnet/experiments/stack.py).

Specifications:
- each member enters as its run mean and its within-run deviation; weights are non-negative and
  fitted on binned out-of-sample predictions, so a member's run level that anti-correlates with
  pain (the leave-one-session-out artifact) gets weight 0 while its within-run shape is kept;
- a member's within-run part is weighted on its session's scale (``within_scale=session``), so
  the weights fitted on inner fits' predictions mean the same on an outer fit that predicts with
  another amplitude, and a session's combined prediction does not depend on its table-mates;
- when no feature generalises, the stack falls back to the best member instead of a constant;
- members must have predicted the same frames;
- with several anchors, those whose run level correlates positively with the inner binned
  ratings are averaged (``anchor_weights=screened``, ``model=stack``'s default) and the others
  dropped; ``fitted`` mixes them by weights on the simplex fitted on the inner bins; ``equal``
  averages all, as combiners pickled before the option existed do;
- ``within_weights=correlation`` (the default) mixes the within-run parts in proportion to their
  positive inner r with one fitted scale; ``fitted`` gives each a free weight, as combiners
  pickled before the option existed do;
- the inner folds cover the outer training + validation sessions, and no data view of an inner
  fit holds a run of the outer test session; the members in ``model.inner_loso`` are predicted
  one held-out training session at a time, the others through ``model.inner_folds`` groups;
- end to end (the CLI's code path): a stack job writes its members, its weights and its inner
  predictions, and its held-out prediction is exactly the weighted sum of its members';
- real-time decoding refuses a stack with a message (its run means need the whole run).
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from painnet.evaluation.bins import bin_predictions
from painnet.evaluation.table import COLUMNS
from painnet.experiments.decoder import load_decoder
from painnet.experiments.single import build_datamodule, run_single
from painnet.experiments.stack import inner_groups, inner_views
from painnet.models.stacking import StackCombiner

FAST = ("logger=none", "trainer.enable_progress_bar=false", "eval.n_boot=100", "eval.plots=false")


def _tables(seed: int = 0, n_sessions: int = 6, n_runs: int = 2, n_frames: int = 300):
    """Ratings = session offset + within-run wave. Member ``edge`` sees the offset (plus noise
    inside the run); member ``deep`` sees the wave but predicts *minus* the offset as its run
    level, as a model blind to session-level pain does under LOSO."""
    rng = np.random.default_rng(seed)
    rows = {"edge": [], "deep": []}
    for s in range(n_sessions):
        offset = rng.normal(0, 1.0)
        for r in range(n_runs):
            t = np.arange(n_frames, dtype=float)
            wave = np.sin(2 * np.pi * t / 120 + rng.uniform(0, 6)) + 0.3 * rng.standard_normal()
            rating = offset + wave
            base = pd.DataFrame(
                {
                    "subject": "01",
                    "session": f"{s:02d}",
                    "run": f"{r}",
                    "frame": t.astype(int),
                    "time_s": t,
                    "rating": rating,
                    "split": "x",
                    "run_duration_s": float(n_frames),
                }
            )
            # each member's run level has its own error, so the two are not collinear
            edge = offset + rng.normal(0, 0.3) + 0.3 * rng.standard_normal(n_frames)
            shape = wave - wave.mean()
            deep = -0.8 * offset + rng.normal(0, 0.3) + shape + 0.3 * rng.standard_normal(n_frames)
            rows["edge"].append(base.assign(prediction=edge, model="edge")[COLUMNS])
            rows["deep"].append(base.assign(prediction=deep, model="deep")[COLUMNS])
    return {m: pd.concat(parts, ignore_index=True) for m, parts in rows.items()}


def _pooled_r(table: pd.DataFrame) -> float:
    return float(np.corrcoef(table["rating"], table["prediction"])[0, 1])


def test_anti_correlated_run_level_gets_zero_weight_and_within_run_shape_is_kept():
    fitted = StackCombiner().fit(_tables(seed=0))
    w = fitted.report_["weights"]
    assert w["deep:run"] < 0.05
    assert w["deep:within"] > 0.5
    assert w["edge:run"] > 0.5
    fresh = _tables(seed=1)  # new sessions: the combination generalises
    combined = fitted.combine(fresh)
    assert _pooled_r(combined) > max(_pooled_r(t) for t in fresh.values()) + 0.1


def test_convex_run_level_mixes_the_members_run_means_without_an_intercept():
    """The default: no fitted intercept (under LOSO it is the anti-correlated training mean);
    the run-mean weights sum to 1 so the stack's run level stays on its members' scale."""
    fitted = StackCombiner().fit(_tables(seed=0))
    w = fitted.report_["weights"]
    assert fitted.intercept_ == 0.0
    assert w["edge:run"] + w["deep:run"] == pytest.approx(1.0)
    assert w["edge:run"] > 0.9


def test_anchor_keeps_the_anchor_run_level_and_weighs_every_within_run_shape():
    fitted = StackCombiner(run_level="anchor", anchor="edge").fit(_tables(seed=0))
    w = fitted.report_["weights"]
    assert (w["edge:run"], w["deep:run"], fitted.intercept_) == (1.0, 0.0, 0.0)
    assert w["deep:within"] > 0.5
    fresh = _tables(seed=1)
    assert _pooled_r(fitted.combine(fresh)) > max(_pooled_r(t) for t in fresh.values()) + 0.1


def _scaled(tables: dict[str, pd.DataFrame], member: str, factor: float):
    table = tables[member]
    return {**tables, member: table.assign(prediction=factor * table["prediction"])}


def test_session_scale_makes_the_weights_blind_to_a_members_output_amplitude():
    """The inner fits of a network and its outer fit predict on different scales; on the
    session scale the outer fit's 3x larger within-run swings get the same share, not 3x."""
    fresh = _tables(seed=1)
    louder = _scaled(fresh, "deep", 3.0)
    by_session = StackCombiner(run_level="anchor", anchor="edge").fit(_tables(seed=0))
    np.testing.assert_allclose(
        by_session.combine(louder)["prediction"], by_session.combine(fresh)["prediction"]
    )
    as_predicted = StackCombiner(run_level="anchor", anchor="edge", within_scale="none")
    as_predicted.fit(_tables(seed=0))
    shift = as_predicted.combine(louder)["prediction"] - as_predicted.combine(fresh)["prediction"]
    assert np.abs(shift).max() > 0.5


def test_a_sessions_combined_prediction_does_not_depend_on_its_table_mates():
    fitted = StackCombiner(run_level="anchor", anchor="edge").fit(_tables(seed=0))
    fresh = _tables(seed=1)
    alone = fitted.combine({m: t[t["session"] == "02"] for m, t in fresh.items()})
    together = fitted.combine(fresh)
    together = together[together["session"] == "02"].reset_index(drop=True)
    np.testing.assert_allclose(alone["prediction"], together["prediction"])


def test_residual_keeps_the_whole_anchor_and_adds_what_it_leaves():
    """``residual``: the anchor's prediction with weight 1 on both parts; another member's
    within-run shape joins only by what it explains beyond the anchor."""
    tables = _tables(seed=0)
    fitted = StackCombiner(run_level="residual", anchor="edge").fit(tables)
    w = fitted.report_["weights"]
    assert (w["edge:run"], w["edge:within"], w["deep:run"], fitted.intercept_) == (1, 1, 0, 0)
    assert w["deep:within"] > 0.5
    fresh = _tables(seed=1)
    assert _pooled_r(fitted.combine(fresh)) > max(_pooled_r(t) for t in fresh.values()) + 0.1


def test_residual_is_no_worse_than_the_anchor_when_the_other_member_is_noise():
    def noisy(seed: int) -> dict[str, pd.DataFrame]:
        tables = _tables(seed=seed)
        noise = np.random.default_rng(seed + 10).standard_normal(len(tables["deep"]))
        return {**tables, "deep": tables["deep"].assign(prediction=noise)}

    fitted = StackCombiner(run_level="residual", anchor="edge").fit(noisy(0))
    fresh = noisy(1)
    binned = {
        name: bin_predictions(table, "1min")
        for name, table in {"stack": fitted.combine(fresh), "edge": fresh["edge"]}.items()
    }
    r = {name: _pooled_r(table) for name, table in binned.items()}
    assert r["stack"] > r["edge"] - 0.02


def test_several_anchors_average_their_run_levels_with_equal_weights():
    fitted = StackCombiner(run_level="anchor", anchor=["edge", "deep"], anchor_weights="equal")
    w = fitted.fit(_tables(seed=0)).report_["weights"]
    assert (w["edge:run"], w["deep:run"], fitted.intercept_) == (0.5, 0.5, 0.0)
    assert w["deep:within"] > 0.5


def test_fitted_anchor_weights_drop_an_anchor_whose_run_level_anti_correlates():
    # "deep"'s run level is -0.8 x the session offset: a mean of the two anchors takes half of it
    tables, fresh = _tables(seed=0), _tables(seed=1)
    fitted = StackCombiner(run_level="anchor", anchor=["edge", "deep"]).fit(tables)
    w = fitted.report_["weights"]
    assert w["edge:run"] > 0.9 and w["deep:run"] < 0.1
    assert w["edge:run"] + w["deep:run"] == pytest.approx(1.0)
    assert fitted.intercept_ == 0.0 and w["deep:within"] > 0.5  # its shape is still read
    equal = StackCombiner(run_level="anchor", anchor=["edge", "deep"], anchor_weights="equal")
    r = {
        name: _pooled_r(bin_predictions(c.combine(fresh), "1min"))
        for name, c in {"fitted": fitted, "equal": equal.fit(tables)}.items()
    }
    assert r["fitted"] > r["equal"] + 0.1


def _with_copy(tables: dict, name: str, of: str, seed: int, sd: float = 0.3) -> dict:
    """``tables`` plus member ``name``: member ``of``'s prediction plus independent noise."""
    table = tables[of]
    noise = np.random.default_rng(seed).normal(0.0, sd, len(table))
    return {**tables, name: table.assign(prediction=table["prediction"] + noise)}


def test_screened_anchors_drop_one_whose_run_level_anti_correlates_and_average_the_rest():
    # "deep"'s run level is -0.8 x the session offset; "edge2" reads the offset as "edge" does
    tables = _with_copy(_tables(seed=0), "edge2", of="edge", seed=5)
    fitted = StackCombiner(
        run_level="anchor", anchor=["edge", "edge2", "deep"], anchor_weights="screened"
    ).fit(tables)
    report = fitted.report_
    assert report["anchors_kept"] == ["edge", "edge2"]
    assert report["anchor_run_r"]["deep"] < 0 < report["anchor_run_r"]["edge"]
    w = report["weights"]
    assert (w["edge:run"], w["edge2:run"], w["deep:run"]) == (0.5, 0.5, 0.0)
    assert fitted.intercept_ == 0.0 and w["deep:within"] > 0  # its shape is still read


def test_screened_anchors_keep_the_best_when_none_correlates_positively():
    tables = _tables(seed=0)
    flipped = {"deep": tables["deep"], "deep2": _with_copy(tables, "x", of="deep", seed=2)["x"]}
    fitted = StackCombiner(
        run_level="anchor", anchor=["deep", "deep2"], anchor_weights="screened"
    ).fit(flipped)
    r = fitted.report_["anchor_run_r"]
    assert max(r.values()) < 0
    assert fitted.report_["anchors_kept"] == [max(r, key=r.get)]


def _run_means(table: pd.DataFrame) -> pd.Series:
    return table.groupby(["session", "run"])["prediction"].mean()


def test_inner_mean_origin_measures_the_run_level_from_its_inner_average():
    """Every fold's run level gets the same origin: the anchors' run level minus its mean over
    the inner bins (as predicted, it sits on the training sessions' mean rating, which under
    leave-one-session-out anti-correlates with the held-out session's)."""
    tables = _tables(seed=0)
    kwargs = dict(run_level="anchor", anchor="edge", anchor_weights="screened")
    as_predicted = StackCombiner(**kwargs, within_weights="correlation").fit(tables)
    centred = StackCombiner(
        **kwargs, within_weights="correlation", run_level_origin="inner_mean"
    ).fit(tables)
    Xb, _ = centred._binned(*centred.features(tables)[:2])
    inner_mean = Xb[:, centred.features_.index("edge:run")].mean()
    assert centred.report_["weights"]["edge:run"] == 1.0
    assert centred.intercept_ == pytest.approx(-inner_mean)
    fresh = _tables(seed=1)
    shift = _run_means(as_predicted.combine(fresh)) - _run_means(centred.combine(fresh))
    # the same run level, moved by one constant (within-run shapes differ only in scale)
    assert np.allclose(shift, inner_mean, atol=0.05 * abs(inner_mean) + 1e-9)


def test_with_no_anchor_positive_and_fallback_none_the_stack_has_no_run_level():
    tables = _tables(seed=0)
    flipped = {"deep": tables["deep"], "deep2": _with_copy(tables, "x", of="deep", seed=2)["x"]}
    fitted = StackCombiner(
        run_level="anchor",
        anchor=["deep", "deep2"],
        anchor_weights="screened",
        within_weights="correlation",
        run_level_origin="inner_mean",
        anchor_fallback="none",
    ).fit(flipped)
    report = fitted.report_
    assert max(report["anchor_run_r"].values()) < 0 and report["anchors_kept"] == []
    assert report["weights"]["deep:run"] == report["weights"]["deep2:run"] == 0.0
    assert fitted.intercept_ == 0.0 and report["weights"]["deep:within"] > 0
    # every held-out run is predicted around the same origin: only within-run shapes remain
    fresh = _tables(seed=1)
    fresh = {"deep": fresh["deep"], "deep2": _with_copy(fresh, "x", of="deep", seed=3)["x"]}
    assert np.allclose(_run_means(fitted.combine(fresh)), 0.0, atol=1e-9)


def test_an_origin_or_fallback_that_does_not_fit_the_run_level_mode_is_named():
    with pytest.raises(ValueError, match="model.run_level_origin='zero'"):
        StackCombiner(run_level="anchor", anchor="edge", run_level_origin="zero")
    with pytest.raises(ValueError, match="run_level_origin=inner_mean applies to"):
        StackCombiner(run_level="convex", run_level_origin="inner_mean")
    with pytest.raises(ValueError, match="model.anchor_fallback='first'"):
        StackCombiner(run_level="anchor", anchor="edge", anchor_fallback="first")
    with pytest.raises(ValueError, match="anchor_fallback=none needs"):
        StackCombiner(run_level="anchor", anchor="edge", anchor_fallback="none")


def test_correlation_within_weights_are_shares_of_the_members_inner_r():
    # "anti" sees the wave upside down: its within-run part anti-correlates with pain
    tables = _with_copy(_tables(seed=0), "noisy_deep", of="deep", seed=7, sd=1.5)
    anti = tables["deep"].assign(prediction=-tables["deep"]["prediction"])
    tables = {**tables, "anti": anti}
    fitted = StackCombiner(
        run_level="anchor", anchor="edge", anchor_weights="screened", within_weights="correlation"
    ).fit(tables)
    w, r = fitted.report_["weights"], fitted.report_["within_r"]
    assert r["anti:within"] < 0 and w["anti:within"] == 0.0
    assert r["deep:within"] > r["noisy_deep:within"] > 0
    # one fitted scale: the weights keep the ratio of the members' inner r
    assert w["deep:within"] / w["noisy_deep:within"] == pytest.approx(
        r["deep:within"] / r["noisy_deep:within"]
    )
    assert w["deep:within"] > w["noisy_deep:within"] > 0


def test_correlation_within_weights_do_not_apply_to_freely_fitted_modes():
    with pytest.raises(ValueError, match="within_weights=correlation does not apply"):
        StackCombiner(run_level="split", within_weights="correlation")


@pytest.mark.parametrize(
    ("option", "old_value", "settings"),
    [
        # within-run parts were weighted as predicted before within_scale existed
        ("within_scale", "none", {}),
        # several anchors were averaged before anchor_weights existed
        ("anchor_weights", "equal", {"run_level": "anchor", "anchor": ["edge", "deep"]}),
        # every within-run part had a free weight before within_weights existed
        ("within_weights", "fitted", {"run_level": "anchor", "anchor": "edge"}),
        # the run level was used as predicted before run_level_origin existed
        ("run_level_origin", "predicted", {"run_level": "anchor", "anchor": "edge"}),
        # and the best anchor was kept when none correlated positively
        ("anchor_fallback", "best", {"run_level": "anchor", "anchor": ["edge", "deep"]}),
    ],
)
def test_a_combiner_pickled_before_an_option_existed_combines_as_it_did(
    option, old_value, settings
):
    fitted = StackCombiner(**settings, **{option: old_value}).fit(_tables(seed=0))
    old = pickle.loads(pickle.dumps(fitted))
    del old.__dict__[option]  # as unpickled from a version without the option
    assert getattr(old, option) == old_value
    fresh = _tables(seed=1)
    pd.testing.assert_frame_equal(old.combine(fresh), fitted.combine(fresh))


def test_a_stack_job_names_an_anchor_that_is_no_member_before_fitting(make_cfg):
    from painnet.experiments.decoder import make_decoder

    cfg = make_cfg("data=tiny", "model=stack", "model.anchor=[edge_pcr,nope]", *FAST)
    with pytest.raises(ValueError, match="model.anchor='nope' is not a member"):
        make_decoder(cfg, "stack").validate()


def test_residual_takes_one_anchor():
    with pytest.raises(ValueError, match="residual takes one model.anchor"):
        StackCombiner(run_level="residual", anchor=["edge", "deep"])


def test_an_anchor_that_is_no_member_is_named():
    with pytest.raises(ValueError, match="model.anchor"):
        StackCombiner(run_level="anchor")
    with pytest.raises(ValueError, match="model.anchor='nope'"):
        StackCombiner(run_level="anchor", anchor="nope").fit(_tables())


def test_split_mode_also_zeroes_an_anti_correlated_run_level():
    fitted = StackCombiner(run_level="split").fit(_tables(seed=0))
    assert fitted.report_["weights"]["deep:run"] == 0.0
    assert fitted.report_["weights"]["deep:within"] > 0.5


def test_pooled_mode_gives_one_weight_per_member():
    fitted = StackCombiner(run_level="pooled").fit(_tables())
    assert set(fitted.report_["weights"]) == {"edge", "deep"}


def test_no_generalising_feature_falls_back_to_the_best_member():
    tables = _tables()
    noise = np.random.default_rng(3).standard_normal(len(tables["edge"]))
    useless = {"bad": tables["edge"].assign(prediction=-tables["edge"]["rating"] + 0 * noise)}
    useless["worse"] = tables["deep"].assign(prediction=-2 * tables["deep"]["rating"])
    fitted = StackCombiner(run_level="split").fit(useless)
    assert fitted.report_["fallback_member"] in {"bad", "worse"}
    assert np.count_nonzero(fitted.weights_) == 2  # that member's run + within parts


def test_members_must_share_frames():
    tables = _tables()
    tables["deep"] = tables["deep"].iloc[10:]
    with pytest.raises(ValueError, match="other frames"):
        StackCombiner().fit(tables)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="model.run_level"):
        StackCombiner(run_level="nope")
    with pytest.raises(ValueError, match="model.bin_size"):
        StackCombiner(bin_size="session")
    with pytest.raises(ValueError, match="model.within_scale='run'"):
        StackCombiner(within_scale="run")
    with pytest.raises(ValueError, match="model.anchor_weights='best'"):
        StackCombiner(anchor_weights="best")
    with pytest.raises(ValueError, match="model.within_weights='free'"):
        StackCombiner(within_weights="free")


def test_inner_groups_are_contiguous_and_cover_every_session():
    sessions = [f"{i}" for i in range(7)]
    groups = inner_groups(sessions, 3)
    assert [s for g in groups for s in g] == sessions
    assert sorted(len(g) for g in groups) == [2, 2, 3]


def test_no_inner_view_holds_the_outer_test_session(make_cfg):
    cfg = make_cfg("data=tiny", "+data.simulate.n_sessions=5", "split.fold=2", *FAST)
    dm = build_datamodule(cfg)
    test = set(dm.split.test)
    views = inner_views(dm, 2, 1, 0)
    covered = set()
    for view in views:
        held = {r.key.session_key for r in view.runs}
        assert not held & test
        assert set(view.split.test) | set(view.split.train) | set(view.split.val) == held
        covered |= set(view.split.test)
    assert covered == set(dm.split.train + dm.split.val)


def test_too_few_sessions_to_cut_into_inner_folds_is_an_error_saying_how_many_are_needed(
    make_cfg,
):
    cfg = make_cfg("data=tiny", "split.fold=0", *FAST)  # 3 sessions: 2 to cut
    dm = build_datamodule(cfg)
    for n_folds in (2, 3):
        with pytest.raises(ValueError, match=r"too few to stack on: .*\(3 sessions at least\)"):
            inner_views(dm, n_folds, 1, 0)


def test_inner_folds_that_leave_too_few_sessions_is_an_error_saying_to_raise_the_key(make_cfg):
    cfg = make_cfg("data=tiny", "+data.simulate.n_sessions=4", "split.fold=0", *FAST)
    dm = build_datamodule(cfg)  # 3 sessions to cut: 2 inner folds hold out 2 and 1
    with pytest.raises(ValueError, match=r"raise model.inner_folds \(now 2, at most 3\)"):
        inner_views(dm, 2, 1, 0)
    assert len(inner_views(dm, 3, 1, 0)) == 3


def test_a_stack_job_predicts_the_weighted_sum_of_its_members(make_cfg, tmp_path):
    out = tmp_path / "stack"
    cfg = make_cfg(
        "data=tiny",
        "+data.simulate.n_sessions=5",
        "model=stack",
        "model.inner_folds=2",
        "model.n_jobs=1",
        "trainer.max_epochs=1",
        *FAST,
        output_dir=out,
    )
    run_single(cfg, out)
    report = json.loads((out / "stack.json").read_text())
    assert report["members"] == ["edge_pcr", "ridge", "cofluct", "convattn"]
    assert all(w >= 0 for w in report["weights"].values())
    training = ["02", "03", "04", "05"]  # fold 0 holds out session 01
    assert len(report["inner_folds"]["groups"]) == 2  # model.inner_folds, for convattn
    loso = report["inner_folds"]["loso"]  # model.inner_loso: edge_pcr, ridge, cofluct
    assert [[key[-1] for key in group] for group in loso] == [[s] for s in training]
    inner = pd.read_csv(out / "stack_inner_predictions.csv", dtype={"session": str})
    assert sorted(set(inner["session"])) == training
    fits_per_member = inner.groupby("model")["split"].nunique().to_dict()
    assert fits_per_member == {"convattn": 2, "edge_pcr": 4, "ridge": 4, "cofluct": 4}
    assert (out / "members" / "convattn" / "checkpoints" / "best.ckpt").is_file()
    assert not (out / "stack_inner").exists()  # inner-fold models are not kept

    decoder = load_decoder(out)
    dm = build_datamodule(cfg)
    members = {m: d.predict(dm) for m, d in decoder.members.items()}
    expected = decoder.combiner.combine(members)
    written = pd.read_csv(out / "predictions.csv", dtype={"session": str, "run": str})
    merged = written.merge(expected, on=["session", "run", "frame"], suffixes=("", "_sum"))
    assert len(merged) == len(written)
    np.testing.assert_allclose(merged["prediction"], merged["prediction_sum"], atol=1e-5)
    for m in report["members"]:  # each member's own held-out table is kept for audits
        own = pd.read_csv(out / "members" / m / "member_predictions.csv")
        assert len(own) == len(written)

    from painnet.realtime.model import load_trained

    with pytest.raises(ValueError, match="is a stack"):  # run means need the whole run
        load_trained(out, allow_standard=True)


def test_parallel_member_fits_and_several_devices_are_refused(make_cfg):
    from painnet.experiments.decoder import make_decoder

    cfg = make_cfg("data=tiny", "model=stack", "trainer=ddp", "trainer.devices=2", *FAST)
    with pytest.raises(ValueError, match="model.n_jobs=2 with trainer.devices=2"):
        make_decoder(cfg, "stack").validate()
    every_core = make_cfg("data=tiny", "model=stack", "model.n_jobs=-1", "trainer=ddp", *FAST)
    with pytest.raises(ValueError, match="model.n_jobs=-1 with trainer.devices=2"):
        make_decoder(every_core, "stack").validate()


def test_n_jobs_minus_one_every_core_is_accepted_and_zero_is_refused(make_cfg):
    from painnet.experiments.decoder import make_decoder

    make_decoder(make_cfg("data=tiny", "model=stack", "model.n_jobs=-1", *FAST), "s").validate()
    with pytest.raises(ValueError, match=r"model.n_jobs=0: must be >= 1, or -1"):
        make_decoder(make_cfg("data=tiny", "model=stack", "model.n_jobs=0", *FAST), "s").validate()


@pytest.mark.slow  # two CLI loops (~1 min)
def test_the_cli_loop_and_the_benchmark_rows_of_a_stack(tmp_path):
    """`python -m painnet.train experiment=within_subject model=stack` runs every fold; the
    benchmark's rows read off its jobs put its edge_pcr member exactly on the edge_pcr loop."""
    import os
    import subprocess
    import sys

    from benchmarks.stack_rows import write_derived

    run_dir = tmp_path / "loop"
    env = {**os.environ, "PAINNET_DATA_DIR": str(tmp_path / "data"), "WANDB_MODE": "disabled"}
    for model in ("stack", "edge_pcr"):
        proc = subprocess.run(
            [sys.executable, "-m", "painnet.train", "experiment=within_subject", "data=tiny",
             "+data.simulate.n_sessions=5", f"model={model}", "study.subjects=[01]",
             "study.folds=[0,1]", "trainer.max_epochs=1", "logger=none", "eval.n_boot=100",
             "eval.plots=false", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}",
             *(["model.inner_folds=2"] if model == "stack" else [])],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        if model == "stack":  # no edge_pcr loop yet: the rows are scored, nothing is paired
            assert write_derived(run_dir, {}, n_boot=100)
            assert (run_dir / "aggregate_derived" / "within_subject.csv").is_file()
            assert not (run_dir / "aggregate_derived" / "comparison.csv").exists()
    within = pd.read_csv(run_dir / "aggregate" / "within_subject.csv", dtype={"model": str})
    assert set(within["model"]) == {"stack", "edge_pcr"}
    subsets = {"stack_edge_convattn": {"members": ["edge_pcr", "convattn"]}}
    assert write_derived(run_dir, subsets, n_boot=100)
    derived = pd.read_csv(run_dir / "aggregate_derived" / "within_subject.csv")
    assert set(derived["model"]) == {
        "edge_pcr@stack",
        "ridge@stack",
        "cofluct@stack",
        "convattn@stack",
        "stack_edge_convattn",  # the job's anchors among these members: edge_pcr
    }
    edge = within.set_index("model").loc["edge_pcr", "r_1min"]
    member = derived.set_index("model").loc["edge_pcr@stack", "r_1min"]
    assert member == pytest.approx(edge, abs=1e-9)


def test_inner_loso_naming_no_member_is_refused_before_fitting(make_cfg):
    from painnet.experiments.decoder import make_decoder

    cfg = make_cfg("data=tiny", "model=stack", "model.inner_loso=[edge_pcr,lasso]", *FAST)
    with pytest.raises(ValueError, match=r"model.inner_loso names \['lasso'\], which are not"):
        make_decoder(cfg, "s").validate()


@pytest.mark.slow  # 3 stack jobs, each fitting 4 members on inner folds (~2 min)
def test_the_default_stack_decodes_cofluctuation_only_pain_above_chance(
    make_cfg, data_dir, tmp_path
):
    """The README's default decoder (``model=stack`` as configured) on simulated data with pain
    only in co-fluctuation: the pooled held-out r over 3 LOSO folds of participant 01 beats a
    chance bar calibrated from the ratings themselves (as tests/test_learning.py does)."""
    from tests.test_learning import held_out_r_on_tiny_cofluct

    r, bar = held_out_r_on_tiny_cofluct(
        make_cfg,
        data_dir,
        tmp_path,
        "model=stack",
        "model.inner_folds=2",
        "trainer.max_epochs=2",
        n_sessions=5,  # a stack cuts the training sessions into inner folds: 3 are too few
    )
    assert r > bar, f"pooled held-out r {r:.2f} vs chance bar {bar:.2f}"
