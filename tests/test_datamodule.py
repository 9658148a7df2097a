"""The DataModule, composed from the real configs, serves causal windows of the right sessions."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from painnet.data.windows import WindowDataset


@pytest.fixture
def dm(make_cfg, tiny_root):
    cfg = make_cfg("data=tiny", "split=loso", "split.fold=1")
    module = instantiate(cfg.data, split=cfg.split, _recursive_=False)
    module.prepare_data()
    module.setup("fit")
    return module


def test_windows_have_the_configured_shape(dm):
    batch = next(iter(dm.train_dataloader()))
    length = int(round(dm.window_s / dm.tr))
    assert batch["x"].shape == (dm.batch_size, dm.n_parcels, length)
    assert batch["x"].dtype == torch.float32
    assert batch["y"].shape == (dm.batch_size,) and torch.isfinite(batch["y"]).all()
    assert ((batch["y"] >= 0) & (batch["y"] <= 1)).all()


def test_a_window_is_the_causal_past_of_its_target_frame(dm):
    ds = dm.dataset("train")
    item = ds[5]
    run = dm.runs[int(item["run_index"])]
    end = int(item["frame"])
    expected = run.series[end - ds.length + 1 : end + 1].T
    np.testing.assert_array_equal(item["x"].numpy(), expected)
    assert item["y"].item() == pytest.approx(float(run.target[end]))


def test_censored_and_dropped_frames_never_become_targets(dm):
    for role in ("train", "val", "test"):
        ds = dm.dataset(role)
        for i in range(len(ds)):
            run = dm.runs[int(ds.owner_run[i])]
            end = int(ds.local_end[i])
            assert run.kept[end] and np.isfinite(run.target[end])
            assert end - ds.length + 1 >= run.first_kept  # never reaches into the dropped start
    censored = sum(int((~r.kept).sum()) for r in dm.runs)
    assert censored > 0


def test_roles_come_from_disjoint_sessions(dm):
    sessions = {
        role: {dm.runs[i].key.session_key for i in dm.runs_in(role)}
        for role in ("train", "val", "test")
    }
    assert sessions["test"] == set(dm.split.test)
    assert not (sessions["train"] & sessions["val"] or sessions["train"] & sessions["test"])
    assert not sessions["val"] & sessions["test"]


def test_predict_loader_yields_every_frame_of_each_held_out_run(dm):
    seen = {}
    for batch in dm.predict_dataloader():
        for r, f in zip(batch["run_index"].tolist(), batch["frame"].tolist(), strict=True):
            seen.setdefault(r, []).append(f)
    assert sorted(seen) == dm.runs_in("test")
    for r, frames in seen.items():
        run = dm.runs[r]
        assert frames == list(range(run.first_kept + dm.window_frames - 1, run.n_frames))


def test_batches_equal_item_by_item_fetching(dm):
    ds: WindowDataset = dm.dataset("val")
    idx = [0, 3, len(ds) - 1]
    batch = ds.__getitems__(idx)
    for j, i in enumerate(idx):
        torch.testing.assert_close(batch["x"][j], ds[i]["x"])


# Cleaning that reads nothing from fMRIPrep's confounds table.
NO_CONFOUNDS = (
    "data.clean.motion=0",
    "data.clean.wm_csf=false",
    "data.clean.n_acompcor=0",
    "data.clean.global_signal=false",
    "data.clean.fd_threshold=null",
)


@pytest.mark.parametrize(
    "reads_confounds",
    [
        "data.clean.n_wm_compcor=5",
        "data.clean.n_csf_compcor=5",
        "data.clean.fd_source=motion",
        "data.clean.motion=6",
        "data.clean.wm_csf=true",
        "data.clean.n_acompcor=2",
        "data.clean.global_signal=true",
        "data.clean.fd_threshold=0.5",
    ],
)
def test_a_run_without_its_confounds_table_is_an_error_when_cleaning_reads_it(
    reads_confounds, make_cfg, tiny_root, tmp_path
):
    """Every setting that takes a column from the confounds table (regressors, tissue
    aCompCor, FD censoring, FD computed from the motion columns) makes the table required:
    discovery names the missing file instead of cleaning without it."""
    import shutil

    from painnet.data.bids import BIDSError

    root = tmp_path / "ds"
    shutil.copytree(tiny_root, root)
    missing = next(root.rglob("*_desc-confounds_timeseries.tsv"))
    missing.unlink()
    cfg = make_cfg("data=tiny", f"data.root={root}", *NO_CONFOUNDS, reads_confounds)
    module = instantiate(cfg.data, split=cfg.split, _recursive_=False)
    with pytest.raises(BIDSError, match=f"confounds file missing.*{missing.name}"):
        module._discover()


def test_cleaning_that_reads_no_confounds_does_not_require_the_table(make_cfg, tiny_root):
    cfg = make_cfg("data=tiny", *NO_CONFOUNDS)
    module = instantiate(cfg.data, split=cfg.split, _recursive_=False)
    assert module.discovery["require_confounds"] is False
