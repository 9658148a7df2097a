"""Lightning callbacks of painnet.

:class:`BinnedValidation` scores the validation session(s) the way the test sessions are scored
(the study's metric): frame predictions averaged into 1-min (and 2-min) bins per run, then the
pooled Pearson r of the bins. It logs ``val/r_1min`` and ``val/r_2min`` so that checkpointing and
early stopping can monitor them, and it can make the *initial* weights a candidate too (an
informed initialisation, e.g. the hybrid decoder set to the edge model, is kept when training
does not beat it on that metric).

When the binned r cannot be computed (NaN):

* **structurally** -- the validation windows give fewer than 3 bins of the monitored size (e.g.
  one short validation run), or their binned ratings are constant: every epoch would be NaN and
  the checkpoint would silently be epoch 0. This is an error at the start of ``fit``, naming the
  metric, the bin count and the validation runs, for every binned metric that a callback
  monitors (``ModelCheckpoint``, ``EarlyStopping``, ``keep_initial``, a pruner's ``monitor``).
  An unmonitored binned metric (e.g. ``val/r_2min`` on short runs) is simply logged as NaN.
* **in one epoch** -- constant predictions (a collapsed model): the epoch is logged as NaN and
  counts as the worst score: ``ModelCheckpoint`` ranks NaN as ``-inf``, ``EarlyStopping``
  (``check_finite: false``) as no improvement; a warning names the epoch. If no epoch is
  finite, a warning says that the kept checkpoint is not a selected one.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch

from painnet.evaluation.bins import bin_predictions
from painnet.evaluation.metrics import MIN_BINS_FOR_R, is_constant, pearson_r
from painnet.evaluation.table import table_from_batches

log = logging.getLogger(__name__)

BIN_METRICS = {"val/r_1min": "1min", "val/r_2min": "2min"}


def binned_r(runs, batches: list[Mapping], bin_size: str) -> float:
    """Pooled r of ``bin_size`` bins of prediction batches (dicts with run_index, frame,
    prediction) over ``runs`` (the DataModule's run list); NaN if it cannot be computed."""
    if not batches:
        return float("nan")
    table = table_from_batches(runs, batches, split="val", model="val")
    binned = bin_predictions(table, bin_size)
    return pearson_r(binned["rating"].to_numpy(), binned["prediction"].to_numpy())


def check_binned_validation(dm, metric: str) -> None:
    """ValueError unless the validation windows of ``dm`` can give a finite ``metric``.

    ``metric`` (``val/r_1min`` or ``val/r_2min``) is the pooled r of the validation bins; it
    needs at least ``MIN_BINS_FOR_R`` bins whose mean ratings are not all equal. Checked on the
    windows alone (their run, frame and rating), before any training.
    """
    ds = dm.dataset("val")
    frames = {
        "run_index": ds.owner_run.numpy(),
        "frame": ds.local_end.numpy(),
        "prediction": np.arange(len(ds), dtype=np.float64),  # any non-constant values
    }
    table = table_from_batches(dm.runs, [frames], split="val", model="val")
    binned = bin_predictions(table, BIN_METRICS[metric])
    n_bins = len(binned)
    runs = ", ".join(
        f"{k[0]}/{k[1]}/{k[2]} ({d:.0f} s)"
        for k, d in table.groupby(["subject", "session", "run"])["run_duration_s"].first().items()
    )
    if n_bins < MIN_BINS_FOR_R:
        reason = f"gives {n_bins} {BIN_METRICS[metric]} bin(s), fewer than {MIN_BINS_FOR_R}"
    elif is_constant(binned["rating"].to_numpy()):
        reason = f"has the same mean rating in all of its {n_bins} {BIN_METRICS[metric]} bins"
    else:
        return
    raise ValueError(
        f"{metric} is monitored but cannot be computed: the validation set ({runs}) {reason}, "
        f"so {metric} would be NaN in every epoch and the kept checkpoint would be arbitrary. "
        "Validate on more or longer sessions (split.n_val), or monitor a frame-level metric "
        "(callbacks.model_checkpoint.monitor=val/r callbacks.early_stopping.monitor=val/r)"
    )


class BinnedValidation(L.Callback):
    """Log ``val/r_1min`` and ``val/r_2min`` (pooled r of binned validation predictions).

    Reads the ``{"run_index", "frame", "prediction"}`` dicts that
    ``PainDecoderTask.validation_step`` returns, and the runs of ``trainer.datamodule``; without
    a DataModule holding runs (plain dataloaders) it does nothing.

    Args:
        keep_initial: also score the weights as they are when training starts (after
            ``fit_init``); if they beat every validation epoch on ``monitor``, they are put back
            at the end of training: loaded into the model and written over the best checkpoint
            of the trainer's ``ModelCheckpoint`` if it has one (prediction reads that file).
        monitor: the binned metric that ``keep_initial`` compares (``val/r_1min``).

    Non-finite scores (e.g. a constant prediction) never count as better.
    """

    def __init__(self, keep_initial: bool = False, monitor: str = "val/r_1min"):
        super().__init__()
        if monitor not in BIN_METRICS:
            raise ValueError(f"BinnedValidation: monitor must be one of {sorted(BIN_METRICS)}")
        self.keep_initial = bool(keep_initial)
        self.monitor = monitor
        self.history: list[float] = []  # monitor score of every validation epoch
        self.initial_score = float("nan")
        self.restored_initial = False
        self._batches: list[Mapping] = []
        self._initial_state: dict | None = None
        self._monitored: set[str] = set()  # binned metrics some callback selects on

    # -- checks -------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuse, before training, a binned metric that is monitored but can never be finite."""
        if stage != "fit" or not _has_runs(trainer) or not trainer.limit_val_batches:
            return
        monitored = {getattr(cb, "monitor", None) for cb in trainer.callbacks if cb is not self}
        if self.keep_initial:
            monitored.add(self.monitor)
        self._monitored = monitored & set(BIN_METRICS)
        for metric in sorted(self._monitored):
            check_binned_validation(trainer.datamodule, metric)

    # -- collecting ---------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._batches = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not _has_runs(trainer):
            return
        if not isinstance(outputs, Mapping) or "prediction" not in outputs:
            raise ValueError(
                "BinnedValidation: validation_step must return a dict with run_index, frame "
                f"and prediction; got {type(outputs).__name__}"
            )
        self._batches.append(outputs)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        batches, self._batches = self._batches, []
        if trainer.sanity_checking or not _has_runs(trainer):
            return
        scores = self._scores(trainer, batches)
        for name, value in scores.items():
            pl_module.log(name, value, on_epoch=True, prog_bar=name == self.monitor)
        if self.monitor in self._monitored and not np.isfinite(scores[self.monitor]):
            log.warning(
                "BinnedValidation: %s is NaN at epoch %d (constant predictions in the validation "
                "bins); the epoch counts as the worst score",
                self.monitor,
                trainer.current_epoch,
            )
        self.history.append(scores[self.monitor])

    def _scores(self, trainer, batches: list[Mapping]) -> dict[str, float]:
        runs = trainer.datamodule.runs
        batches = _all_ranks(batches)
        return {name: binned_r(runs, batches, size) for name, size in BIN_METRICS.items()}

    # -- the initial weights as a candidate ----------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if not self.keep_initial:
            return
        if not _has_runs(trainer):
            log.warning("BinnedValidation: no DataModule with runs; keep_initial is ignored")
            return
        self.initial_score = self._score_now(trainer, pl_module)[self.monitor]
        self._initial_state = copy.deepcopy(pl_module.state_dict())
        log.info("BinnedValidation: initial %s = %.4f", self.monitor, self.initial_score)

    @torch.no_grad()
    def _score_now(self, trainer, pl_module) -> dict[str, float]:
        was_training = pl_module.training
        pl_module.eval()
        batches = [
            pl_module.validation_batch_outputs(_to_device(batch, pl_module.device))
            for batch in trainer.datamodule.val_dataloader()
        ]
        pl_module.train(was_training)
        return self._scores(trainer, batches)

    def on_train_end(self, trainer, pl_module) -> None:
        finite_epochs = np.isfinite(self.history).any() if self.history else True
        if self.monitor in self._monitored and not finite_epochs:
            log.warning(
                "BinnedValidation: %s was NaN in every epoch; the checkpoint kept is not a "
                "selected one (constant predictions)",
                self.monitor,
            )
        if self._initial_state is None or not np.isfinite(self.initial_score):
            return
        finite = [s for s in self.history if np.isfinite(s)]
        if finite and max(finite) >= self.initial_score:
            return
        pl_module.load_state_dict(self._initial_state)
        self.restored_initial = True
        checkpoint = trainer.checkpoint_callback
        path = getattr(checkpoint, "best_model_path", "") if checkpoint else ""
        if path:  # prediction reads the best checkpoint: it must hold the initial weights
            trainer.save_checkpoint(path)
            if getattr(checkpoint, "monitor", None) == self.monitor:
                checkpoint.best_model_score = torch.tensor(self.initial_score)
            where = f"written over {Path(path).name}"
        else:
            where = "loaded into the model"
        log.info(
            "BinnedValidation: the initial weights (%s %.4f) beat every epoch (best %s); %s",
            self.monitor,
            self.initial_score,
            f"{max(finite):.4f}" if finite else "none finite",
            where,
        )
        self._initial_state = None


def _all_ranks(batches: list[Mapping]) -> list[Mapping]:
    """Under DDP each rank validated a share of the windows: every rank's rows, each window
    once (a padded window repeated on two ranks is kept once), so all ranks log the same
    score. A single process gets its batches back unchanged."""
    from painnet.distributed import merge_batches, world_size

    if world_size() <= 1:
        return batches
    parts: list = [None] * world_size()
    torch.distributed.all_gather_object(parts, merge_batches(batches))
    names = ("run_index", "frame", "prediction")
    rows = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in names}
    if not len(rows["prediction"]):
        return []
    _, first = np.unique(np.stack([rows["run_index"], rows["frame"]], 1), axis=0, return_index=True)
    return [{k: v[first] for k, v in rows.items()}]


def _has_runs(trainer) -> bool:
    """Binning needs the DataModule's runs (plain dataloaders carry no run/frame identity)."""
    return bool(getattr(trainer.datamodule, "runs", None))


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
