"""The hybrid deep decoder (painnet/models/hybrid.py) and binned validation selection.

Specifications:
- the quadratic pathway *is* the study's edge model when its weights come from that model's W
  (full rank, last frame), and a low rank keeps the largest eigenvalues;
- the untrained hybrid (conv pathway at zero output) predicts exactly what EdgePCR predicts;
- training logs ``val/r_1min`` (pooled r of 1-min bins of the validation session, as the test is
  scored), and the default checkpointing and early stopping select on it for every deep model;
  initial weights that beat every epoch are kept;
- a validation set that can never give a finite ``val/r_1min`` (fewer than 3 one-minute bins)
  is an error before training when that metric is monitored, and only logs NaN when it is not;
- on a co-fluctuation-only simulation the hybrid decodes held-out sessions above chance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from painnet.callbacks import BinnedValidation, binned_r
from painnet.data.windows import window_ends
from painnet.experiments.decoder import make_decoder
from painnet.experiments.single import build_datamodule
from painnet.models.classical import EdgePCR, WindowRidge, quadratic_predict
from painnet.models.hybrid import HybridDecoder, LinearPathway, QuadraticPathway

FAST = (
    "logger=none",
    "trainer.enable_progress_bar=false",
    "eval.n_boot=100",
    "eval.plots=false",
)


def _symmetric(p: int, rank_pos: int, rank_neg: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((p, rank_pos))
    b = rng.standard_normal((p, rank_neg))
    return a @ a.T - b @ b.T


def test_quadratic_pathway_equals_quadratic_form_of_the_last_frame():
    p, length = 7, 5
    w = _symmetric(p, 3, 2)
    path = QuadraticPathway(p, rank=None, n_last=1).double()
    dropped = path.set_from_matrix(w, intercept=0.3)
    assert dropped == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(path.matrix(), w, atol=1e-10)
    x = torch.randn(4, p, length, dtype=torch.float64)
    expected = quadratic_predict(x[:, :, -1].numpy(), w, 0.3)
    np.testing.assert_allclose(path(x).detach().numpy(), expected, rtol=1e-9, atol=1e-9)


def test_low_rank_keeps_the_largest_eigenvalues_and_reports_what_it_drops():
    p = 6
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((p, p)))
    lam = np.array([5.0, 2.0, 0.5, -4.0, -1.0, 0.0])
    w = (q * lam) @ q.T
    path = QuadraticPathway(p, rank=1).double()
    dropped = path.set_from_matrix(w, 0.0)
    kept = (q[:, [0]] * 5.0) @ q[:, [0]].T - (q[:, [3]] * 4.0) @ q[:, [3]].T
    np.testing.assert_allclose(path.matrix(), kept, atol=1e-10)
    assert dropped == pytest.approx((2.0**2 + 0.5**2 + 1.0**2) / (lam**2).sum())


def test_quadratic_pathway_averages_the_last_k_frames():
    p = 4
    w = _symmetric(p, 2, 2, seed=3)
    path = QuadraticPathway(p, n_last=3).double()
    path.set_from_matrix(w, -0.1)
    x = torch.randn(2, p, 6, dtype=torch.float64)
    per_frame = np.stack([quadratic_predict(x[:, :, t].numpy(), w, -0.1) for t in (3, 4, 5)], 1)
    np.testing.assert_allclose(path(x).detach().numpy(), per_frame.mean(1), atol=1e-9)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rank"):
        QuadraticPathway(4, rank=5)
    with pytest.raises(ValueError, match="symmetric"):
        QuadraticPathway(3).set_from_matrix(np.arange(9.0).reshape(3, 3), 0.0)
    with pytest.raises(ValueError, match="init_sessions"):
        HybridDecoder(4, 5, init_sessions="test")
    with pytest.raises(ValueError, match="fitted_lr_scale"):
        HybridDecoder(4, 5, init_sessions="none", fitted_lr_scale=0.0)


def test_untrained_hybrid_reproduces_the_fitted_edge_model(make_cfg, tiny_root):
    """fit_init fits EdgePCR on the training sessions; before training the hybrid's predictions
    on held-out windows are that model's frame predictions (float32 rounding aside)."""
    cfg = make_cfg("data=tiny", "model=hybrid", "model.net.linear=false", "split.fold=0", *FAST)
    dm = build_datamodule(cfg)
    net = make_decoder(cfg, "hybrid").build_task(dm.n_parcels, dm.window_frames).net
    net.fit_init(dm)
    assert set(map(tuple, net.init_report["sessions"])) == set(dm.split.train + dm.split.val)

    edge = EdgePCR(**OmegaConf.to_container(cfg.model.net.edge, resolve=True))
    edge.fit([dm.runs[i] for i in dm.runs_in("train") + dm.runs_in("val")])
    net.eval()
    for i in dm.runs_in("test"):
        run = dm.runs[i]
        ends = window_ends(run, dm.window_frames, targets_only=False)
        x = np.stack([run.series[e - dm.window_frames + 1 : e + 1].T for e in ends])
        with torch.no_grad():
            got = net(torch.as_tensor(x, dtype=torch.float32)).numpy()
        expected = edge.predict_run(run)[ends]
        kept = run.kept[ends]  # EdgePCR leaves censored frames NaN
        assert kept.sum() > 0.8 * ends.size
        np.testing.assert_allclose(got[kept], expected[kept], rtol=1e-4, atol=1e-5)


def test_linear_pathway_reproduces_a_window_mean_ridge(make_cfg, tiny_root):
    """The linear pathway loaded from a fitted WindowRidge(summary='mean') predicts what it
    predicts; fit_init fits that ridge on the edge model's residual of the training runs."""
    cfg = make_cfg("data=tiny", "model=hybrid", "model.net.linear=true", "split.fold=0", *FAST)
    dm = build_datamodule(cfg)
    net = make_decoder(cfg, "hybrid").build_task(dm.n_parcels, dm.window_frames).net
    train = [dm.runs[i] for i in dm.runs_in("train")]
    ridge = WindowRidge(window_s=dm.window_frames * dm.tr, summary="mean").fit(train)
    path = LinearPathway(dm.n_parcels, dm.window_frames)
    path.set_from_ridge(ridge)
    run = dm.runs[dm.runs_in("test")[0]]
    ends = ridge.window_ends(run, training=False)
    x = np.stack([run.series[e - dm.window_frames + 1 : e + 1].T for e in ends])
    with torch.no_grad():
        got = path(torch.as_tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, ridge.predict_run(run)[ends], rtol=1e-4, atol=1e-5)

    net.fit_init(dm)
    assert net.init_report["linear_alpha"] in net.linear_alphas
    assert torch.count_nonzero(net.linear.linear.weight) > 0


def test_training_logs_binned_validation_r_and_checkpoints_on_it(make_cfg, tiny_root, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(
        "data=tiny",
        "model=hybrid",
        "split.fold=0",
        "trainer.max_epochs=2",
        *FAST,
        output_dir=out,
    )
    dm = build_datamodule(cfg)
    decoder = make_decoder(cfg, "hybrid").fit(dm, out)
    task, trainer = decoder.task, decoder.trainer_
    assert {"val/r_1min", "val/r_2min"} <= set(trainer.callback_metrics)
    binned = next(c for c in trainer.callbacks if isinstance(c, BinnedValidation))
    assert binned.keep_initial and np.isfinite(binned.initial_score)
    assert len(binned.history) == trainer.current_epoch
    ckpt = trainer.checkpoint_callback
    assert ckpt.monitor == "val/r_1min"
    best = max([*binned.history, binned.initial_score])
    assert float(ckpt.best_model_score) == pytest.approx(best, abs=1e-6)
    # the decoder now holds the selected weights: scoring them again gives the best score
    task.eval()
    again = [task.validation_batch_outputs(b) for b in dm.val_dataloader()]
    assert binned_r(dm.runs, again, "1min") == pytest.approx(best, abs=1e-5)


@pytest.mark.parametrize("model", ["convattn", "hybrid"])
def test_default_callbacks_select_every_deep_model_on_binned_validation_r(
    model, make_cfg, tiny_root, tmp_path
):
    """With the packaged callbacks, the checkpoint and early stopping monitor ``val/r_1min``,
    and it is logged (finite) in every epoch before they read it."""
    out = tmp_path / "run"
    cfg = make_cfg("data=tiny", f"model={model}", "split.fold=0", "trainer.max_epochs=2", *FAST)
    assert cfg.callbacks.model_checkpoint.monitor == "val/r_1min"
    assert cfg.callbacks.early_stopping.monitor == "val/r_1min"
    dm = build_datamodule(cfg)
    trainer = make_decoder(cfg, model).fit(dm, out).trainer_
    binned = next(c for c in trainer.callbacks if isinstance(c, BinnedValidation))
    assert len(binned.history) == trainer.current_epoch == 2
    assert np.isfinite(binned.history).all()
    assert np.isfinite(float(trainer.callback_metrics["val/r_1min"]))
    assert np.isfinite(float(trainer.checkpoint_callback.best_model_score))
    stopping = next(c for c in trainer.callbacks if type(c).__name__ == "EarlyStopping")
    assert stopping.monitor == "val/r_1min" and np.isfinite(float(stopping.best_score))


# tiny with one 120-s run per session: a validation session gives two 1-min bins
ONE_RUN = "+data.simulate.n_runs=1"


def test_validation_too_small_for_monitored_binned_r_is_an_error_before_training(
    make_cfg, tmp_path
):
    out = tmp_path / "run"
    cfg = make_cfg("data=tiny", ONE_RUN, "model=convattn", "split.fold=0", *FAST, output_dir=out)
    dm = build_datamodule(cfg)
    with pytest.raises(ValueError, match=r"val/r_1min .*cannot be computed.*2 1min bin.*n_val"):
        make_decoder(cfg, "convattn").fit(dm, out)
    assert not list(out.rglob("*.ckpt"))  # nothing was trained


def test_validation_too_small_for_unmonitored_binned_r_logs_nan(make_cfg, tmp_path):
    """Selecting on frame-level val/r instead: training runs, val/r_1min is logged as NaN."""
    out = tmp_path / "run"
    cfg = make_cfg(
        "data=tiny",
        ONE_RUN,
        "model=convattn",
        "split.fold=0",
        "trainer.max_epochs=1",
        "callbacks.model_checkpoint.monitor=val/r",
        "callbacks.early_stopping.monitor=val/r",
        *FAST,
        output_dir=out,
    )
    trainer = make_decoder(cfg, "convattn").fit(build_datamodule(cfg), out).trainer_
    assert np.isnan(float(trainer.callback_metrics["val/r_1min"]))
    assert np.isfinite(float(trainer.checkpoint_callback.best_model_score))


def test_initial_weights_win_when_training_only_hurts(make_cfg, tiny_root, tmp_path):
    """With a learning rate that wrecks the conv pathway, the edge-model start is kept: the
    checkpoint used for prediction holds the initial weights."""
    out = tmp_path / "run"
    cfg = make_cfg(
        "data=tiny",
        "model=hybrid",
        "split.fold=0",
        "trainer.max_epochs=1",
        "model.optimizer.lr=30.0",
        "model.scheduler=null",
        "trainer.gradient_clip_val=null",
        *FAST,
        output_dir=out,
    )
    dm = build_datamodule(cfg)
    decoder = make_decoder(cfg, "hybrid").fit(dm, out)
    task, trainer = decoder.task, decoder.trainer_
    binned = next(c for c in trainer.callbacks if isinstance(c, BinnedValidation))
    if binned.history and binned.history[0] >= binned.initial_score:
        pytest.skip("training did not hurt here; nothing to restore")
    assert binned.restored_initial
    head = task.net.conv.head[-1].weight  # the model that predicts: the zero-output start
    assert torch.count_nonzero(head) == 0


@pytest.mark.slow
def test_hybrid_decodes_cofluctuation_only_pain_above_chance(make_cfg, data_dir, tmp_path):
    """Pain only in co-fluctuation (activation gain 0): the hybrid's pooled held-out r of
    1-min bins over all LOSO folds beats a chance bar calibrated from the ratings themselves
    (r between ratings of different sessions, as tests/test_learning.py does)."""
    from tests.test_learning import held_out_r_on_tiny_cofluct

    r, bar = held_out_r_on_tiny_cofluct(
        make_cfg,
        data_dir,
        tmp_path,
        "model=hybrid",
        "model.net.n_last=11",  # the form averaged over ~5 s: a less noisy amplitude
        "trainer.max_epochs=3",
    )
    assert r > bar, f"pooled held-out r {r:.2f} vs chance bar {bar:.2f}"
