"""DDP (trainer=ddp): one prediction table from all ranks, synced metrics, the multirun guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import open_dict

from painnet.distributed import (
    check_complete,
    deduplicate,
    gather_predictions,
    is_main_process,
    merge_batches,
)

# Trains on 2 CPU processes (gloo), saves the checkpoint, predicts the held-out session under
# DDP and writes what rank 0 gathered plus what every rank predicted and validated itself.
WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import open_dict
    from painnet.distributed import gather_predictions, merge_batches, release_process_group

    conf_dir, out, *overrides = sys.argv[1:]
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    L.seed_everything(0, workers=True)
    dm = instantiate(cfg.data, split=cfg.split, _recursive_=False)
    dm.setup("fit")
    model = cfg.model
    with open_dict(model):
        model.pop("name", None)
    task = instantiate(model, n_parcels=dm.n_parcels, n_frames=dm.window_frames)
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False)
    trainer.fit(task, datamodule=dm)
    rank = trainer.global_rank
    val_r = float(trainer.callback_metrics["val/r"])
    trainer.save_checkpoint(f"{out}/ddp.ckpt")
    batches = trainer.predict(task, datamodule=dm)
    local = merge_batches(batches)
    np.savez(f"{out}/local_{rank}.npz", **local)
    (rows,) = gather_predictions(batches, dm.dataset("predict"))
    json.dump({"val_r": val_r, "world_size": trainer.world_size}, open(f"{out}/rank_{rank}.json", "w"))
    if trainer.is_global_zero:
        np.savez(f"{out}/gathered.npz", **rows)
    release_process_group()  # as the CLI does: exiting with a live gloo group can abort
    """
)


@pytest.mark.slow
def test_two_gloo_processes_predict_the_same_table_as_one(make_cfg, tmp_path, tiny_root):
    from tests.conftest import CONF_DIR

    overrides = [
        "data=tiny",
        "data.eval_batch_size=37",  # odd shards: ranks get unequal numbers of windows
        "model=convattn",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.benchmark=false",
    ]
    cfg = make_cfg(*overrides)
    dm = instantiate(cfg.data, split=cfg.split, _recursive_=False)
    dm.prepare_data()  # simulate + cache once, before two processes read it
    dm.setup("fit")
    script = tmp_path / "ddp_worker.py"
    script.write_text(WORKER)
    paths = [f"paths.{k}={cfg.paths[k]}" for k in ("data_dir", "cache_dir", "output_dir")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    done = subprocess.run(
        [sys.executable, str(script), CONF_DIR, str(tmp_path), *paths, *overrides],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["val_r"] == pytest.approx(ranks[1]["val_r"], abs=1e-6)  # synced metric
    local = [dict(np.load(tmp_path / f"local_{r}.npz")) for r in (0, 1)]
    n_windows = len(dm.dataset("predict"))
    assert all(0 < len(part["frame"]) < n_windows for part in local)  # work was split
    gathered = dict(np.load(tmp_path / "gathered.npz"))
    keys = list(zip(gathered["run_index"], gathered["frame"], strict=True))
    assert len(keys) == len(set(keys)) == n_windows  # every frame once, none twice

    # One process, same weights: the same table up to floating-point tolerance.
    from painnet.task import PainDecoderTask

    single = make_cfg(*overrides[:3], "trainer=cpu", "trainer.enable_progress_bar=false")
    model = single.model
    with open_dict(model):
        model.pop("name", None)
    task = instantiate(model, n_parcels=dm.n_parcels, n_frames=dm.window_frames)
    state = __import__("torch").load(tmp_path / "ddp.ckpt", weights_only=False)["state_dict"]
    task.load_state_dict(state)
    assert isinstance(task, PainDecoderTask)
    trainer = instantiate(single.trainer, logger=False, enable_checkpointing=False)
    (reference,) = gather_predictions(trainer.predict(task, datamodule=dm), dm.dataset("predict"))
    np.testing.assert_array_equal(gathered["run_index"], reference["run_index"])
    np.testing.assert_array_equal(gathered["frame"], reference["frame"])
    np.testing.assert_allclose(gathered["prediction"], reference["prediction"], atol=1e-5)
    np.testing.assert_array_equal(np.isnan(gathered["y"]), np.isnan(reference["y"]))


def rows(run_index, frame, prediction):
    return {
        "run_index": np.asarray(run_index),
        "frame": np.asarray(frame),
        "prediction": np.asarray(prediction, dtype=float),
        "y": np.full(len(frame), np.nan),
    }


def test_repeated_windows_of_a_padding_sampler_count_once_and_are_sorted():
    # DistributedSampler pads the last shard by repeating the first windows.
    padded = merge_batches([rows([1, 0], [5, 3], [0.5, 0.3]), rows([0, 1], [3, 4], [0.3, 0.4])])
    out = deduplicate(padded)
    assert list(zip(out["run_index"], out["frame"])) == [(0, 3), (1, 4), (1, 5)]
    np.testing.assert_allclose(out["prediction"], [0.3, 0.4, 0.5])


def test_disagreeing_duplicates_missing_and_extra_windows_are_errors():
    with pytest.raises(RuntimeError, match="predicted differently"):
        deduplicate(rows([0, 0], [3, 3], [0.1, 0.9]))
    got = rows([0, 0], [3, 4], [0.1, 0.2])
    with pytest.raises(RuntimeError, match="1 window\\(s\\) missing and 1 unexpected"):
        check_complete(got, {(0, 3), (0, 5)})
    check_complete(got, {(0, 3), (0, 4)})


def test_single_process_gather_is_the_merge_of_its_own_batches():
    (out,) = gather_predictions([rows([0], [7], [0.7]), rows([0], [6], [0.6])])
    assert out["frame"].tolist() == [6, 7]


def test_ddp_inside_a_hydra_multirun_is_refused(make_cfg):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.runtime.output_dir = "unused"
        cfg.trainer.default_root_dir = "unused"
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(InstantiationException, match="inside a Hydra multirun"):
            instantiate(cfg.trainer, logger=False)
    finally:
        HydraConfig.instance().cfg = None
    trainer = instantiate(cfg.trainer, logger=False)  # a single run: plain DDP
    assert trainer.world_size == 2


def test_only_rank_zero_is_the_main_process():
    assert is_main_process({})
    assert is_main_process({"LOCAL_RANK": "0", "NODE_RANK": "0", "SLURM_PROCID": "0"})
    assert not is_main_process({"LOCAL_RANK": "1"})  # Lightning's second process on a node
    assert not is_main_process({"LOCAL_RANK": "0", "NODE_RANK": "1"})
    assert not is_main_process({"SLURM_PROCID": "3"})
    assert not is_main_process({"RANK": "2"})  # torchrun


def test_rank_labels_name_each_process_once():
    from painnet.distributed import rank_label

    assert rank_label({}) == "0"
    assert rank_label({"LOCAL_RANK": "1", "NODE_RANK": "0"}) == "1"
    assert rank_label({"LOCAL_RANK": "1", "NODE_RANK": "2"}) == "2-1"
    assert rank_label({"RANK": "5", "LOCAL_RANK": "1"}) == "5"
    assert rank_label({"SLURM_PROCID": "3"}) == "3"


def _cli(args, cwd, timeout=600):
    """``python -m painnet.train <args>`` in a clean environment (no inherited rank variables)."""
    from painnet.distributed import RANK_VARIABLES
    from tests.conftest import CONF_DIR

    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    repo = os.path.dirname(os.path.dirname(CONF_DIR))
    path = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=path)
    return subprocess.run(
        [sys.executable, "-m", "painnet.train", *args],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )  # fmt: skip


@pytest.mark.slow
def test_ddp_through_the_cli_publishes_the_single_process_table(make_cfg, tmp_path, tiny_root):
    """``painnet-train trainer=ddp`` with 2 CPU processes: rank 1 (re-launched by Lightning
    into rank 0's folder) neither takes the lock nor writes outputs; the published table has
    every frame once, the frames of a one-process run, and the predictions of the published
    best checkpoint run in one process."""
    import pandas as pd

    from painnet.experiments.decoder import load_decoder
    from painnet.experiments.jobs import read_job_config
    from painnet.experiments.single import build_datamodule

    cfg = make_cfg("data=tiny")
    common = [
        "data=tiny",
        "model=convattn",
        "trainer.max_epochs=2",
        "trainer.precision=32-true",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "eval.n_boot=50",
        "eval.plots=false",
        f"paths.data_dir={cfg.paths.data_dir}",
        f"paths.cache_dir={cfg.paths.cache_dir}",
    ]
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.benchmark=false"]
    done = _cli([*common, *ddp, f"hydra.run.dir={ddp_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (ddp_dir / "DONE.json").is_file()
    assert (ddp_dir / "checkpoints" / "best.ckpt").is_file()
    assert not list(ddp_dir.glob(".rank*")) and not (ddp_dir / ".lock").exists()
    assert json.loads((ddp_dir / "DONE.json").read_text())["metrics"]

    done = _cli([*common, "trainer=cpu", f"hydra.run.dir={single_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]

    key = ["subject", "session", "run", "frame"]
    as_str = dict.fromkeys(key, str)
    table = pd.read_csv(ddp_dir / "predictions.csv", dtype=as_str)
    single = pd.read_csv(single_dir / "predictions.csv", dtype=as_str)
    assert not table.duplicated(key).any()
    assert len(table) > 0
    assert set(map(tuple, table[key].values)) == set(map(tuple, single[key].values))

    # The published checkpoint, predicted in one process, gives the published table.
    single_cfg = read_job_config(single_dir)
    dm = build_datamodule(single_cfg)
    reference = load_decoder(ddp_dir, cfg=single_cfg, dm=dm).predict(dm).astype(as_str)
    merged = table.merge(reference, on=key, suffixes=("", "_ref"), validate="one_to_one")
    assert len(merged) == len(table) == len(reference)
    np.testing.assert_allclose(merged["prediction"], merged["prediction_ref"], atol=1e-5)
