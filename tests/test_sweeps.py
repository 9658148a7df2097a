"""Sweeps that never lie (issue 10): job identity from the resolved config, one decoder protocol,
studies and splits as objects, every config composes, the packaged configs work installed.

Everything runs through ``hydra.compose`` of the packaged configs or the real CLI, on the tiny
dataset (2 participants × 3 sessions × 2 runs).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from painnet.evaluation.table import COLUMNS, FRAME_KEYS, read_table
from painnet.experiments.decoder import (
    ClassicalDecoder,
    EnsembleDecoder,
    LightningDecoder,
    load_decoder,
)
from painnet.experiments.runner import objective, run_experiment, run_sweep_job
from painnet.experiments.single import build_datamodule, run_single
from tests.conftest import FAST_TINY as FAST

REPO = Path(__file__).resolve().parents[1]
ONE_FOLD = ("study.subjects=[01]", "study.folds=[0]")


def job_dirs(experiment: Path, model: str) -> list[Path]:
    return sorted(p.parent for p in experiment.glob(f"{model}-??????/*/DONE.json"))


def embed_widths(net) -> set[int]:
    """Widths of the parcel tokens: the output size of every attention layer's projection."""
    return {m.embed_dim for m in net.modules() if isinstance(m, torch.nn.MultiheadAttention)}


def done(job: Path) -> dict:
    return json.loads((job / "DONE.json").read_text())


# --------------------------------------------------------------------------- identity


def test_two_variants_of_one_model_class_get_their_own_folders_and_metrics(
    make_cfg, tiny_root, tmp_path, monkeypatch
):
    # A user's second config of the same class, copied from ridge.yaml (same name: ridge).
    monkeypatch.chdir(tmp_path)
    user_model = tmp_path / "conf" / "model" / "ridge_flatten.yaml"
    user_model.parent.mkdir(parents=True)
    ridge = (REPO / "painnet" / "conf" / "model" / "ridge.yaml").read_text()
    user_model.write_text(ridge.replace("summary: mean", "summary: flatten"))

    exp = tmp_path / "exp"
    cfg = make_cfg(*FAST, "experiment=within_subject", "study.models=[ridge,ridge_flatten]")
    outcome = run_experiment(cfg, exp.joinpath(), overrides=[])
    jobs = job_dirs(exp, "ridge")
    assert len(jobs) == 2 * 6 and outcome["ran"] == 12
    variants = {job.parent.name for job in jobs}
    assert len(variants) == 2  # ridge-<hash a>, ridge-<hash b>
    a, b = (exp / v / "loso_sub-01_fold-0" for v in sorted(variants))
    assert done(a)["metrics"]["r_1min"] != done(b)["metrics"]["r_1min"]
    assert {OmegaConf.load(j / "job.yaml").model.summary for j in (a, b)} == {"mean", "flatten"}
    # aggregation keeps both variants, labelled by their ids
    within = outcome["tables"]["within_subject"]
    assert sorted(within.model.unique()) == sorted(variants)
    assert len(within) == 2 * 2


def test_a_model_override_reaches_every_variant_in_the_loop_and_the_sweep(
    make_cfg, tiny_root, tmp_path
):
    exp = tmp_path / "loop"
    cfg = make_cfg(*FAST, *ONE_FOLD, "experiment=within_subject", "study.models=[ridge,convattn]")
    run_experiment(cfg, exp, overrides=["model.net.embed_dim=8"])
    (deep,) = job_dirs(exp, "convattn")
    assert OmegaConf.load(deep / "job.yaml").model.net.embed_dim == 8
    decoder = load_decoder(deep)
    assert isinstance(decoder, LightningDecoder)
    assert embed_widths(decoder.model.net) == {8}  # the trained model, not only its config
    (classical,) = job_dirs(exp, "ridge")
    assert "net" not in OmegaConf.load(classical / "job.yaml").model

    sweep = tmp_path / "sweep"
    one = make_cfg(*FAST, "experiment=within_subject", "model.net.embed_dim=8", "split.fold=0")
    result = run_sweep_job(one, sweep)
    assert embed_widths(load_decoder(result.directory).model.net) == {8}
    # the sweep job writes the loop's folder for the same variant and split
    assert result.directory.relative_to(sweep) == deep.relative_to(exp)

    with pytest.raises(ValueError, match="apply to none of study.models"):
        run_experiment(
            make_cfg(*FAST, *ONE_FOLD, "experiment=within_subject", "study.models=[ridge]"),
            tmp_path / "bad",
            overrides=["model.net.embed_dim=8"],
        )


def test_a_finished_job_is_reused_only_with_the_same_config(make_cfg, tiny_root, tmp_path):
    exp = tmp_path / "exp"
    cfg = make_cfg(*FAST, *ONE_FOLD, "experiment=within_subject", "model=ridge")
    assert run_experiment(cfg, exp)["ran"] == 1
    # settings that do not change results (paths, loggers, plots) keep the job
    same = make_cfg(*FAST, *ONE_FOLD, "experiment=within_subject", "model=ridge", "logger=csv")
    assert run_experiment(same, exp)["ran"] == 0


def test_the_objective_is_one_named_metric_of_one_model(make_cfg, tiny_root, tmp_path):
    cfg = make_cfg(
        *FAST,
        "experiment=within_subject",
        "study.subjects=[01]",
        "study.models=[ridge,edge_pcr]",
        "model=edge_pcr",
    )
    outcome = run_experiment(cfg, tmp_path / "exp")
    within = outcome["tables"]["within_subject"].set_index("model")
    assert objective(cfg, outcome) == pytest.approx(within.loc["edge_pcr", "r_1min"])
    ridge = OmegaConf.merge(cfg, {"study": {"objective_model": "ridge"}})
    assert objective(ridge, outcome) == pytest.approx(within.loc["ridge", "r_1min"])


# --------------------------------------------------------------------------- decoders


def test_a_seed_ensemble_predicts_the_mean_of_its_members(make_cfg, tiny_root, tmp_path):
    out = tmp_path / "ens"
    cfg = make_cfg(*FAST, "model=convattn", "ensemble.members=2", output_dir=out)
    metrics = run_single(cfg, out)
    assert done(out)["model"] == "convattn_ens-2" and np.isfinite(metrics["r_1min"])
    decoder = load_decoder(out)
    assert isinstance(decoder, EnsembleDecoder) and len(decoder.model) == 2
    dm = build_datamodule(OmegaConf.load(out / "job.yaml"))
    members = decoder.member_tables(dm)
    saved = read_table(out / "predictions.csv")
    mean = np.mean([m.prediction.to_numpy() for m in members], axis=0)
    np.testing.assert_allclose(saved.prediction.to_numpy(), mean, rtol=1e-6)
    # members differ (seeds seed, seed+1): the mean is not one member
    assert not np.allclose(members[0].prediction, members[1].prediction)


def test_every_decoder_writes_the_same_prediction_table(make_cfg, tiny_root, tmp_path):
    tables = {}
    for model in ("ridge", "convattn"):
        out = tmp_path / model
        run_single(make_cfg(*FAST, f"model={model}", output_dir=out), out)
        tables[model] = read_table(out / "predictions.csv")
        assert list(tables[model].columns) == COLUMNS
        decoder = load_decoder(out)
        expected = ClassicalDecoder if model == "ridge" else LightningDecoder
        assert isinstance(decoder, expected) and decoder.model is not None
    pd.testing.assert_frame_equal(tables["ridge"][FRAME_KEYS], tables["convattn"][FRAME_KEYS])
    assert (tables["ridge"].split == "loso_sub-01_fold-0").all()


class RecordFolder:
    """An ``after`` step: records the folder it was called with (in that folder)."""

    def __init__(self, note: str = "after.json"):
        self.note = note

    def __call__(self, experiment_dir):
        jobs = sorted(
            str(p.parent.relative_to(experiment_dir))
            for p in Path(experiment_dir).rglob("DONE.json")
        )
        (Path(experiment_dir) / self.note).write_text(json.dumps(jobs))


def test_a_composite_study_runs_its_studies_into_one_folder_then_its_steps(
    make_cfg, tiny_root, tmp_path
):
    exp = tmp_path / "lee"
    cfg = make_cfg(
        *FAST,
        "experiment=within_subject",
        "study=composite",
        "study.models=[edge_pcr]",
        "study.studies=[{_target_: painnet.experiments.studies.WithinSubject, subjects: [01]},"
        "{_target_: painnet.experiments.studies.DataSize, subjects: [01], n_train: [1],"
        " repeats: 1, inherit: {fixed_components: fixed_components}}]",
        "study.after=[{_target_: test_sweeps.RecordFolder}]",
    )
    outcome = run_experiment(cfg, exp)
    # 3 LOSO folds (planned once, shared by both studies) + 3 data-size jobs
    assert outcome["ran"] == 6
    assert {"within_subject", "data_size_repeats"} <= set(outcome["tables"])
    recorded = json.loads((exp / "after.json").read_text())
    assert len(recorded) == 6
    # each data-size job fixed the PCs at its fold's full model's inner-CV choice
    for job in job_dirs(exp, "edge_pcr"):
        if "size_" not in job.name:
            continue
        fold = job.name.split("_fold-")[1].split("_")[0]
        full = job.parent / f"loso_sub-01_fold-{fold}"
        chosen = done(full)["hyperparameters"]["fixed_components"]
        assert OmegaConf.load(job / "job.yaml").model.fixed_components == chosen


def test_inherited_hyperparameters_pool_repeats_into_one_curve_per_participant_and_model(
    make_cfg, tiny_root, tmp_path
):
    """lee2026's analyses on tiny data: within-subject LOSO, then the training-size study with
    the number of PCs fixed per fold at the full model's choice. The per-fold value injected
    into each subset job's model does not make it another model: its folder, DONE.json and the
    aggregate key it under the variant as configured, so the folds and repeats of a participant
    pool into ONE learning curve per participant x model."""
    exp = tmp_path / "lee"
    cfg = make_cfg(
        *FAST,
        "experiment=lee2026",
        "data.clean.n_wm_compcor=0",  # tiny's simulated confounds have a_comp_cor only
        "data.clean.n_csf_compcor=0",
        "data.clean.n_acompcor=4",
        "data.clean.fd_threshold=0.5",
        "eval.n_boot=20",
        "study.studies.1.n_train=[1]",
        "study.studies.1.repeats=2",
        "study.after=[]",
    )
    run_experiment(cfg, exp)
    jobs = job_dirs(exp, "edge_pcr")
    size_jobs = [j for j in jobs if "size_" in j.name]
    assert len(size_jobs) == 2 * 3 * 2  # participants x folds x repeats
    variants = {j.parent.name for j in jobs}
    assert len(variants) == 1  # LOSO and subset jobs: one folder per model as configured
    # the inherited value differs between folds, yet every job records the planned variant
    chosen = {OmegaConf.load(j / "job.yaml").model.fixed_components for j in size_jobs}
    assert None not in chosen and len(chosen) > 1  # the folds chose different numbers of PCs
    assert {done(j)["model_id"] for j in jobs} == variants
    summary = pd.read_csv(exp / "aggregate" / "data_size_summary.csv", dtype={"subject": str})
    one_min = summary[summary.bin_size == "1min"]  # one row per participant x model x bin size
    assert sorted(zip(one_min.subject, one_min.model)) == [("01", "edge_pcr"), ("02", "edge_pcr")]
    assert set(summary.model) == {"edge_pcr"}
    repeats = pd.read_csv(exp / "aggregate" / "data_size_repeats.csv", dtype={"subject": str})
    assert set(repeats.model) == {"edge_pcr"}
    assert len(repeats) == 2 * 2  # participants x repeats (folds pooled), n = 1 only


def test_no_import_cycles_in_the_package():
    """Each module's painnet imports, at module level, form a graph without cycles."""
    root = REPO / "painnet"
    graph = {}
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:  # module level only: imports inside functions are deferred
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[module] = {d for d in deps if d.startswith("painnet") and d != module}
    state: dict[str, int] = {}

    def visit(module, trail):
        if state.get(module) == 1:
            cycle = trail[trail.index(module) :] + [module]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if state.get(module) == 2 or module not in graph:
            return
        state[module] = 1
        for dep in sorted(graph[module]):
            visit(dep, trail + [module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "overrides",
    [
        ("data=bids", "data.root=/data/ds", "data.atlas.path=/atlases/a_dseg.nii.gz"),
        ("data=bids_cifti", "data.root=/data/ds"),
        ("data=bids_xcpd", "data.root=/data/ds"),
        ("data=demo",),
        ("data=paper",),
        ("trainer=gpu",),
        ("trainer=debug",),
        ("experiment=within_subject",),
        ("experiment=cross_subject",),
        ("experiment=data_size",),
        ("experiment=finetune",),
        ("experiment=finetune_single",),
        ("model=edge_pcr",),
        ("model=ridge",),
        ("callbacks=none", "logger=csv"),
    ],
    ids=lambda o: o[0],
)
def test_every_config_composes_and_resolves(make_cfg, overrides):
    cfg = make_cfg(*overrides)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["model"]["name"]
    assert container["split"]["_target_"].startswith("painnet.data.splits.")
    if cfg.get("study"):
        from painnet.experiments.runner import make_study

        assert make_study(cfg).kind in {"within_subject", "cross_subject", "data_size", "finetune"}


def test_evaluate_composes_with_data_split_and_trainer_groups(make_cfg):
    cfg = make_cfg(
        "run_dir=x",
        "data=demo",
        "split=loso",
        "split.fold=3",
        "trainer=cpu",
        config_name="evaluate",
    )
    assert cfg.split.fold == 3 and cfg.data.simulate.preset == "demo"
    assert cfg.trainer.accelerator == "cpu"


# --------------------------------------------------------------------------- CLI


def _cli(args, cwd, env_extra=None, python=sys.executable):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_documented_evaluate_invocations_work_through_hydra(
    tiny_root, data_dir, cache_dir, tmp_path
):
    run = tmp_path / "run"
    paths = [f"paths.data_dir={data_dir}", f"paths.cache_dir={cache_dir}"]
    trained = _cli(
        ["-m", "painnet.train", *FAST, "model=ridge", *paths, f"hydra.run.dir={run}"], REPO
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    first = read_table(run / "predictions.csv")
    calls = {
        "run_dir": [f"run_dir={run}"],
        "ckpt_path": [f"ckpt_path={run}/model.pkl", "data=tiny", "split=loso", "split.fold=0"],
        "trainer": [f"run_dir={run}", "trainer=cpu"],
    }
    for name, args in calls.items():
        out = tmp_path / f"eval_{name}"
        result = _cli(
            [
                "evaluate.py",
                *args,
                *paths,
                "eval.n_boot=20",
                "eval.plots=false",
                f"hydra.run.dir={out}",
            ],
            REPO,
        )
        assert result.returncode == 0, (name, result.stderr[-3000:])
        again = read_table(out / "predictions.csv")
        np.testing.assert_allclose(again.prediction, first.prediction, rtol=1e-6)


@pytest.mark.slow
def test_the_cli_loop_passes_model_overrides_to_every_variant(
    tiny_root, data_dir, cache_dir, tmp_path
):
    exp = tmp_path / "exp"
    result = _cli(
        [
            "train.py",
            "experiment=within_subject",
            *FAST,
            *ONE_FOLD,
            "study.models=[ridge,convattn]",
            "model.net.embed_dim=8",
            f"paths.data_dir={data_dir}",
            f"paths.cache_dir={cache_dir}",
            f"hydra.run.dir={exp}",
        ],
        REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (deep,) = job_dirs(exp, "convattn")
    state = torch.load(deep / "checkpoints" / "best.ckpt", weights_only=False)["hyper_parameters"]
    assert OmegaConf.load(deep / "job.yaml").model.net.embed_dim == 8 and state["n_parcels"]
    assert len(job_dirs(exp, "ridge")) == 1


@pytest.mark.slow
def test_a_non_editable_install_trains_with_the_packaged_configs(
    tiny_root, data_dir, cache_dir, tmp_path
):
    venv = tmp_path / "venv"
    # Without its own pip/setuptools, the venv uses the system's (and its torch): nothing is
    # downloaded, and the build backend is the one the project was installed with.
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
    )
    python = venv / "bin" / "python"
    build = tmp_path / "src"
    top_level = {".git", "outputs", "multirun", "data", ".painnet_cache", "tests", "notebooks"}

    def skipped(folder, names):
        at_top = Path(folder) == REPO
        return [
            n
            for n in names
            if (at_top and n in top_level) or n == "__pycache__" or n.endswith(".egg-info")
        ]

    shutil.copytree(REPO, build, ignore=skipped)
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            str(build),
        ],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _cli(["-c", "import painnet, sys; print(painnet.__file__)"], elsewhere, python=python)
    assert str(venv) in where.stdout, where.stdout + where.stderr
    out = elsewhere / "run"
    result = subprocess.run(
        [
            str(venv / "bin" / "painnet-train"),
            *FAST,
            "model=ridge",
            f"paths.data_dir={data_dir}",
            f"paths.cache_dir={cache_dir}",
            f"hydra.run.dir={out}",
        ],
        cwd=elsewhere,
        env={**os.environ, "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert done(out)["model"] == "ridge"
