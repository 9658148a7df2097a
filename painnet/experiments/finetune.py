"""Per-participant fine-tuning as a Lightning callback, and the pretraining jobs it starts from.

A fine-tuning run is an ordinary training run on the target participant's training sessions
plus :class:`BackboneFinetuning`, which loads a pretrained backbone (``finetune.from``) before
the optimiser is built and, with ``finetune.mode=head``, freezes everything but the head. The
backbone comes from a pretraining *job* that the fine-tuning jobs depend on (planned by
:class:`painnet.experiments.studies.Finetune`), or from ``finetune.from=PATH`` (no pretraining):

- supervised (``experiment=finetune``): ConvAttn trained on the pooled other participants
  (:func:`pretrain_split`, a :class:`painnet.data.splits.CrossSubject` split with the target as
  test participant), once per target;
- self-supervised (``experiment=pretrain``, a ``finetune.pretrain`` node): masked
  reconstruction (:mod:`painnet.pretrain.task`) on every run the fold may read
  (:mod:`painnet.pretrain.data`): one job per fold (``scope: fold``) or per target
  (``scope: others``). :func:`ssl_pretrain_split` and :func:`ssl_pretrain_changes` make it.

Every fine-tuning job records in ``finetune_from.json`` the checkpoint it started from and a
digest of the net's weights right after loading (:func:`weights_digest`), so the start from the
pretrained backbone can be checked against the checkpoint (:func:`checkpoint_digest`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from painnet.atomic import write_text_atomic

log = logging.getLogger(__name__)

MODES = ("all", "head")
FROM_RECORD = "finetune_from.json"
SSL_TASK = "painnet.pretrain.task.MaskedPretrainTask"
SSL_DATA = "painnet.pretrain.data.PretrainDataModule"
SSL_SPLIT = "painnet.pretrain.data.PretrainSplit"


class BackboneFinetuning(Callback):
    """Load ``ckpt`` into the task's net at ``setup`` of fit; ``mode=head`` freezes the backbone.

    ``setup`` runs before Lightning configures the optimiser, so a frozen backbone's parameters
    never reach it. With ``record_dir`` the start is recorded there (``finetune_from.json``).
    """

    def __init__(self, ckpt: str | Path, mode: str = "all", record_dir: str | Path | None = None):
        if mode not in MODES:
            raise ValueError(f"finetune.mode must be one of {MODES}, got {mode!r}")
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"finetune.from={ckpt}: no such checkpoint")
        self.ckpt = str(ckpt)
        self.mode = mode
        self.record_dir = Path(record_dir) if record_dir is not None else None
        self._applied = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self._applied:
            return
        pl_module.load_backbone_from(self.ckpt)
        if self.record_dir is not None and trainer.is_global_zero:
            record = {
                "from": self.ckpt,
                "mode": self.mode,
                "net_digest": weights_digest(pl_module.net.state_dict()),
            }
            text = json.dumps(record, indent=2) + "\n"
            write_text_atomic(self.record_dir / FROM_RECORD, text, mkdir=True)
        if self.mode == "head":
            pl_module.freeze_backbone()
        self._applied = True
        log.info("fine-tuning from %s (mode %s)", self.ckpt, self.mode)


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict (keys sorted; ``_orig_mod.`` prefixes of torch.compile dropped)."""
    h = hashlib.sha256()
    plain = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    for key in sorted(plain):
        h.update(key.encode())
        h.update(plain[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def checkpoint_digest(ckpt: str | Path) -> str:
    """:func:`weights_digest` of the ``net.*`` weights of a Lightning checkpoint."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return weights_digest({k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")})


# --------------------------------------------------------------------------- supervised


def pretrain_split(subject: str, subjects: list[str], n_val: int, seed: int) -> dict:
    """The split config of the supervised pretraining job of ``subject``: every other
    participant."""
    others = [s for s in sorted(subjects) if s != subject]
    if not others:
        raise ValueError(
            f"fine-tuning sub-{subject} needs other participants to pretrain on; the dataset "
            f"holds only {sorted(subjects)}"
        )
    return {
        "_target_": "painnet.data.splits.CrossSubject",
        "train_subjects": others,
        "test_subjects": [subject],
        "n_val": int(n_val),
        "seed": int(seed),
    }


# --------------------------------------------------------------------------- self-supervised


def ssl_pretrain_split(cfg: DictConfig, subject: str, fold: int, n_val: int) -> dict:
    """The split config of the self-supervised pretraining job for ``subject``'s ``fold``
    (``scope: others``: the fold is irrelevant, every session of ``subject`` is held out).
    ``n_val`` must be the fine-tuning split's, so the fold's validation session is excluded."""
    pre = cfg.finetune.pretrain
    scope = str(pre.get("scope", "fold"))
    return {
        "_target_": SSL_SPLIT,
        "subject": subject,
        "scope": scope,
        "fold": int(fold) if scope == "fold" else None,
        "n_val": int(n_val),
        "monitor": int(pre.get("monitor", 1)),
        "seed": int(cfg.seed),
    }


def ssl_pretrain_changes(cfg: DictConfig) -> dict:
    """Config changes that turn a fine-tuning job's config into its pretraining job's: the
    model's net under :class:`painnet.pretrain.task.MaskedPretrainTask`, the data under
    :class:`painnet.pretrain.data.PretrainDataModule`, checkpoints chosen on ``val/loss``."""
    pre = cfg.finetune.pretrain
    model = OmegaConf.to_container(cfg.model, resolve=False)
    model.update(
        name=f"{model.get('name', 'model')}_ssl-{pre.get('mask', 'parcel')}",
        _target_=SSL_TASK,
        mask=str(pre.get("mask", "parcel")),
        mask_ratio=float(pre.get("mask_ratio", 0.3)),
    )
    model.pop("keep_initial", None)  # a pain-head option: nothing scores the head here
    if pre.get("recon_frames") is not None:
        model["recon_frames"] = int(pre.recon_frames)
    tasks = [str(t) for t in (pre.get("tasks") or [cfg.data.get("task", "rating")])]
    changes = {
        "finetune": None,
        "model": model,
        "data._target_": SSL_DATA,
        "data.pretrain_tasks": tasks,
        "trainer.max_epochs": int(pre.get("epochs", 15)),
    }
    for name in ("model_checkpoint", "early_stopping"):
        if (cfg.get("callbacks") or {}).get(name):
            changes[f"callbacks.{name}.monitor"] = "val/loss"
            changes[f"callbacks.{name}.mode"] = "min"
    return changes
