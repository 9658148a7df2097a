"""Per-participant fine-tuning: pretrain on the other participants, then adapt to the target.

The pretraining split holds only sessions of the *other* participants (cross-subject split with
the target as test subject), so the target's held-out session is never seen. Fine-tuning then
trains on the target's own training sessions exactly as a from-scratch run would, starting from
the pretrained weights: all of them (``mode: all``) or only the head (``mode: head``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from painnet.data.datamodule import PainDataModule
from painnet.data.splits import sessions_by_subject

log = logging.getLogger(__name__)


def target_subject(dm: PainDataModule) -> str:
    subjects = {subject for subject, _ in dm.split.test}
    if len(subjects) != 1:
        raise ValueError(
            f"fine-tuning needs a split with one test participant, got {sorted(subjects)}"
        )
    return subjects.pop()


def pretrain_split(cfg: DictConfig, dm: PainDataModule) -> dict:
    target = target_subject(dm)
    everyone = sessions_by_subject([f.key.session_key for f in dm._discover()])
    others = [s for s in sorted(everyone) if s != target]
    if not others:
        raise ValueError(f"fine-tuning needs other participants than {target} to pretrain on")
    return {
        "kind": "cross_subject",
        "train_subjects": others,
        "test_subjects": [target],
        "n_val": int(cfg.finetune.get("n_val", 1)),
        "seed": int(cfg.seed),
    }


def pretrain(cfg: DictConfig, dm: PainDataModule, output_dir: Path) -> Path:
    """Train on the pooled other participants; returns the best checkpoint path."""
    from painnet.experiments.single import build_datamodule, build_task, build_trainer

    pre_cfg = OmegaConf.merge(cfg, {"trainer": {"max_epochs": int(cfg.finetune.pretrain_epochs)}})
    pre_dm = build_datamodule(pre_cfg, split=pretrain_split(cfg, dm))
    task = build_task(pre_cfg, pre_dm)
    pre_dir = output_dir / "pretrain"
    if (pre_cfg.get("callbacks") or {}).get("model_checkpoint"):
        pre_cfg.callbacks.model_checkpoint.dirpath = str(pre_dir / "checkpoints")
    trainer = build_trainer(pre_cfg, pre_dir, with_loggers=False)
    trainer.fit(task, datamodule=pre_dm)
    # Without a checkpoint callback (callbacks=none) the last weights are the pretrained ones.
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best:
        best = str(pre_dir / "checkpoints" / "last.ckpt")
        trainer.save_checkpoint(best)
    log.info("pretrained on %s: %s", pre_dm.split.name, best)
    return Path(best)


def prepare_finetuning(cfg: DictConfig, task, dm: PainDataModule, output_dir: Path) -> Path:
    """Load pretrained weights into ``task`` (pretraining first if no checkpoint is given)."""
    ft = cfg.finetune
    ckpt = ft.get("pretrained_ckpt")
    ckpt = Path(ckpt) if ckpt else pretrain(cfg, dm, Path(output_dir))
    task.load_backbone_from(str(ckpt))
    mode = ft.get("mode", "all")
    if mode == "head":
        task.freeze_backbone()
    elif mode != "all":
        raise ValueError(f"finetune.mode must be 'all' or 'head', got {mode!r}")
    return ckpt
