"""One decoder protocol for every model: fit on a DataModule, predict the prediction table,
save, load, and report the hyperparameters chosen by inner CV.

Nothing above this module branches on the kind of model. :func:`make_decoder` picks the
adapter from the config once:

- :class:`LightningDecoder`: ``model._target_`` is a LightningModule (e.g. ConvAttn through
  :class:`painnet.task.PainDecoderTask`); trained by a Lightning Trainer built from
  ``cfg.trainer`` / ``cfg.callbacks`` / ``cfg.logger``; saved as ``checkpoints/best.ckpt``.
- :class:`ClassicalDecoder`: an estimator with ``fit(runs)`` / ``predict_run(run)`` (EdgePCR,
  WindowRidge); fitted on the training plus validation sessions through
  :func:`painnet.models.classical.fit_predict`, whose train/test overlap guard every run passes;
  saved as ``model.pkl``.
- :class:`painnet.experiments.stack.StackDecoder` (``model=stack``; the model class names it
  in ``decoder_adapter``): member decoders combined by weights fitted on their inner
  cross-validated predictions.
- :class:`EnsembleDecoder` (``ensemble.members=K`` > 1): K members of one of the above, member
  i trained with seed ``seed + i`` in ``members/<i>/``; the prediction is the frame-wise mean of
  the members' predictions.

``load_decoder(job_dir)`` rebuilds the fitted decoder of a finished job folder; its ``.model``
is the estimator, the LightningModule, or the list of member models of an ensemble.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from painnet.atomic import atomic_path
from painnet.evaluation.table import mean_table, table_from_batches, table_from_frame_predictions

log = logging.getLogger(__name__)

CHECKPOINT = Path("checkpoints") / "best.ckpt"
MODEL_PICKLE = "model.pkl"
# Keys of a model config that describe the decoder, not constructor arguments of the model.
MODEL_META_KEYS = ("name",)


def model_kwargs(model_cfg: DictConfig) -> DictConfig:
    """The model config without painnet's own keys (``name``), ready for ``instantiate``."""
    node = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
    with open_dict(node):
        for key in MODEL_META_KEYS:
            node.pop(key, None)
    return node


def model_target(cfg: DictConfig) -> type:
    target = cfg.model.get("_target_")
    if not target:
        raise ValueError("model._target_ is missing: every model config names its class")
    try:
        return get_class(target)
    except Exception as err:
        raise ValueError(f"model._target_={target}: cannot import it ({err})") from err


class Decoder:
    """The protocol (and shared helpers) of every adapter."""

    #: True when validation sessions are held out for early stopping (deep models); False when
    #: the decoder trains on them too and runs its own inner CV (classical models).
    uses_validation = True

    def __init__(self, cfg: DictConfig, name: str):
        self.cfg = cfg
        self.name = name

    # -- protocol ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the config key if the config cannot give a trained model."""

    def fit(self, dm, output_dir: Path) -> Decoder:
        raise NotImplementedError

    def predict(self, dm) -> pd.DataFrame:
        """The prediction table of every held-out (test) run of ``dm``."""
        raise NotImplementedError

    def save(self, output_dir: Path) -> None:
        raise NotImplementedError

    def load(self, job_dir: Path, dm=None) -> Decoder:
        raise NotImplementedError

    def hyperparameters(self) -> dict:
        """Values chosen during fitting (e.g. EdgePCR's number of PCs); {} when none."""
        return {}

    @property
    def model(self) -> Any:
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def test_runs(dm) -> list:
        return [dm.runs[i] for i in dm.runs_in("test")]


# --------------------------------------------------------------------------- Lightning


class LightningDecoder(Decoder):
    uses_validation = True

    def __init__(self, cfg: DictConfig, name: str):
        super().__init__(cfg, name)
        self.task = None
        self.best_score = None

    def validate(self) -> None:
        trainer = self.cfg.get("trainer") or {}
        if trainer.get("fast_dev_run"):
            return
        epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps")
        if epochs is not None and int(epochs) == 0 or steps is not None and int(steps) == 0:
            raise ValueError(
                f"trainer.max_epochs={epochs}, trainer.max_steps={steps}: the model would never "
                "be trained, and an untrained model is never scored (set trainer.max_epochs >= 1)"
            )

    def build_task(self, n_parcels: int, n_frames: int):
        return instantiate(model_kwargs(self.cfg.model), n_parcels=n_parcels, n_frames=n_frames)

    def _callbacks(self, output_dir: Path) -> list:
        from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

        callbacks = [instantiate(c) for c in (self.cfg.get("callbacks") or {}).values() if c]
        if not self.cfg.trainer.get("enable_progress_bar", True):
            # Lightning refuses a progress-bar callback when the bar is switched off.
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        for cb in callbacks:
            if isinstance(cb, ModelCheckpoint):
                cb.dirpath = str(output_dir / CHECKPOINT.parent)  # always inside the job
        finetune = self.cfg.get("finetune")
        if finetune:
            from painnet.experiments.finetune import BackboneFinetuning

            ckpt = finetune.get("from")
            if not ckpt:
                raise ValueError(
                    "finetune.from is not set: fine-tuning starts from a pretrained checkpoint "
                    "(experiment=finetune / experiment=pretrain plan the pretraining job that "
                    "makes it, or give finetune.from=PATH)"
                )
            mode = str(finetune.get("mode", "all"))
            callbacks.append(BackboneFinetuning(ckpt, mode=mode, record_dir=output_dir))
        return callbacks

    def trainer(self, output_dir: Path | None, callbacks=(), loggers=()):
        return instantiate(
            self.cfg.trainer,
            callbacks=list(callbacks),
            logger=list(loggers) or False,
            default_root_dir=str(output_dir) if output_dir else None,
        )

    def fit(self, dm, output_dir: Path, loggers=()) -> LightningDecoder:
        self.validate()
        output_dir = Path(output_dir)
        self.task = self.build_task(dm.n_parcels, dm.window_frames)
        trainer = self.trainer(output_dir, self._callbacks(output_dir), loggers)
        trainer.fit(self.task, datamodule=dm)
        if trainer.global_step == 0:
            raise RuntimeError(
                "training ran no optimisation step (check trainer.max_epochs, trainer.max_steps "
                "and the training windows): an untrained model is never scored"
            )
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        best = best if best and Path(best).is_file() else ""
        # Under DDP only rank 0 writes checkpoints: every rank takes rank 0's decision and
        # loads rank 0's file, so all ranks predict with the same weights. (A no-op in one
        # process.)
        best = trainer.strategy.broadcast(best, src=0)
        target = output_dir / CHECKPOINT
        if best:
            self.best_score = trainer.checkpoint_callback.best_model_score
            self._load_weights(Path(best))
            trainer.strategy.barrier("painnet.best_checkpoint_loaded")  # before rank 0 moves it
            if trainer.is_global_zero and Path(best).resolve() != target.resolve():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(best, target)
        else:
            log.info("no best checkpoint was kept: the final weights are the model")
            target.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(str(target))  # collective; rank 0 writes the file
        self.trainer_ = trainer
        return self

    def _load_weights(self, ckpt: Path) -> None:
        import torch

        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        self.task.load_state_dict(state)

    def predict(self, dm) -> pd.DataFrame:
        trainer = self.trainer(None)
        batches = trainer.predict(self.task, datamodule=dm)
        # Under DDP each rank predicted a share: one table, every window once (a no-op merge
        # and completeness check in a single process). See painnet.distributed.
        from painnet.distributed import gather_predictions

        batches = gather_predictions(batches, dm.dataset("predict"))
        return table_from_batches(dm.runs, batches, dm.split.name, self.name)

    def save(self, output_dir: Path) -> None:
        if not (Path(output_dir) / CHECKPOINT).is_file():
            raise FileNotFoundError(f"{Path(output_dir) / CHECKPOINT}: not written by fit")

    def load(self, job_dir: Path, dm=None, ckpt: Path | None = None) -> LightningDecoder:
        import torch

        ckpt = Path(ckpt) if ckpt else Path(job_dir) / CHECKPOINT
        if not ckpt.is_file():
            raise FileNotFoundError(f"{ckpt}: checkpoint not found")
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
        hparams = checkpoint.get("hyper_parameters") or {}
        n_parcels, n_frames = hparams.get("n_parcels"), hparams.get("n_frames")
        if dm is not None:
            expected = {"n_parcels": dm.n_parcels, "n_frames": dm.window_frames}
            found = {"n_parcels": n_parcels, "n_frames": n_frames}
            wrong = {k: v for k, v in found.items() if v is not None and int(v) != expected[k]}
            if wrong:
                raise ValueError(
                    f"{ckpt}: the checkpoint was trained on {found} but the data gives "
                    f"{expected} (parcels from data.atlas, frames from data.window_s="
                    f"{dm.window_s} at TR {dm.tr:g} s); it cannot score this data"
                )
            n_parcels, n_frames = expected["n_parcels"], expected["n_frames"]
        if n_parcels is None or n_frames is None:
            raise ValueError(f"{ckpt}: no n_parcels/n_frames in its hyperparameters")
        self.task = self.build_task(int(n_parcels), int(n_frames))
        try:
            self.task.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as err:
            raise ValueError(f"{ckpt}: weights do not fit the configured model: {err}") from err
        self.task.eval()
        return self

    @property
    def model(self):
        return self.task


# --------------------------------------------------------------------------- classical


class ClassicalDecoder(Decoder):
    uses_validation = False

    def __init__(self, cfg: DictConfig, name: str):
        super().__init__(cfg, name)
        self.estimator = None
        self._predictions = None

    def fit(self, dm, output_dir: Path, loggers=()) -> ClassicalDecoder:
        from painnet.models.classical import fit_predict

        self.estimator = instantiate(model_kwargs(self.cfg.model))
        fit_runs = [dm.runs[i] for i in dm.runs_in("train") + dm.runs_in("val")]
        # fit_predict refuses a test session that is also a training session.
        self._predictions = (
            dm.split.name,
            fit_predict(self.estimator, fit_runs, self.test_runs(dm)),
        )
        return self

    def predict(self, dm) -> pd.DataFrame:
        runs = self.test_runs(dm)
        if self._predictions is not None and self._predictions[0] == dm.split.name:
            predictions = self._predictions[1]
        else:
            self._check_disjoint(runs)
            predictions = {run.key: self.estimator.predict_run(run) for run in runs}
        return table_from_frame_predictions(
            runs, predictions, dm.window_frames, dm.split.name, self.name
        )

    def _check_disjoint(self, runs) -> None:
        trained = set(getattr(self.estimator, "training_sessions_", ()) or ())
        shared = sorted(trained & {run.key.session_key for run in runs})
        if shared:
            raise ValueError(
                f"sessions {shared} were used to fit this model: they cannot be scored as held out"
            )

    def save(self, output_dir: Path) -> None:
        path = Path(output_dir) / MODEL_PICKLE
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            pickle.dump(self.estimator, fh)

    def load(self, job_dir: Path, dm=None, ckpt: Path | None = None) -> ClassicalDecoder:
        path = Path(ckpt) if ckpt else Path(job_dir) / MODEL_PICKLE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: fitted model not found")
        with open(path, "rb") as fh:
            self.estimator = pickle.load(fh)
        if dm is not None:
            fitted = getattr(self.estimator, "n_parcels_", None)
            if fitted is not None and int(fitted) != dm.n_parcels:
                raise ValueError(
                    f"{path}: the model was fitted on {fitted} parcels but the data gives "
                    f"{dm.n_parcels} (data.atlas); it cannot score this data"
                )
            frames = getattr(self.estimator, "window_frames_", None)
            if frames is not None and int(frames) != dm.window_frames:
                raise ValueError(
                    f"{path}: the model was fitted on windows of {frames} frames but "
                    f"data.window_s={dm.window_s} gives {dm.window_frames}"
                )
        return self

    def hyperparameters(self) -> dict:
        chosen = getattr(self.estimator, "hyperparameters", None)
        return dict(chosen()) if callable(chosen) else {}

    @property
    def model(self):
        return self.estimator


# --------------------------------------------------------------------------- ensemble


class EnsembleDecoder(Decoder):
    """K members of one adapter; member i trains with seed ``seed + i`` in ``members/<i>``."""

    def __init__(self, cfg: DictConfig, name: str, members: int):
        super().__init__(cfg, name)
        if members < 2:
            raise ValueError(f"ensemble.members={members}: an ensemble needs at least 2 members")
        base = adapter_class(cfg)
        self.uses_validation = base.uses_validation
        self.members = []
        for i in range(members):
            member_cfg = OmegaConf.merge(cfg, {"seed": int(cfg.seed) + i})
            self.members.append(base(member_cfg, f"{name}#{i}"))

    def validate(self) -> None:
        self.members[0].validate()

    @staticmethod
    def member_dir(output_dir: Path, i: int) -> Path:
        return Path(output_dir) / "members" / str(i)

    def fit(self, dm, output_dir: Path, loggers=()) -> EnsembleDecoder:
        import lightning as L

        for i, member in enumerate(self.members):
            L.seed_everything(int(member.cfg.seed), workers=True)
            folder = self.member_dir(output_dir, i)
            folder.mkdir(parents=True, exist_ok=True)
            member.fit(dm, folder, loggers if i == 0 else ())
        return self

    def member_tables(self, dm) -> list[pd.DataFrame]:
        return [member.predict(dm) for member in self.members]

    def predict(self, dm) -> pd.DataFrame:
        return mean_table(self.member_tables(dm), self.name)

    def save(self, output_dir: Path) -> None:
        for i, member in enumerate(self.members):
            member.save(self.member_dir(output_dir, i))

    def load(self, job_dir: Path, dm=None, ckpt: Path | None = None) -> EnsembleDecoder:
        if ckpt is not None:
            raise ValueError("ckpt_path cannot select one checkpoint of an ensemble")
        for i, member in enumerate(self.members):
            member.load(self.member_dir(job_dir, i), dm)
        return self

    def hyperparameters(self) -> dict:
        return {"members": [member.hyperparameters() for member in self.members]}

    @property
    def model(self):
        return [member.model for member in self.members]


# --------------------------------------------------------------------------- factory


def adapter_class(cfg: DictConfig) -> type[Decoder]:
    """The adapter a model class names (``decoder_adapter``, e.g. the stack's), else
    LightningDecoder for LightningModule targets and ClassicalDecoder for everything else."""
    import lightning as L

    target = model_target(cfg)
    named = getattr(target, "decoder_adapter", None)
    if named:
        return get_class(named)
    return LightningDecoder if issubclass(target, L.LightningModule) else ClassicalDecoder


def ensemble_members(cfg: DictConfig) -> int:
    members = int((cfg.get("ensemble") or {}).get("members", 1) or 1)
    if members < 1:
        raise ValueError(f"ensemble.members={members}: must be >= 1")
    return members


def make_decoder(cfg: DictConfig, name: str) -> Decoder:
    members = ensemble_members(cfg)
    if members > 1:
        return EnsembleDecoder(cfg, name, members)
    return adapter_class(cfg)(cfg, name)


def load_decoder(job_dir: str | Path, cfg: DictConfig | None = None, dm=None, ckpt=None):
    """The fitted decoder of a finished job folder (``.model``: the fitted model).

    ``cfg`` defaults to the job's saved config (``job.yaml``); with ``dm`` the model's input size
    is checked against the data.
    """
    from painnet.experiments.jobs import read_job_config, variant_name

    job_dir = Path(job_dir)
    cfg = cfg if cfg is not None else read_job_config(job_dir)
    return make_decoder(cfg, variant_name(cfg)).load(job_dir, dm=dm, ckpt=ckpt)
