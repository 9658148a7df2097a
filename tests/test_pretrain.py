"""Self-supervised pretraining (experiment=pretrain) and fine-tuning from its backbone.

The promise under test: a pretraining job reads every run it may -- rest runs, the other
participants' sessions, the target's training sessions of the fold -- and never a held-out
(test or validation) session of the participant being decoded; the fine-tuning starts from
exactly the pretrained weights; and the masked reconstruction actually learns.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate

from painnet.data.splits import make_split
from painnet.experiments.finetune import checkpoint_digest
from painnet.experiments.runner import dataset_sessions, make_study
from painnet.models.convattn import ConvAttnDecoder
from painnet.pretrain.data import PretrainSessions, PretrainSplit, read_run_list
from painnet.pretrain.task import VAL_MASK_SEED, MaskedPretrainTask
from painnet.task import PainDecoderTask

REPO = Path(__file__).resolve().parents[1]
TINY_SESSIONS = {"01": ["01", "02", "03"], "02": ["01", "02", "03"]}
# Three participants, four sessions each, one rating and one rest run per session.
SEVERAL = (
    "data=tiny",
    "+data.simulate.n_subjects=3",
    "+data.simulate.n_sessions=4",
    "+data.simulate.n_runs=1",
    "+data.simulate.rest_runs=1",
)


def held_out(job, sessions) -> set:
    """The test and validation sessions of a fine-tuning job's split."""
    split = make_split(job.split, sessions)
    return set(split.test + split.val)


# --------------------------------------------------------------------------- the run set


@pytest.mark.parametrize("scope", ["fold", "others"])
def test_pretraining_never_reads_a_held_out_session_of_the_target(make_cfg, scope):
    cfg = make_cfg(*SEVERAL, "experiment=pretrain", f"finetune.pretrain.scope={scope}")
    sessions = dataset_sessions(cfg)  # simulates the dataset
    assert {s: len(v) for s, v in sessions.items()} == {"01": 4, "02": 4, "03": 4}
    jobs = make_study(cfg).plan_all(cfg, sessions)
    tuned = [j for j in jobs if j.group == ""]
    pretraining = [j for j in jobs if j.group == "pretrain"]
    assert len(tuned) == 3 * 4
    assert len(pretraining) == (3 * 4 if scope == "fold" else 3)

    for job in tuned:
        (dependency,) = job.depends_on
        pre = dependency.job
        dm = instantiate(pre.cfg.data, split=pre.cfg.split, _recursive_=False)
        _, chosen = dm.pretrain_files()
        read = {f.key for f, _ in chosen}
        read_sessions = {key.session_key for key in read}
        subject = job.meta["subject"]

        assert not read_sessions & held_out(job, sessions)
        own = {k for k in read_sessions if k[0] == subject}
        train = set(make_split(job.split, sessions).train)
        assert own == (train if scope == "fold" else set())
        others = {(s, ses) for s in sessions if s != subject for ses in sessions[s]}
        assert {k for k in read_sessions if k[0] != subject} == others
        assert {key.task for key in read} == {"rating", "rest"}  # rest runs are read too
        assert all(f.ratings is None for f, _ in chosen if f.key.task == "rest")


def test_a_listed_task_the_dataset_lacks_is_skipped_with_one_warning_per_loop(
    make_cfg, caplog, monkeypatch
):
    import painnet.pretrain.data as pretrain_data

    monkeypatch.setattr(pretrain_data, "_WARNED_MISSING_TASKS", set())
    cfg = make_cfg("data=tiny", "experiment=pretrain")  # tiny has no rest runs
    sessions = dataset_sessions(cfg)
    pretraining = [j for j in make_study(cfg).plan_all(cfg, sessions) if j.group == "pretrain"]
    with caplog.at_level("WARNING", logger="painnet.pretrain.data"):
        for job in pretraining[:2]:
            dm = instantiate(job.cfg.data, split=job.cfg.split, _recursive_=False)
            _, chosen = dm.pretrain_files()
            assert {f.key.task for f, _ in chosen} == {"rating"}
    assert len([r for r in caplog.records if "lists 'rest'" in r.getMessage()]) == 1


def test_a_target_session_without_rating_runs_is_never_read():
    roles = PretrainSessions(
        "p", "01", train=(("01", "02"), ("02", "01")), val=(("02", "02"),), excluded=(("01", "01"),)
    )
    assert roles.role(("01", "01")) is None  # held out
    assert roles.role(("01", "09")) is None  # the target's, unknown to the split: not read
    assert roles.role(("02", "09")) == "train"  # another participant's rest-only session
    assert roles.role(("02", "02")) == "val"
    with pytest.raises(ValueError, match="held-out sessions"):
        PretrainSessions("p", "01", (("01", "01"),), (("02", "01"),), (("01", "01"),))


def test_planning_finetune_from_a_given_checkpoint_plans_no_pretraining(make_cfg):
    cfg = make_cfg("experiment=pretrain", "finetune.from=/ckpts/ssl.ckpt")
    jobs = make_study(cfg).plan_all(cfg, TINY_SESSIONS)
    assert len(jobs) == 6 and all(j.group == "" and not j.depends_on for j in jobs)
    assert {str(j.cfg.finetune["from"]) for j in jobs} == {"/ckpts/ssl.ckpt"}


def test_a_sweep_job_depends_on_the_pretraining_the_loop_plans_for_its_fold(make_cfg):
    cfg = make_cfg("experiment=pretrain", "split.subject=02", "split.fold=1")
    study = make_study(cfg)
    (dependency,) = study.sweep_job(cfg, TINY_SESSIONS).depends_on
    planned = {j.name for j in study.plan_all(cfg, TINY_SESSIONS) if j.group == "pretrain"}
    assert dependency.job.name in planned
    assert dependency.job.split_name == "pretrain-fold_sub-02_fold-1"


def test_pretrain_split_needs_other_participants_and_a_known_scope():
    with pytest.raises(ValueError, match="needs other participants"):
        PretrainSplit("01").make({"01": ["01", "02", "03"]})
    with pytest.raises(ValueError, match="finetune.pretrain.scope"):
        PretrainSplit("01", scope="everything").make(TINY_SESSIONS)


# --------------------------------------------------------------------------- end to end


def test_cli_pretrains_without_held_out_sessions_and_finetunes_from_its_weights(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "painnet.train", "experiment=pretrain", "data=tiny",
        "+data.simulate.rest_runs=1", "logger=none", "eval.n_boot=20", "eval.plots=false",
        "trainer.max_epochs=1", "finetune.pretrain.epochs=2", "trainer.enable_progress_bar=false",
        "study.folds=[0,1]", f"paths.data_dir={tmp_path / 'data'}",
        f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    tuned = sorted(run_dir.glob("convattn_ft-all-*/loso_sub-*_fold-*"))
    assert len(tuned) == 2 * 2
    pretrain_dirs = set()
    for job in tuned:
        split = json.loads((job / "split.json").read_text())
        held = {tuple(k) for k in split["test"] + split["val"]}
        ckpt = Path(yaml.safe_load((job / "job.yaml").read_text())["finetune"]["from"])
        pre = ckpt.parents[1]
        pretrain_dirs.add(pre)
        assert pre.parent.parent == run_dir / "pretrain" and (pre / "DONE.json").is_file()
        runs = read_run_list(pre)
        assert not set(zip(runs.subject, runs.session)) & held
        assert {"rating", "rest"} == set(runs.task)
        assert not runs[runs.role == "train"].targets_read.any()  # labels never trained on
        started = json.loads((job / "finetune_from.json").read_text())
        assert started["from"] == str(ckpt)
        assert started["net_digest"] == checkpoint_digest(ckpt)  # the pretrained weights
    assert len(pretrain_dirs) == 2 * 2  # scope fold: one pretraining per fold


# --------------------------------------------------------------------------- the task


def small_task(mask: str = "parcel", **kw) -> MaskedPretrainTask:
    net = functools.partial(ConvAttnDecoder, embed_dim=16, n_heads=2, n_layers=1, **kw)
    optimizer = functools.partial(torch.optim.AdamW, lr=3e-3)
    return MaskedPretrainTask(net, optimizer, mask=mask, n_parcels=12, n_frames=11)


@pytest.mark.parametrize("mask", ["parcel", "frame"])
def test_masked_entries_are_hidden_and_only_they_are_scored(mask, monkeypatch):
    torch.manual_seed(0)
    task = small_task(mask)
    k = task.recon_frames
    assert k == 11  # the receptive field (13 frames) clipped to the window
    x = torch.randn(4, 12, 11)
    hidden = task.draw_mask(x)
    counts = hidden[:, :, 0].sum(1) if mask == "parcel" else hidden[:, 0, :].sum(1)
    assert (counts == round(0.3 * (12 if mask == "parcel" else k))).all()
    corrupted = task.corrupt(x, hidden)
    assert (corrupted[..., -k:][hidden] == 0).all()
    assert torch.equal(corrupted[..., -k:][~hidden], x[..., -k:][~hidden])
    if mask == "parcel":  # a hidden parcel loses its whole time course
        assert (corrupted[hidden[:, :, 0]] == 0).all()
    # Errors outside the mask do not count: exact on masked entries, wrong elsewhere -> 0.
    perfect = x[..., -k:].clone()
    perfect[~hidden] += 5.0
    monkeypatch.setattr(task, "reconstruct", lambda _: perfect)
    assert task.masked_loss(x, hidden).item() == 0.0


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_reconstruction_loss_falls_and_the_backbone_loads_for_finetuning(
    make_cfg, tiny_root, tmp_path
):
    import lightning as L

    cfg = make_cfg("data=tiny", "data._target_=painnet.pretrain.data.PretrainDataModule")
    split = {"_target_": "painnet.pretrain.data.PretrainSplit", "subject": "01", "fold": 0}
    dm = instantiate(cfg.data, split=split, _recursive_=False)
    dm.prepare_data()
    dm.setup("fit")
    assert {dm.runs[i].key.subject for i in dm.runs_in("train")} >= {"02"}
    L.seed_everything(0)
    task = small_task("frame")  # learns fastest; masked parcels need ~3x the epochs on tiny

    def trainer(epochs: int):
        return L.Trainer(
            max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip

    before = trainer(1).validate(task, datamodule=dm, verbose=False)[0]["val/loss"]
    fit = trainer(4)
    fit.fit(task, datamodule=dm)
    after = fit.validate(task, datamodule=dm, verbose=False)[0]["val/loss"]
    x = next(iter(dm.val_dataloader()))["x"]
    hidden = task.draw_mask(x, torch.Generator().manual_seed(VAL_MASK_SEED))
    predict_zero = float((x[..., -task.recon_frames :][hidden] ** 2).mean())
    # Seen: 1.31 -> 0.51 (zero-prediction baseline 1.02): learned, not just a shrunken output.
    assert after < 0.7 * before and after < 0.7 * predict_zero, (before, after, predict_zero)

    path = tmp_path / "ssl.ckpt"
    fit.save_checkpoint(path)
    net = functools.partial(ConvAttnDecoder, embed_dim=16, n_heads=2, n_layers=1)
    decoder = PainDecoderTask(net, torch.optim.AdamW, n_parcels=12, n_frames=11)
    decoder.load_backbone_from(path)  # the reconstruction head stays behind
    for name, value in task.net.state_dict().items():
        assert torch.equal(decoder.net.state_dict()[name], value)
    wider = functools.partial(ConvAttnDecoder, embed_dim=32, n_heads=2, n_layers=1)
    mismatched = PainDecoderTask(wider, torch.optim.AdamW, n_parcels=12, n_frames=11)
    with pytest.raises(ValueError, match=r"ssl\.ckpt do not fit this net"):
        mismatched.load_backbone_from(path)
