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

    monkeypatch.setattr(preprocess, "extract_parcel_series", must_not_extract)
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
