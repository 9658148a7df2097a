"""The cache is keyed by content, written atomically, and reused instead of re-extracting."""

import numpy as np
import pytest

from painnet.data import preprocess
from painnet.data.cache import ArrayCache, cache_key


def test_key_changes_with_any_part():
    base = cache_key(bold={"path": "/a", "size": 1, "mtime_ns": 2}, clean={"fd": 0.5})
    assert base == cache_key(clean={"fd": 0.5}, bold={"path": "/a", "size": 1, "mtime_ns": 2})
    assert base != cache_key(bold={"path": "/a", "size": 1, "mtime_ns": 3}, clean={"fd": 0.5})
    assert base != cache_key(bold={"path": "/a", "size": 1, "mtime_ns": 2}, clean={"fd": 0.3})


def test_round_trip_and_compute_once(tmp_path):
    cache = ArrayCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {
            "series": np.arange(6, dtype=np.float32).reshape(3, 2),
            "names": np.array(["a", "b"]),
        }

    first = cache.get_or_compute("k" * 64, compute)
    second = cache.get_or_compute("k" * 64, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first["series"], second["series"])
    assert list(second["names"]) == ["a", "b"]


def test_an_interrupted_write_is_never_read_back(tmp_path, monkeypatch):
    cache = ArrayCache(tmp_path)
    key = "f" * 64

    def killed_mid_write(fh, **arrays):
        fh.write(b"PK\x03\x04 half an entry")
        raise KeyboardInterrupt  # the process dies while writing

    monkeypatch.setattr(np, "savez", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        cache.save(key, {"x": np.ones(3)})
    monkeypatch.undo()
    assert key not in cache and cache.load(key) is None
    assert not list(tmp_path.rglob("*.tmp-*"))  # the partial file was removed too


def test_a_corrupt_entry_is_recomputed_not_trusted(tmp_path):
    cache = ArrayCache(tmp_path)
    key = "c" * 64
    cache.path(key).parent.mkdir(parents=True)
    cache.path(key).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        out = cache.get_or_compute(key, lambda: {"x": np.zeros(2)})
    np.testing.assert_array_equal(out["x"], np.zeros(2))


def test_second_datamodule_setup_reuses_the_cache(make_cfg, tiny_root, tmp_path, monkeypatch):
    from hydra.utils import instantiate

    cfg = make_cfg("data=tiny", f"data.cache_dir={tmp_path / 'cache'}")
    dm = instantiate(cfg.data, split=cfg.split, _recursive_=False)
    dm.prepare_data()
    dm.setup("fit")
    entries = sorted(p.name for p in (tmp_path / "cache").rglob("*.npz"))
    assert entries

    def must_not_extract(*args, **kwargs):
        raise AssertionError("extraction ran again although the cache holds every run")

    monkeypatch.setattr(preprocess, "extract_parcels", must_not_extract)
    again = instantiate(cfg.data, split=cfg.split, _recursive_=False)
    again.prepare_data()
    again.setup("fit")
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.npz")) == entries
    np.testing.assert_array_equal(again.runs[0].series, dm.runs[0].series)

    # a different cleaning setting re-cleans from the cached extraction, still without re-reading images
    other = instantiate(
        cfg.data, split=cfg.split, clean={**cfg.data.clean, "fd_threshold": 0.3}, _recursive_=False
    )
    other.prepare_data()
    other.setup("fit")


# --------------------------------------------------------------------------- non-finite voxels


def _nan_run(tmp_path, name: str, bold_data, fd):
    import nibabel as nib
    import pandas as pd

    from painnet.data.types import RunFiles, RunKey

    bold = tmp_path / f"sub-01_ses-{name}_task-rating_run-1_bold.nii.gz"
    nib.save(nib.Nifti1Image(bold_data, np.eye(4)), bold)
    confounds = tmp_path / f"sub-01_ses-{name}_task-rating_run-1_desc-confounds_timeseries.tsv"
    pd.DataFrame({"framewise_displacement": fd}).to_csv(confounds, sep="\t", index=False)
    return RunFiles(
        key=RunKey("01", name, "rating", "1"),
        bold=bold,
        bold_json=None,
        confounds=confounds,
        ratings=tmp_path / "unused_ratings.tsv.gz",
        ratings_json=tmp_path / "unused_ratings.json",
        kind="nifti",
        tr=1.0,
    )


@pytest.fixture
def nan_runs(tmp_path):
    """Two runs with the same voxels except frames 7 and 20: in ``nan`` a voxel inside a
    parcel is NaN there; in ``moved`` those frames hold wild finite values and high motion."""
    from painnet.data.atlas import Atlas

    rng = np.random.default_rng(0)
    data = (100 + 10 * rng.normal(size=(4, 4, 3, 40))).astype(np.float32)
    labels = np.zeros((4, 4, 3), dtype=np.int32)
    labels[:2], labels[2:] = 1, 2
    atlas = Atlas("halves", "volume", labels, np.eye(4), np.array([1, 2]), ["a", "b"], None)
    bad_frames = [7, 20]
    with_nan, moved = data.copy(), data.copy()
    with_nan[1, 1, 1, bad_frames] = np.nan
    with_nan[3, 0, 2, 20] = np.inf
    moved[..., bad_frames] = 1e4
    fd_moved = np.zeros(40)
    fd_moved[bad_frames] = 5.0
    nan = _nan_run(tmp_path, "nan", with_nan, np.zeros(40))
    high_motion = _nan_run(tmp_path, "moved", moved, fd_moved)
    return atlas, nan, high_motion, bad_frames


def test_frames_with_non_finite_voxels_are_censored_like_motion(nan_runs, tmp_path):
    from painnet.data.clean import CleanConfig

    atlas, nan, high_motion, bad_frames = nan_runs
    cache = ArrayCache(tmp_path / "cache")
    clean = CleanConfig(motion=0, wm_csf=False, drop_initial_s=0.0, fd_threshold=0.5)
    censored = preprocess.clean_cached(nan, atlas, clean, cache)
    moved = preprocess.clean_cached(high_motion, atlas, clean, cache)
    assert np.flatnonzero(~censored["kept"]).tolist() == bad_frames
    np.testing.assert_array_equal(censored["kept"], moved["kept"])
    # the NaN frames leave no trace on the kept ones: same result as censored high motion
    # (up to the float32 rounding of the raw means, ~1e-6 after z-scoring)
    np.testing.assert_allclose(censored["series"], moved["series"], atol=1e-5)
    assert np.isfinite(censored["series"]).all()


def test_non_finite_counts_are_cached_and_reported(nan_runs, tmp_path, monkeypatch, caplog):
    import pandas as pd

    from painnet.data.clean import CleanConfig

    atlas, nan, high_motion, _ = nan_runs
    cache = ArrayCache(tmp_path / "cache")
    clean = CleanConfig(motion=0, wm_csf=False, drop_initial_s=0.0, fd_threshold=0.5)
    preprocess.prepare_runs([nan, high_motion], atlas, clean, cache, progress=False)
    entry = cache.load(preprocess.extraction_key(nan, atlas))
    expected = np.zeros(40, dtype=np.int64)
    expected[[7, 20]] = [1, 2]
    np.testing.assert_array_equal(entry["non_finite"], expected)

    def must_not_extract(*args, **kwargs):
        raise AssertionError("the counts must come from the cache")

    monkeypatch.setattr(preprocess, "extract_parcels", must_not_extract)
    qc_path = tmp_path / "report" / "qc.tsv"
    preprocess.write_qc_table(qc_path, [nan, high_motion], atlas, clean, cache)
    table = pd.read_csv(qc_path, sep="\t")
    assert list(table.columns) == list(preprocess.QC_COLUMNS)
    assert table["run"].tolist() == [
        "sub-01_ses-nan_task-rating_run-1",
        "sub-01_ses-moved_task-rating_run-1",
    ]
    assert table["n_frames_non_finite"].tolist() == [2, 0]
    assert table["n_values_non_finite"].tolist() == [3, 0]
    assert table["n_kept"].tolist() == [38, 38]
    assert not list(qc_path.parent.glob("*.tmp-*"))
    # every load says so again, not only the first extraction
    with caplog.at_level("WARNING", logger="painnet.data.preprocess"):
        preprocess._log_non_finite(nan, entry["non_finite"])
    assert "2 frames censored for 3 non-finite values" in caplog.text
    assert nan.bold.name in caplog.text


def test_a_run_of_non_finite_frames_is_an_error_naming_the_cause(nan_runs, tmp_path):
    from painnet.data.clean import CleanConfig

    atlas, nan, _, _ = nan_runs
    import nibabel as nib

    data = np.asarray(nib.load(nan.bold).dataobj).copy()
    data[0, 0, 0, :] = np.nan  # a voxel inside parcel "a", NaN in every frame
    nib.save(nib.Nifti1Image(data, np.eye(4)), nan.bold)
    clean = CleanConfig(motion=0, wm_csf=False, drop_initial_s=0.0, fd_threshold=0.5)
    with pytest.raises(
        ValueError,
        match=r"nan_task-rating_run-1_bold\.nii\.gz: only 0 frames.*"
        r"40 frames with non-finite values",
    ):
        preprocess.clean_cached(nan, atlas, clean, ArrayCache(tmp_path / "cache"))
