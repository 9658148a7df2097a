"""Experiments end to end on the tiny dataset (2 participants × 3 sessions × 2 runs).

Every experiment config is composed from conf/ and run for real (few epochs, few bootstrap
draws); the tests check what a researcher relies on: one row per participant × model, every
session held out once, identical test frames across compared models, resumable reruns.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from painnet.experiments import aggregate as aggregate_module
from painnet.experiments.aggregate import aggregate
from painnet.experiments.jobs import tracking_overrides
from painnet.experiments.learning_curve import learning_curve, size_summary
from painnet.experiments.runner import make_study, run_experiment, run_sweep_job

REPO = Path(__file__).resolve().parents[1]
FAST = (
    "data=tiny",
    "logger=none",
    "eval.n_boot=50",
    "eval.plots=false",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "torch_threads=1",
)
TINY_SESSIONS = {"01": ["01", "02", "03"], "02": ["01", "02", "03"]}


def read_predictions(job_dir: Path) -> pd.DataFrame:
    return pd.read_csv(job_dir / "predictions.csv", dtype={"subject": str, "session": str})


def job_dir(experiment: Path, model: str, split: str) -> Path:
    """The folder of ``model``'s job on ``split``: ``<model>-<hash>/<split>``."""
    (found,) = experiment.glob(f"{model}-??????/{split}")
    return found


def plan_jobs(cfg, sessions):
    return make_study(cfg).plan_all(cfg, sessions)


# --------------------------------------------------------------------------- planning


def test_plans_cover_every_fold_model_and_training_size(make_cfg):
    within = make_cfg("experiment=within_subject", "study.models=[ridge,convattn]")
    jobs = plan_jobs(within, TINY_SESSIONS)
    assert len(jobs) == 2 * 3 * 2
    names = {(j.model, j.split_name) for j in jobs}
    assert names >= {("ridge", "loso_sub-01_fold-0"), ("convattn", "loso_sub-02_fold-2")}
    assert all(j.name == f"{j.variant}/{j.split_name}" for j in jobs)

    size = make_cfg("experiment=data_size", "study.repeats=4", "study.subjects=[01]")
    grid = {
        (j.meta["n_train"], j.meta["repeat"], j.meta["fold"])
        for j in plan_jobs(size, TINY_SESSIONS)
    }
    # n = 1 … S−2 = 1 with 3 sessions; every repeat in every outer fold
    assert grid == {(1, r, f) for r in range(4) for f in range(3)}

    paper = {"01": [f"{i:02d}" for i in range(1, 24)]}
    ns = {j.meta["n_train"] for j in plan_jobs(size, paper)}
    assert ns == set(range(1, 22))  # 23 sessions: 1 … 21


def test_bad_experiment_settings_fail_with_clear_errors(make_cfg):
    with pytest.raises(ValueError, match="not a deep model"):
        plan_jobs(make_cfg("experiment=finetune", "study.models=[ridge]"), TINY_SESSIONS)
    with pytest.raises(ValueError, match="study.subjects"):
        plan_jobs(make_cfg("experiment=within_subject", "study.subjects=[07]"), TINY_SESSIONS)
    with pytest.raises(ValueError, match="study.n_train"):
        plan_jobs(make_cfg("experiment=data_size", "study.n_train=[5]"), TINY_SESSIONS)
    with pytest.raises(ValueError, match="no model config"):
        plan_jobs(make_cfg("experiment=within_subject", "study.models=[nope]"), TINY_SESSIONS)


def test_wandb_runs_are_grouped_by_experiment_participant_and_model(make_cfg):
    cfg = make_cfg("experiment=within_subject", "logger=wandb", "tags=[pilot]")
    tracking_overrides(cfg, {"experiment": "within_subject", "subject": "02", "name": "x"}, "ridge")
    assert cfg.logger.wandb.group == "within_subject_sub-02"
    assert cfg.logger.wandb.job_type == "ridge"
    assert set(cfg.logger.wandb.tags) == {"within_subject", "ridge", "sub-02", "pilot"}


# --------------------------------------------------------------------------- within-subject


def test_within_subject_loop_aggregates_and_a_rerun_skips_finished_jobs(
    make_cfg, tiny_root, tmp_path
):
    exp = tmp_path / "within"
    cfg = make_cfg(*FAST, "experiment=within_subject", "study.models=[ridge,convattn]")
    first = run_experiment(cfg, exp)
    assert first["ran"] == 12 and first["skipped"] == 0

    within = first["tables"]["within_subject"]
    assert len(within) == 4  # 2 participants × 2 models
    assert set(zip(within.subject, within.model, strict=True)) == {
        (s, m) for s in ("01", "02") for m in ("convattn", "ridge")
    }
    assert (within.n_sessions == 3).all() and (within.n_folds == 3).all()
    assert within[["r_1min", "auc_1min", "r_1min_p"]].notna().all().all()
    saved = pd.read_csv(exp / "aggregate" / "within_subject.csv", dtype={"subject": str})
    assert len(saved) == 4

    # the pooled table of one participant holds each of its sessions exactly once per model
    for model in ("ridge", "convattn"):
        sessions = [
            read_predictions(job_dir(exp, model, f"loso_sub-01_fold-{k}")).session.unique().tolist()
            for k in range(3)
        ]
        assert sorted(s for fold in sessions for s in fold) == ["01", "02", "03"]

    comparison = first["tables"]["comparison"]
    assert set(comparison.model_a) == {"convattn"} and set(comparison.model_b) == {"ridge"}
    assert len(comparison) == 2 * 4  # per participant, one pair, 4 bin sizes
    assert comparison[["diff", "ci_low", "ci_high", "p"]].notna().all().all()

    # rerun: nothing retrains, outputs untouched
    marker = job_dir(exp, "ridge", "loso_sub-02_fold-1") / "DONE.json"
    stamp = marker.stat().st_mtime_ns
    again = run_experiment(cfg, exp)
    assert again["ran"] == 0 and again["skipped"] == 12
    assert marker.stat().st_mtime_ns == stamp

    # an interrupted job (no DONE.json yet) is the only one trained again
    marker.unlink()
    third = run_experiment(cfg, exp)
    assert third["ran"] == 1
    assert [r.directory for r in third["jobs"] if r.ran] == [marker.parent]


def test_sweep_jobs_match_the_loop_and_aggregate_from_the_command_line(
    make_cfg, tiny_root, tmp_path
):
    sweep = tmp_path / "sweep"
    for subject, fold in [(s, f) for s in ("01", "02") for f in range(3)]:
        cfg = make_cfg(
            *FAST,
            "experiment=within_subject",
            "model=ridge",
            f"split.subject={subject}",
            f"split.fold={fold}",
        )
        run_sweep_job(cfg, sweep)

    job = job_dir(sweep, "ridge", "loso_sub-02_fold-1")
    # DONE.json (the "finished" marker) appears last: its ctime is not older than any output's
    others = [p for p in job.iterdir() if p.is_file() and p.name != "DONE.json"]
    assert max(p.stat().st_ctime_ns for p in others) <= (job / "DONE.json").stat().st_ctime_ns
    assert not (job / ".staging").exists() and not (job / ".lock").exists()

    aggregate_module.main([str(sweep), "--n-boot", "50", "--no-plots"])
    table = pd.read_csv(sweep / "aggregate" / "within_subject.csv", dtype={"subject": str})
    assert list(table.subject) == ["01", "02"] and (table.n_sessions == 3).all()

    loop = tmp_path / "loop"
    run_experiment(make_cfg(*FAST, "experiment=within_subject", "model=ridge"), loop)
    a = read_predictions(job)
    b = read_predictions(job_dir(loop, "ridge", "loso_sub-02_fold-1"))
    assert job.relative_to(sweep) == job_dir(loop, "ridge", "loso_sub-02_fold-1").relative_to(loop)
    np.testing.assert_allclose(a.prediction, b.prediction)


# --------------------------------------------------------------------------- cross-subject


def test_cross_subject_tests_every_session_of_the_other_participant(make_cfg, tiny_root, tmp_path):
    exp = tmp_path / "cross"
    cfg = make_cfg(*FAST, "experiment=cross_subject", "model=ridge", "eval.plots=true")
    tables = run_experiment(cfg, exp)["tables"]
    cross = tables["cross_subject"]
    assert set(zip(cross.train_subject, cross.test_subject, strict=True)) == {
        ("01", "02"),
        ("02", "01"),
    }
    assert (cross.n_sessions == 3).all()
    job = job_dir(exp, "ridge", "cross_train-01_test-02")
    split = json.loads((job / "split.json").read_text())
    assert sorted(s for _, s in split["train"] + split["val"]) == ["01", "02", "03"]
    table = read_predictions(job)
    assert set(table.subject) == {"02"} and sorted(table.session.unique()) == ["01", "02", "03"]
    group = exp / "aggregate" / "cross_subject" / "train_subject-01_subject-02_model-ridge"
    assert (group / "scatter_1min.png").is_file()


# --------------------------------------------------------------------------- data size


def test_data_size_evaluates_the_n_by_repeat_grid(make_cfg, tiny_root, tmp_path):
    exp = tmp_path / "size"
    cfg = make_cfg(
        *FAST,
        "experiment=data_size",
        "model=ridge",
        "study.subjects=[01]",
        "study.n_val=0",
        "study.n_train=[1,2]",
        "study.repeats=2",
        "study.modes=[random,first]",
    )
    tables = run_experiment(cfg, exp)["tables"]
    repeats = tables["data_size_repeats"]
    grid = set(zip(repeats["mode"], repeats.n_train, repeats.repeat, strict=True))
    assert grid == {("random", 1, 0), ("random", 1, 1), ("random", 2, 0), ("random", 2, 1)} | {
        ("first", 1, 0),
        ("first", 2, 0),
    }
    # each (n, repeat) pools its 3 outer folds: every session held out once
    assert (repeats.n_folds == 3).all() and (repeats.n_sessions == 3).all()
    # classical models train on exactly n sessions (no validation session folded in)
    for job in job_dir(exp, "ridge", "*fold-0_n-1_rep-0_random").parent.iterdir():
        split = json.loads((job / "split.json").read_text())
        n = int(job.name.split("_n-")[1].split("_")[0])
        assert len(split["train"]) + len(split["val"]) == n

    curve = tables["data_size_curve"]
    random_1min = curve[(curve["mode"] == "random") & (curve.bin_size == "1min")]
    assert list(random_1min.n_train) == [1, 2] and (random_1min.n_repeats == 2).all()
    summary = tables["data_size_summary"]
    assert {"min_n_significant", "slope", "slope_p"} <= set(summary.columns)
    assert np.isfinite(summary.loc[summary["mode"] == "random", "slope"]).all()
    # aggregating again (e.g. from the command line) reproduces the tables, and draws the curves
    again = aggregate(exp, n_boot=50, seed=0, plots=True)
    pd.testing.assert_frame_equal(again["data_size_summary"], summary)
    assert (exp / "aggregate" / "learning_curve_sub-01_ridge_random.png").is_file()
    assert (exp / "aggregate" / "learning_curve_sub-01_ridge_first.png").is_file()


def test_learning_curve_finds_the_smallest_significant_n_and_the_slope():
    rows = []
    for n in (1, 2, 3, 4):
        for rep in range(4):
            r = 0.1 * n + 0.01 * (rep - 1.5)
            # significant in 1 of 4 repeats at n = 2, in 3 of 4 from n = 3 on
            p = 0.01 if (n >= 3 and rep < 3) or (n == 2 and rep == 0) else 0.2
            rows.append(
                dict(
                    subject="01",
                    model="m",
                    mode="random",
                    n_train=n,
                    repeat=rep,
                    r_1min=r,
                    r_1min_p=p,
                    auc_1min=0.6,
                )
            )
    repeats = pd.DataFrame(rows)
    summary = size_summary(repeats, bin_sizes=("1min",))
    assert summary.min_n_significant.item() == 3
    assert summary.slope.item() == pytest.approx(0.1)
    curve = learning_curve(repeats, bin_sizes=("1min",))
    assert list(curve.frac_significant) == [0.0, 0.25, 0.75, 0.75]
    assert (curve.r_ci_low < curve.r_mean).all() and (curve.r_mean < curve.r_ci_high).all()


# --------------------------------------------------------------------------- fine-tuning


def test_finetune_pretrains_once_per_participant_on_identical_folds(make_cfg, tiny_root, tmp_path):
    exp = tmp_path / "finetune"
    cfg = make_cfg(*FAST, "experiment=finetune", "finetune.pretrain_epochs=1", "study.folds=[0,2]")
    outcome = run_experiment(cfg, exp)
    pretrain_jobs = [r for r in outcome["jobs"] if r.job.group == "pretrain"]
    assert len(pretrain_jobs) == 2  # one per participant, not one per fold
    assert outcome["ran"] == 2 + 2 * 2 * 2  # pretraining + participants × folds × arms

    for subject in ("01", "02"):
        other = "02" if subject == "01" else "01"
        pre = job_dir(exp / "pretrain", "convattn", f"cross_train-{other}_test-{subject}")
        ckpt = pre / "checkpoints" / "best.ckpt"
        assert ckpt.is_file()
        for fold in (0, 2):
            tuned = job_dir(exp, "convattn_ft-all", f"loso_sub-{subject}_fold-{fold}")
            scratch = job_dir(exp, "convattn", f"loso_sub-{subject}_fold-{fold}")
            job = (tuned / "job.yaml").read_text()
            assert f"from: {ckpt}" in job
            a, b = read_predictions(tuned), read_predictions(scratch)
            keys = ["subject", "session", "run", "frame"]
            pd.testing.assert_frame_equal(a[keys], b[keys])
            np.testing.assert_array_equal(a.rating, b.rating)
            assert set(a.model) == {"convattn_ft-all"} and set(b.model) == {"convattn"}

    comparison = outcome["tables"]["comparison"]
    assert set(comparison.model_a) == {"convattn_ft-all"}
    assert set(comparison.model_b) == {"convattn"}
    within = outcome["tables"]["within_subject"]
    assert len(within) == 4 and (within.n_sessions == 2).all()


# --------------------------------------------------------------------------- errors, CLI


def test_aggregate_refuses_a_folder_without_finished_jobs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such experiment folder"):
        aggregate(tmp_path / "missing")
    (tmp_path / "half" / "job").mkdir(parents=True)  # a killed job: outputs, no DONE.json
    (tmp_path / "half" / "job" / "predictions.csv").write_text("subject\n")
    with pytest.raises(FileNotFoundError, match="no finished job folder"):
        aggregate(tmp_path / "half")


@pytest.mark.slow
def test_aggregate_logs_tables_and_plots_to_one_wandb_run(
    make_cfg, tiny_root, tmp_path, monkeypatch
):
    exp = tmp_path / "cross"
    run_experiment(make_cfg(*FAST, "experiment=cross_subject", "model=ridge"), exp)
    monkeypatch.setenv("WANDB_MODE", "offline")
    aggregate(exp, n_boot=20, plots=True, logger_cfg={"wandb": {"offline": True}})
    run = next((exp / "aggregate" / "wandb").glob("offline-run-*"))
    assert list((run / "files" / "media" / "table").rglob("cross_subject*.table.json"))


@pytest.mark.slow
def test_train_py_multirun_aggregates_when_the_sweep_ends(tiny_root, data_dir, cache_dir, tmp_path):
    sweep = tmp_path / "multirun"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "experiment=within_subject",
        *FAST,
        "model=ridge",
        "split.subject=01,02",
        "split.fold=range(3)",
        f"paths.data_dir={data_dir}",
        f"paths.cache_dir={cache_dir}",
        f"hydra.sweep.dir={sweep}",
    ]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    table = pd.read_csv(sweep / "aggregate" / "within_subject.csv", dtype={"subject": str})
    assert list(table.subject) == ["01", "02"] and (table.n_folds == 3).all()


# --------------------------------------------------------------------------- quality control

QC_COLUMNS = ["run", "bold", "n_frames", "n_kept", "n_frames_non_finite", "n_values_non_finite"]


def test_every_job_publishes_its_runs_quality_control_table(make_cfg, tiny_root, tmp_path):
    """qc.tsv: one row per run of the job's split (train, validation and test sessions) with
    its frames, kept frames and frames/values censored for non-finite voxels."""
    from painnet.experiments.single import run_single

    out = tmp_path / "job"
    cfg = make_cfg(*FAST, "model=ridge", "split=loso", "split.fold=0", output_dir=out)
    run_single(cfg, out)
    qc = pd.read_csv(out / "qc.tsv", sep="\t")
    assert list(qc.columns) == QC_COLUMNS
    assert len(qc) == 3 * 2  # sub-01: 3 sessions x 2 runs
    assert qc["run"].str.startswith("sub-01_").all()
    assert (qc.n_kept <= qc.n_frames).all() and (qc.n_kept > 0).all()
    assert (qc.n_frames_non_finite == 0).all()


def test_frames_censored_for_non_finite_voxels_are_counted_and_logged(
    make_cfg, tiny_root, tmp_path, caplog
):
    import shutil

    import nibabel as nib
    from hydra.utils import instantiate

    root = shutil.copytree(tiny_root, tmp_path / "ds")
    bold = next(root.rglob("sub-01_ses-01_task-rating_run-1_*_desc-preproc_bold.nii.gz"))
    img = nib.load(bold)
    data = np.asarray(img.dataobj).astype(np.float32)
    labels = np.asarray(nib.load(next(root.rglob("*_dseg.nii.gz"))).dataobj)
    i, j, k = np.argwhere(labels > 0)[0]  # a voxel inside a parcel
    data[i, j, k, 100:103] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine, img.header), bold)
    cfg = make_cfg(
        "data=tiny",
        f"data.root={root}",
        "data.simulate=null",
        f"data.cache_dir={tmp_path / 'cache'}",
        "split=loso",
        "split.fold=0",
    )
    dm = instantiate(cfg.data, split=cfg.split, _recursive_=False)
    dm.prepare_data()
    dm.setup("fit")
    with caplog.at_level("WARNING", logger="painnet.data.datamodule"):
        qc = dm.write_qc_table(tmp_path / "qc.tsv")
    row = qc.set_index("run").loc["sub-01_ses-01_task-rating_run-1"]
    assert row.n_frames_non_finite == 3
    assert (qc.drop(index=qc.index[qc.run == row.name]).n_frames_non_finite == 0).all()
    assert "censored for non-finite" in caplog.text
    assert "sub-01_ses-01_task-rating_run-1 (3)" in caplog.text
    assert pd.read_csv(tmp_path / "qc.tsv", sep="\t").equals(qc)
