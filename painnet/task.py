"""LightningModule that trains a pain decoder (any ``nn.Module`` mapping [B, P, L] -> [B]).

Batches are dicts from the DataModule:

- ``x``: float32 [B, P, L], P parcels x L frames of the causal window (last frame = target)
- ``y``: float32 [B], pain rating in [0, 1] (NaN only in predict batches)
- ``run_index``: int64 [B], index of the run in the DataModule's run list
- ``frame``: int64 [B], frame index of the window's end within its run

Logged metrics: ``train/loss`` (per step and per epoch), ``val/loss``, ``val/r``, ``val/mae``,
``val/mse`` and the same under ``test/``. Prediction returns frame-level rows (see
:meth:`PainDecoderTask.predict_step`) that the evaluation code bins and scores.

Optimiser and scheduler arrive as factories (Hydra ``_partial_: true``)::

    optimizer: {_target_: torch.optim.AdamW, _partial_: true, lr: 1.0e-3}
    scheduler: {_target_: torch.optim.lr_scheduler.CosineAnnealingLR, _partial_: true, T_max: 50}
    scheduler_interval: epoch        # or "step" for per-batch schedules (OneCycleLR, ...)
    scheduler_monitor: val/loss      # read by ReduceLROnPlateau only

``scheduler`` may also be a small dict ``{scheduler: <partial>, interval: step, monitor: ...,
frequency: 1}`` whose entries override the two arguments. A ``OneCycleLR`` partial given
neither ``total_steps`` nor ``epochs`` gets ``total_steps`` from the trainer.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, PearsonCorrCoef

LOSSES = ("mse", "huber")
INTERVALS = ("epoch", "step")


class PainDecoderTask(lightning.LightningModule):
    """Trains, evaluates and applies a pain decoder on windows of parcel time series.

    Args:
        net: the decoder, or a factory called as ``net(n_parcels=..., n_frames=...)`` (a Hydra
            partial, so the data decides the input size).
        optimizer: factory ``optimizer(params=...) -> torch.optim.Optimizer``.
        scheduler: factory ``scheduler(optimizer=...)``, a dict holding one (see the module
            docstring), or None for a constant learning rate.
        loss: ``"mse"`` or ``"huber"`` (``huber_delta`` in rating units, 0-1 scale).
        n_parcels, n_frames: input size, required when ``net`` is a factory.
        compile: wrap the net with ``torch.compile`` in :meth:`setup` (meant for GPUs).
        scheduler_interval: ``"epoch"`` or ``"step"``, how often the scheduler steps.
        scheduler_monitor: metric that ``ReduceLROnPlateau`` watches.
        keep_initial: the weights at the start of training (after ``net.fit_init``) compete
            with every epoch on ``val/r_1min`` (see :class:`painnet.callbacks.BinnedValidation`).

    ``net``, ``optimizer`` and ``scheduler`` are kept out of the saved hyperparameters (only
    plain values remain, so checkpoints load with ``torch.load(weights_only=True)``); pass
    them again when restoring: ``PainDecoderTask.load_from_checkpoint(path, net=...,
    optimizer=...)``.
    """

    def __init__(
        self,
        net: nn.Module | Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | Mapping[str, Any] | None = None,
        loss: str = "mse",
        huber_delta: float = 0.1,
        n_parcels: int | None = None,
        n_frames: int | None = None,
        compile: bool = False,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/loss",
        keep_initial: bool = False,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"PainDecoderTask: loss must be one of {LOSSES}, got {loss!r}")
        if scheduler_interval not in INTERVALS:
            raise ValueError(
                f"PainDecoderTask: scheduler_interval must be one of {INTERVALS}, "
                f"got {scheduler_interval!r}"
            )
        # The net, optimizer and scheduler are modules or (Hydra) partials: keeping them out of
        # the hparams lets checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.net = _build_net(net, n_parcels, n_frames)
        for name in ("n_parcels", "n_frames"):
            if self.hparams[name] is None and hasattr(self.net, name):
                self.hparams[name] = int(getattr(self.net, name))
        self._backbone_frozen = False
        self._compiled = False

        self.val_r, self.val_mae, self.val_mse = _metrics()
        self.test_r, self.test_mae, self.test_mse = _metrics()

    # ---- model --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pain estimates: x [B, P, L] -> [B]."""
        return self.net(x)

    def setup(self, stage: str) -> None:
        """Compile the net once if asked (in place: parameter names stay unchanged)."""
        if self.hparams.compile and not self._compiled:
            self.net.compile()
            self._compiled = True

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch; prediction and target are [B] on the rating scale."""
        if self.hparams.loss == "huber":
            return F.huber_loss(prediction, target, delta=self.hparams.huber_delta)
        return F.mse_loss(prediction, target)

    # ---- steps --------------------------------------------------------------------------

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        prediction, y = self._predict_batch(batch)
        loss = self.loss(prediction, y)
        self.log(
            "train/loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(y),
            sync_dist=True,  # mean over DDP ranks; a no-op in one process
        )
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict:
        """Logs val metrics; returns run_index/frame/prediction for ``val/r_1min``."""
        prediction = self._evaluate(batch, "val", (self.val_r, self.val_mae, self.val_mse))
        return _frame_outputs(batch, prediction)

    def validation_batch_outputs(self, batch: Mapping[str, torch.Tensor]) -> dict:
        """What :meth:`validation_step` returns, without logging (for callbacks)."""
        return _frame_outputs(batch, self(_get(batch, "x")))

    def on_fit_start(self) -> None:
        """Let the net initialise itself from the training data (``net.fit_init(datamodule)``,
        e.g. the hybrid decoder's edge-model fit) when it defines that hook."""
        net = getattr(self.net, "_orig_mod", self.net)
        if hasattr(net, "fit_init") and self.trainer.datamodule is not None:
            net.fit_init(self.trainer.datamodule)

    def configure_callbacks(self) -> list:
        """``val/r_1min`` and ``val/r_2min``: pooled r of binned validation predictions."""
        from painnet.callbacks import BinnedValidation

        return [BinnedValidation(keep_initial=self.hparams.get("keep_initial", False))]

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", (self.test_r, self.test_mae, self.test_mse))

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict:
        """One row per window, all CPU tensors of length B: ``run_index`` (int64), ``frame``
        (int64), ``prediction`` (float32) and ``y`` (float32 rating, NaN where unknown)."""
        prediction = self(_get(batch, "x"))
        y = batch.get("y")
        if y is None:
            y = torch.full_like(prediction, float("nan"))
        return {
            "run_index": _get(batch, "run_index").detach().long().cpu(),
            "frame": _get(batch, "frame").detach().long().cpu(),
            "prediction": prediction.detach().float().cpu(),
            "y": y.detach().float().cpu(),
        }

    def _predict_batch(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        x, y = _get(batch, "x"), _get(batch, "y")
        prediction = self(x)
        if prediction.shape != y.shape:
            raise ValueError(
                f"PainDecoderTask: the net returned shape {tuple(prediction.shape)} but the "
                f"batch's y has shape {tuple(y.shape)}; expected one estimate per window (B,)"
            )
        return prediction, y.to(prediction.dtype)

    def _evaluate(
        self, batch: Mapping[str, torch.Tensor], stage: str, metrics: tuple
    ) -> torch.Tensor:
        prediction, y = self._predict_batch(batch)
        n = len(y)
        loss = self.loss(prediction, y)
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=n, sync_dist=True)
        # Logging the metric objects lets Lightning compute (and sync) them at epoch end.
        for name, metric in zip(("r", "mae", "mse"), metrics):
            metric.update(prediction.float(), y.float())
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, batch_size=n)
        return prediction

    # ---- optimisation -------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        """The optimiser over trainable parameters, plus the scheduler if one is configured."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("PainDecoderTask: no trainable parameters (everything is frozen)")
        if hasattr(self.net, "param_groups") and not self._backbone_frozen:
            # Nets with per-pathway learning rates (HybridDecoder) give their own groups.
            lr = getattr(self.optimizer_factory, "keywords", {}).get("lr", 1e-3)
            params = self.net.param_groups(lr)
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self._scheduler_config(optimizer)}

    def _scheduler_config(self, optimizer: torch.optim.Optimizer) -> dict:
        """Lightning's lr_scheduler dict: scheduler, interval, frequency (+ monitor)."""
        spec = self.scheduler_factory
        options = {
            "interval": self.hparams.scheduler_interval,
            "monitor": self.hparams.scheduler_monitor,
            "frequency": 1,
        }
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"scheduler", *options}
            if "scheduler" not in spec or unknown:
                raise ValueError(
                    "PainDecoderTask: a scheduler dict needs a 'scheduler' factory and may "
                    f"hold only interval/monitor/frequency; got keys {sorted(spec)}"
                )
            options.update({k: v for k, v in spec.items() if k != "scheduler"})
            spec = spec["scheduler"]
        if options["interval"] not in INTERVALS:
            raise ValueError(
                f"PainDecoderTask: scheduler interval must be one of {INTERVALS}, "
                f"got {options['interval']!r}"
            )
        scheduler = spec(optimizer=optimizer, **self._one_cycle_length(spec))
        config = {"scheduler": scheduler, "interval": options["interval"]}
        config["frequency"] = int(options["frequency"])
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = options["monitor"]
        return config

    def _one_cycle_length(self, factory: Callable) -> dict:
        """``total_steps`` for a OneCycleLR partial that does not fix its own length."""
        if not isinstance(factory, functools.partial):
            return {}
        if not (
            isinstance(factory.func, type)
            and issubclass(factory.func, torch.optim.lr_scheduler.OneCycleLR)
        ):
            return {}
        if {"total_steps", "epochs"} & set(factory.keywords):
            return {}
        return {"total_steps": int(self.trainer.estimated_stepping_batches)}

    # ---- fine-tuning --------------------------------------------------------------------

    def freeze_backbone(self) -> None:
        """Train only the head: every net parameter outside the head modules stops requiring
        gradients, and the frozen modules stay in eval mode (dropout off), so the backbone
        is a fixed feature extractor. Call before ``trainer.fit`` (the optimiser only gets
        the trainable parameters).

        The head is ``net.head_modules()`` if the net defines it (ConvAttnDecoder: parcel
        pooling + MLP head), else its ``head`` child (and ``pool`` child if present).
        """
        head_ids = {id(p) for module in self._head_modules() for p in module.parameters()}
        for p in self.net.parameters():
            p.requires_grad_(id(p) in head_ids)
        self._backbone_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> PainDecoderTask:
        """Set train/eval mode; a frozen backbone (see :meth:`freeze_backbone`) stays in eval."""
        super().train(mode)
        if mode and getattr(self, "_backbone_frozen", False):
            for module in self._backbone_modules():
                module.training = False  # one module at a time: a parent may hold the head
        return self

    def load_backbone_from(
        self, source: str | os.PathLike | Mapping[str, torch.Tensor], strict: bool = True
    ) -> None:
        """Copy all net weights from a pretrained model, to start fine-tuning from it.

        ``source``: a Lightning checkpoint path (or its loaded dict, with ``state_dict``), a
        state dict of this task (keys ``net.*``) or of the bare net. ``_orig_mod.`` prefixes
        left by ``torch.compile`` are dropped. Files are read with ``weights_only=True``
        (tensors and plain values only, nothing executable is unpickled).
        """
        name = str(source) if isinstance(source, (str, os.PathLike)) else "the given state dict"
        state = _net_state_dict(_load_checkpoint(source))
        try:
            self.net.load_state_dict(state, strict=strict)
        except RuntimeError as err:
            raise ValueError(
                f"load_backbone_from: weights in {name} do not fit this net: {err}"
            ) from err

    def _head_modules(self) -> list[nn.Module]:
        net = getattr(self.net, "_orig_mod", self.net)
        if hasattr(net, "head_modules"):
            return list(net.head_modules())
        if isinstance(getattr(net, "head", None), nn.Module):
            pool = getattr(net, "pool", None)
            return [net.head] + ([pool] if isinstance(pool, nn.Module) else [])
        raise ValueError(
            f"freeze_backbone: {type(net).__name__} has neither head_modules() nor a 'head' "
            "submodule, so the head to keep trainable is unknown"
        )

    def _backbone_modules(self) -> Iterable[nn.Module]:
        """Every module of the net (itself included) that is not inside a head module."""
        inside_head = {id(m) for h in self._head_modules() for m in h.modules()}
        return [m for m in self.net.modules() if id(m) not in inside_head]


def _build_net(
    net: nn.Module | Callable[..., nn.Module], n_parcels: int | None, n_frames: int | None
) -> nn.Module:
    """The net itself, or the module a factory builds for the given input size."""
    if isinstance(net, nn.Module):
        _check_size(net, n_parcels, n_frames)
        return net
    if not callable(net):
        raise ValueError(
            f"PainDecoderTask: net must be an nn.Module or a factory, got {type(net).__name__}"
        )
    if n_parcels is None or n_frames is None:
        raise ValueError(
            "PainDecoderTask: net is a factory, so n_parcels and n_frames are required "
            f"(got n_parcels={n_parcels}, n_frames={n_frames})"
        )
    built = net(n_parcels=int(n_parcels), n_frames=int(n_frames))
    if not isinstance(built, nn.Module):
        raise ValueError(f"PainDecoderTask: the net factory returned {type(built).__name__}")
    return built


def _check_size(net: nn.Module, n_parcels: int | None, n_frames: int | None) -> None:
    for name, given in (("n_parcels", n_parcels), ("n_frames", n_frames)):
        own = getattr(net, name, None)
        if given is not None and own is not None and int(own) != int(given):
            raise ValueError(f"PainDecoderTask: {name}={given} but the given net has {own}")


def _frame_outputs(batch: Mapping[str, torch.Tensor], prediction: torch.Tensor) -> dict:
    return {
        "run_index": _get(batch, "run_index").detach().long().cpu(),
        "frame": _get(batch, "frame").detach().long().cpu(),
        "prediction": prediction.detach().float().cpu(),
    }


def _metrics() -> tuple[PearsonCorrCoef, MeanAbsoluteError, MeanSquaredError]:
    return PearsonCorrCoef(), MeanAbsoluteError(), MeanSquaredError()


def _get(batch: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in batch:
        raise ValueError(f"PainDecoderTask: batch has no {key!r} (keys: {sorted(batch)})")
    return batch[key]


def _load_checkpoint(source: str | os.PathLike | Mapping) -> Mapping:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"load_backbone_from: checkpoint {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"load_backbone_from: cannot read {path} as a checkpoint: {err}") from err
    if not isinstance(loaded, Mapping):
        raise ValueError(f"load_backbone_from: {path} holds a {type(loaded).__name__}, not a dict")
    return loaded


def _net_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The net's own keys: from ``state_dict`` if present, ``net.`` and ``_orig_mod.`` dropped."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping) or not state:
        raise ValueError("load_backbone_from: the checkpoint holds no state dict of weights")
    if any(key.startswith("net.") for key in state):
        state = {
            key[len("net.") :]: value for key, value in state.items() if key.startswith("net.")
        }
    return {key.replace("_orig_mod.", ""): value for key, value in state.items()}
