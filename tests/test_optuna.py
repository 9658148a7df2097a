"""Optuna search (painnet.search): inner-validation objective, SQLite resume, pruning."""

from __future__ import annotations

import optuna
import pytest
from omegaconf import OmegaConf, open_dict

from painnet.search import apply_params, check_search_config, run_search

State = optuna.trial.TrialState


def search_cfg(make_cfg, tmp_path, *overrides):
    return make_cfg(
        "hparams_search=convattn_optuna",
        "data=tiny",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"search.dir={tmp_path / 'search'}",
        *overrides,
        config_name="search",
    )


@pytest.mark.slow
def test_three_trials_then_resume_to_five(make_cfg, tmp_path, tiny_root):
    cfg = search_cfg(make_cfg, tmp_path, "search.n_trials=3")
    assert cfg.search.monitor == "val/r_1min"
    assert str(cfg.search.storage).endswith("search/optuna.db")
    study = run_search(cfg)
    first = [(t.number, t.params, t.state) for t in study.trials]
    assert len(first) == 3 and all(s in (State.COMPLETE, State.PRUNED) for *_, s in first)

    resumed = run_search(search_cfg(make_cfg, tmp_path, "search.n_trials=5"))
    trials = resumed.trials
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert [(t.number, t.params, t.state) for t in trials[:3]] == first  # loaded, not rerun
    for t in trials:
        assert t.state in (State.COMPLETE, State.PRUNED)
        assert set(t.params) == set(cfg.search.params)
        assert all(-1.0 <= v <= 1.0 for v in t.intermediate_values.values())
    complete = [t for t in trials if t.state == State.COMPLETE]
    # The objective is the best validation value reported during training.
    assert all(t.value == max(t.intermediate_values.values()) for t in complete)
    best = OmegaConf.load(tmp_path / "search" / "best.yaml")
    assert best.trial == resumed.best_trial.number and best.params == resumed.best_params
    # Trials train and validate only: no prediction of the held-out test session.
    assert not list((tmp_path / "search").rglob("predictions.csv"))

    again = run_search(search_cfg(make_cfg, tmp_path, "search.n_trials=5"))
    assert len(again.trials) == 5  # nothing left to do


@pytest.mark.slow
def test_a_trial_below_the_pruner_threshold_stops_between_epochs(make_cfg, tmp_path, tiny_root):
    cfg = search_cfg(
        make_cfg,
        tmp_path,
        "search.n_trials=1",
        "trainer.max_epochs=4",
        "~callbacks.early_stopping",
        # r can never reach 2: the pruner stops the trial once warm-up (1 epoch) is over.
        "~search.pruner",
        "+search.pruner={_target_: optuna.pruners.ThresholdPruner, lower: 2.0, n_warmup_steps: 1}",
    )
    (trial,) = run_search(cfg).trials
    assert trial.state == State.PRUNED
    assert sorted(trial.intermediate_values) == [0, 1]  # epochs 3 and 4 never ran


def test_bad_search_configs_are_refused_before_training(make_cfg, tmp_path):
    cfg = search_cfg(make_cfg, tmp_path, "search.monitor=test/r_1min")
    with pytest.raises(ValueError, match="never a test-session"):
        check_search_config(cfg)
    cfg = search_cfg(make_cfg, tmp_path)
    with open_dict(cfg):
        cfg.search.params["model.net.no_such_key"] = {"type": "int", "low": 1, "high": 2}
    with pytest.raises(KeyError, match="model.net.no_such_key"):
        check_search_config(cfg)
    cfg = search_cfg(make_cfg, tmp_path, "model=ridge")
    with pytest.raises(ValueError, match="not one"):
        check_search_config(cfg)
    with pytest.raises(KeyError, match="model.optimizer.nope"):
        apply_params(cfg, {"model.optimizer.nope": 1.0})
