"""Per-participant fine-tuning as a Lightning callback.

Fine-tuning starts a run from a model pretrained on the *other* participants: the pretraining is
a job of its own (see :class:`painnet.experiments.studies.Finetune`, split
:class:`painnet.data.splits.CrossSubject` with the target as test participant, so the target's
sessions are never trained on), and the fine-tuning jobs depend on it. The fine-tuning run is an
ordinary training run on the target's training sessions plus this callback, which loads the
pretrained weights (``finetune.pretrained_ckpt``) before the optimiser is built and, with
``finetune.mode=head``, freezes everything but the head.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

MODES = ("all", "head")


class BackboneFinetuning(Callback):
    """Load ``ckpt`` into the task's net at ``setup`` of fit; ``mode=head`` freezes the backbone.

    ``setup`` runs before Lightning configures the optimiser, so a frozen backbone's parameters
    never reach it.
    """

    def __init__(self, ckpt: str | Path, mode: str = "all"):
        if mode not in MODES:
            raise ValueError(f"finetune.mode must be one of {MODES}, got {mode!r}")
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"finetune.pretrained_ckpt={ckpt}: no such checkpoint")
        self.ckpt = str(ckpt)
        self.mode = mode
        self._applied = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self._applied:
            return
        pl_module.load_backbone_from(self.ckpt)
        if self.mode == "head":
            pl_module.freeze_backbone()
        self._applied = True
        log.info("fine-tuning from %s (mode %s)", self.ckpt, self.mode)


def pretrain_split(subject: str, subjects: list[str], n_val: int, seed: int) -> dict:
    """The split config of the pretraining job of ``subject``: every other participant."""
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
