"""The deep decoder (ConvAttnDecoder) and its LightningModule (PainDecoderTask)."""

from __future__ import annotations

import functools

import lightning
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from painnet.models.convattn import ConvAttnDecoder
from painnet.task import PainDecoderTask

P, L = 6, 8  # parcels and frames of the synthetic windows used with the task
SIGNAL_PARCELS = [0, 1, 2]


def small_net(**overrides) -> ConvAttnDecoder:
    kwargs = {"n_parcels": P, "n_frames": L, "embed_dim": 32, "n_heads": 4} | overrides
    return ConvAttnDecoder(**kwargs)


def adamw(lr: float = 3e-3):
    return functools.partial(torch.optim.AdamW, lr=lr)


def make_task(**overrides) -> PainDecoderTask:
    kwargs = {"net": small_net(), "optimizer": adamw()} | overrides
    return PainDecoderTask(**kwargs)


class WindowSet(Dataset):
    """Synthetic windows: y is linear in the last-frame mean of 3 parcels, plus noise."""

    def __init__(self, n: int, seed: int, nan_ratings: bool = False):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, P, L, generator=gen)
        signal = self.x[:, SIGNAL_PARCELS, -1].mean(dim=1)
        self.y = 0.5 + 0.15 * signal + 0.02 * torch.randn(n, generator=gen)
        if nan_ratings:
            self.y[::3] = float("nan")
        self.run_index = torch.arange(n) % 4
        self.frame = torch.arange(n) + 100

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {
            "x": self.x[i],
            "y": self.y[i],
            "run_index": self.run_index[i],
            "frame": self.frame[i],
        }


def trainer(max_epochs: int) -> lightning.Trainer:
    return lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: a second intra-op thread only adds sync cost (10x slower when
    the 2 cores are busy), so run single-threaded and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fitted(one_thread):
    """A task really trained for a few epochs on the synthetic windows."""
    torch.manual_seed(0)
    task = make_task()
    fit_trainer = trainer(max_epochs=5)
    fit_trainer.fit(
        task,
        DataLoader(WindowSet(1024, seed=1), batch_size=64, shuffle=True),
        DataLoader(WindowSet(256, seed=2), batch_size=128),
    )
    return fit_trainer, task


# ---- ConvAttnDecoder ----------------------------------------------------------------------


@pytest.mark.parametrize(("n_parcels", "n_frames"), [(1, 1), (5, 8), (100, 22)])
def test_one_estimate_per_window(n_parcels, n_frames):
    net = ConvAttnDecoder(n_parcels, n_frames)
    out = net(torch.randn(3, n_parcels, n_frames))
    assert out.shape == (3,)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("bad", "got"),
    [
        (torch.randn(2, P + 1, L), f"(2, {P + 1}, {L})"),
        (torch.randn(2, P, L - 1), f"(2, {P}, {L - 1})"),
        (torch.randn(P, L), f"({P}, {L})"),
        (torch.zeros(2, P, L, dtype=torch.int64), "torch.int64"),
    ],
)
def test_wrong_input_raises_naming_expected_and_got(bad, got):
    with pytest.raises(ValueError, match=r"\(B, 6, 8\)") as err:
        small_net()(bad)
    assert got in str(err.value)


@pytest.mark.parametrize(
    "overrides", [{"embed_dim": 30, "n_heads": 4}, {"pooling": "max"}, {"conv_channels": []}]
)
def test_invalid_configuration_raises(overrides):
    with pytest.raises(ValueError):
        small_net(**overrides)


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_parcel_embedding_makes_parcel_order_matter(pooling):
    torch.manual_seed(0)
    x = torch.randn(4, P, L)
    order = torch.randperm(P)
    with_embedding = small_net(pooling=pooling).eval()
    without = small_net(pooling=pooling, parcel_embedding=False).eval()
    with torch.no_grad():
        assert not torch.allclose(with_embedding(x), with_embedding(x[:, order]), atol=1e-4)
        torch.testing.assert_close(without(x), without(x[:, order]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"time_pooling": "attention"}, {"time_pooling": "mean", "temporal_attention": True}],
)
def test_temporal_features_are_shared_across_parcels(overrides):
    """Same conv weights for every parcel: a parcel's features ignore its position/neighbours."""
    torch.manual_seed(0)
    net = small_net(**overrides).eval()
    x = torch.randn(3, P, L)
    with torch.no_grad():
        features = net.encode_time(x)  # [B, P, E]
        for j in (0, P - 1):
            alone = net.encode_time(x[:, [j]])
            torch.testing.assert_close(alone[:, 0], features[:, j], atol=1e-5, rtol=1e-5)
        moved = net.encode_time(x.flip(1))
    torch.testing.assert_close(moved.flip(1), features, atol=1e-5, rtol=1e-5)


def test_last_frame_shortcut_equals_the_full_convolution():
    torch.manual_seed(0)
    net = small_net(conv_channels=(4, 8, 8), time_pooling="last").eval()
    x = torch.randn(2, P, L)
    with torch.no_grad():
        full = net.conv(x.reshape(-1, 1, L))[..., -1]  # every frame, then keep the last
        expected = net.to_embed(full).reshape(2, P, -1)
        torch.testing.assert_close(net.encode_time(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"temporal_attention": True},
        {"time_pooling": "attention", "pooling": "mean", "conv_channels": (8, 8, 16)},
    ],
)
def test_gradients_reach_every_parameter(overrides):
    torch.manual_seed(0)
    net = small_net(**overrides).train()
    loss = (net(torch.randn(8, P, L)) - torch.rand(8)).pow(2).mean()
    loss.backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


# ---- PainDecoderTask: training, metrics, prediction -----------------------------------------


def test_fit_learns_the_synthetic_relation(fitted):
    fit_trainer, _ = fitted
    metrics = fit_trainer.callback_metrics
    assert {"train/loss_epoch", "val/loss", "val/r", "val/mae", "val/mse"} <= set(metrics)
    assert metrics["val/r"] > 0.8
    assert metrics["val/mae"] < 0.06  # the rating signal itself has sd ~0.09


def test_test_step_logs_test_metrics(fitted):
    fit_trainer, task = fitted
    (results,) = fit_trainer.test(task, DataLoader(WindowSet(256, seed=3), batch_size=64))
    assert {"test/loss", "test/r", "test/mae"} <= set(results)
    assert results["test/r"] > 0.8


def test_predict_returns_rows_aligned_with_inputs(fitted):
    fit_trainer, task = fitted
    data = WindowSet(100, seed=4, nan_ratings=True)
    batches = fit_trainer.predict(task, DataLoader(data, batch_size=32))
    rows = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    assert set(rows) == {"run_index", "frame", "prediction", "y"}
    assert all(v.device.type == "cpu" and v.shape == (100,) for v in rows.values())
    assert rows["prediction"].dtype == torch.float32
    torch.testing.assert_close(rows["run_index"], data.run_index)
    torch.testing.assert_close(rows["frame"], data.frame)
    torch.testing.assert_close(rows["y"], data.y, equal_nan=True)
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(rows["prediction"], task(data.x))


def test_net_factory_is_built_for_the_data_size():
    factory = functools.partial(ConvAttnDecoder, embed_dim=16, n_heads=2)
    task = PainDecoderTask(net=factory, optimizer=adamw(), n_parcels=7, n_frames=5)
    assert task(torch.randn(2, 7, 5)).shape == (2,)
    assert "net" not in task.hparams and task.hparams.n_parcels == 7
    with pytest.raises(ValueError, match="n_parcels and n_frames"):
        PainDecoderTask(net=factory, optimizer=adamw(), n_parcels=7)


def test_huber_loss_grows_linearly_beyond_delta():
    huber = make_task(loss="huber", huber_delta=0.1)
    mse = make_task(loss="mse")
    pred, target = torch.tensor([1.0]), torch.tensor([0.0])
    assert huber.loss(pred, target).item() == pytest.approx(0.1 * (1.0 - 0.05))
    assert mse.loss(pred, target).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="loss"):
        make_task(loss="l1")


def test_compile_keeps_parameter_names():
    task = make_task(compile=True)
    names = set(task.state_dict())
    task.setup("fit")  # compilation is lazy: nothing is traced until the first call
    assert set(task.state_dict()) == names


# ---- PainDecoderTask: fine-tuning -----------------------------------------------------------


def test_freeze_backbone_leaves_only_the_head_trainable():
    task = make_task()
    task.freeze_backbone()
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    head = {n for n, _ in task.named_parameters() if n.startswith(("net.pool.", "net.head."))}
    assert trainable == head and head
    optimizer = task.configure_optimizers()
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(head)
    task.train()
    assert not task.net.to_embed[0].training  # backbone dropout stays off
    assert task.net.head[3].training  # head dropout still on


@pytest.mark.filterwarnings("ignore:.*in eval mode at the start of training")
@pytest.mark.filterwarnings("ignore:.*no `val_dataloader`")
def test_frozen_backbone_fit_changes_only_the_head():
    torch.manual_seed(0)
    task = make_task()
    task.freeze_backbone()
    before = {n: p.detach().clone() for n, p in task.net.named_parameters()}
    trainer(max_epochs=1).fit(task, DataLoader(WindowSet(128, seed=5), batch_size=32))
    changed = {n for n, p in task.net.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("pool.", "head.")) for n in changed)


def test_load_backbone_from_a_lightning_checkpoint(fitted, tmp_path):
    fit_trainer, trained = fitted
    path = tmp_path / "pretrained.ckpt"
    fit_trainer.save_checkpoint(path)
    fresh = make_task()
    fresh.load_backbone_from(path)
    for name, value in trained.net.state_dict().items():
        torch.testing.assert_close(fresh.net.state_dict()[name], value)


def test_checkpoint_restores_with_plain_values_only(fitted, tmp_path):
    fit_trainer, trained = fitted
    path = tmp_path / "task.ckpt"
    fit_trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)  # no partials or modules pickled
    assert not {"net", "optimizer", "scheduler"} & set(saved["hyper_parameters"])
    restored = PainDecoderTask.load_from_checkpoint(path, net=small_net(), optimizer=adamw())
    x = WindowSet(16, seed=6).x
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), trained.eval()(x))


def test_load_backbone_from_a_bare_state_dict_and_bad_sources(tmp_path):
    source, target = small_net(), make_task()
    target.load_backbone_from(source.state_dict())
    assert torch.equal(target.net.parcel_embedding.weight, source.parcel_embedding.weight)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        target.load_backbone_from(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="do not fit"):
        target.load_backbone_from(small_net(embed_dim=16).state_dict())
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(ValueError, match="notes.ckpt"):
        target.load_backbone_from(not_a_checkpoint)


# ---- PainDecoderTask: schedulers ------------------------------------------------------------


def test_without_scheduler_the_optimizer_is_returned():
    assert isinstance(make_task().configure_optimizers(), torch.optim.AdamW)


def test_cosine_scheduler_partial_steps_per_epoch_or_per_step():
    cosine = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=50)
    config = make_task(scheduler=cosine).configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.AdamW)
    scheduler = config["lr_scheduler"]
    assert isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.CosineAnnealingLR)
    assert scheduler["scheduler"].optimizer is config["optimizer"]
    assert scheduler["interval"] == "epoch" and "monitor" not in scheduler
    per_step = make_task(scheduler=cosine, scheduler_interval="step").configure_optimizers()
    assert per_step["lr_scheduler"]["interval"] == "step"
    as_dict = make_task(scheduler={"scheduler": cosine, "interval": "step"}).configure_optimizers()
    assert as_dict["lr_scheduler"]["interval"] == "step"


def test_plateau_scheduler_monitors_val_loss():
    plateau = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=2)
    scheduler = make_task(scheduler=plateau).configure_optimizers()["lr_scheduler"]
    assert isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert scheduler["monitor"] == "val/loss" and scheduler["interval"] == "epoch"


def test_bad_scheduler_settings_raise():
    with pytest.raises(ValueError, match="scheduler_interval"):
        make_task(scheduler_interval="batch")
    cosine = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=5)
    with pytest.raises(ValueError, match="scheduler dict"):
        make_task(scheduler={"scheduler": cosine, "every": 2}).configure_optimizers()


def test_freeze_backbone_works_for_any_net_with_a_head_child():
    net = nn.Sequential()
    net.add_module("body", nn.Flatten())
    net.add_module("head", nn.Linear(P * L, 1))
    task = PainDecoderTask(net=net, optimizer=adamw())
    task.freeze_backbone()
    assert {n for n, p in task.named_parameters() if p.requires_grad} == {
        "net.head.weight",
        "net.head.bias",
    }


@pytest.mark.filterwarnings("ignore:.*no `val_dataloader`")
def test_one_cycle_without_length_gets_the_trainer_step_count():
    one_cycle = functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-2)
    task = make_task(scheduler=one_cycle, scheduler_interval="step")
    fit_trainer = trainer(max_epochs=2)
    fit_trainer.fit(task, DataLoader(WindowSet(96, seed=7), batch_size=32))  # 3 steps/epoch
    (scheduler,) = fit_trainer.lr_scheduler_configs
    assert scheduler.interval == "step"
    assert scheduler.scheduler.total_steps == 6
    assert scheduler.scheduler.last_epoch == 6  # stepped once per batch
