"""Parcel time-series extraction: equality with nilearn, CIFTI/TSV inputs, errors, memory."""

from __future__ import annotations

import gzip
import threading
import time
import tracemalloc
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel import cifti2
from nilearn.maskers import NiftiLabelsMasker

from painnet.data import extract
from painnet.data.atlas import Atlas, load_atlas
from painnet.data.extract import extract_parcel_series

SHAPE = (12, 14, 10)
N_FRAMES = 40
N_LABELS = 20


def _affine(zoom: float = 1.0) -> np.ndarray:
    """A rotated, anisotropic, shifted voxel-to-world map; ``zoom`` scales the voxel size."""
    angle = 0.2
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([2.5, 3.0, 2.2]) * zoom
    aff[:3, 3] = [-14.0, -20.0, -9.0]
    return aff


def _write_labels(path, shape=SHAPE, affine=None, seed=1):
    labels = np.random.default_rng(seed).integers(0, N_LABELS + 1, size=shape).astype(np.int16)
    nib.save(nib.Nifti1Image(labels, _affine() if affine is None else affine), path)
    return path


def _write_bold(path, shape=SHAPE + (N_FRAMES,), dtype=np.float32, header=None, seed=0):
    data = np.random.default_rng(seed).normal(100.0, 20.0, size=shape).astype(np.float32)
    img = nib.Nifti1Image(data, _affine(), header=header)
    img.set_data_dtype(dtype)  # int16: nibabel picks a non-trivial scl_slope/scl_inter
    nib.save(img, path)
    return path


def _nilearn_means(bold, labels):
    masker = NiftiLabelsMasker(labels_img=str(labels), strategy="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return masker.fit_transform(str(bold))


@pytest.fixture
def labels_path(tmp_path):
    return _write_labels(tmp_path / "atlas_dseg.nii.gz")


@pytest.fixture
def atlas(labels_path):
    return load_atlas({"kind": "dseg", "path": labels_path})


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("chunk_frames", [7, 8, 64])
def test_nifti_means_equal_nilearn(tmp_path, labels_path, atlas, suffix, chunk_frames):
    bold = _write_bold(tmp_path / f"bold{suffix}")
    series, names = extract_parcel_series(bold, atlas, chunk_frames=chunk_frames)
    assert series.dtype == np.float32
    assert series.shape == (N_FRAMES, N_LABELS)
    assert names == atlas.names
    np.testing.assert_allclose(series, _nilearn_means(bold, labels_path), rtol=1e-5)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_scaled_int16_and_big_endian_equal_nilearn(tmp_path, labels_path, atlas, suffix):
    scaled = _write_bold(tmp_path / f"scaled{suffix}", dtype=np.int16)
    proxy = nib.load(scaled).dataobj
    assert proxy.slope != 1.0 and proxy.inter != 0.0
    big = nib.Nifti1Header().as_byteswapped(">")
    swapped = _write_bold(tmp_path / f"big{suffix}", header=big)
    assert nib.load(swapped).get_data_dtype().byteorder == ">"
    for bold in (scaled, swapped):
        series, _ = extract_parcel_series(bold, atlas, chunk_frames=9)
        np.testing.assert_allclose(series, _nilearn_means(bold, labels_path), rtol=1e-5)


def test_one_frame_reads_when_chunk_exceeds_byte_budget(tmp_path, labels_path, atlas, monkeypatch):
    bold = _write_bold(tmp_path / "bold.nii.gz")
    monkeypatch.setattr(extract, "READ_BUDGET_BYTES", 1)  # forces one frame per read
    series, _ = extract_parcel_series(bold, atlas, chunk_frames=64)
    np.testing.assert_allclose(series, _nilearn_means(bold, labels_path), rtol=1e-5)


@pytest.mark.parametrize("zoom", [0.6, 1.7])
def test_atlas_on_other_grid_equals_nilearn_resampling(tmp_path, zoom):
    grid = tuple(int(round(s / zoom)) for s in SHAPE)
    labels = _write_labels(tmp_path / "other_dseg.nii.gz", shape=grid, affine=_affine(zoom))
    other = load_atlas({"kind": "dseg", "path": labels})
    bold = _write_bold(tmp_path / "bold.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coarse grids may drop a parcel; nilearn drops it too
        series, names = extract_parcel_series(bold, other, chunk_frames=16)
    expected = _nilearn_means(bold, labels)
    assert series.shape == expected.shape
    assert len(names) == series.shape[1]
    np.testing.assert_allclose(series, expected, rtol=1e-5)


def test_non_finite_voxels_count_as_zero_like_nilearn(tmp_path, labels_path, atlas):
    data = np.random.default_rng(3).normal(size=SHAPE + (6,)).astype(np.float32)
    data[2, 3, 4, :] = np.nan
    data[5, 5, 5, 2] = np.inf
    bold = tmp_path / "nan_bold.nii.gz"
    nib.save(nib.Nifti1Image(data, _affine()), bold)
    with pytest.warns(UserWarning, match="non-finite"):
        series, _ = extract_parcel_series(bold, atlas)
    assert np.isfinite(series).all()
    np.testing.assert_allclose(series, _nilearn_means(bold, labels_path), rtol=1e-5, atol=1e-6)


def test_non_finite_values_are_counted_per_frame(tmp_path, labels_path, atlas):
    data = np.random.default_rng(3).normal(size=SHAPE + (6,)).astype(np.float32)
    labels = np.asarray(nib.load(labels_path).dataobj)
    inside = np.argwhere(labels > 0)[:3]  # three voxels inside parcels
    outside = tuple(np.argwhere(labels == 0)[0])
    data[tuple(inside[0])][:] = np.nan  # every frame
    data[tuple(inside[1])][2] = np.inf
    data[tuple(inside[2])][2] = -np.inf
    data[outside][4] = np.nan  # outside every parcel: not counted
    for suffix in (".nii", ".nii.gz"):
        bold = tmp_path / f"nan_bold{suffix}"
        nib.save(nib.Nifti1Image(data, _affine()), bold)
        out = extract.extract_parcels(bold, atlas)
        np.testing.assert_array_equal(out.non_finite, [1, 1, 3, 1, 1, 1])
        assert np.isfinite(out.series).all()


def test_xcpd_tsv_non_finite_cells_are_zero_and_counted(tmp_path):
    path = tmp_path / "sub-01_timeseries.tsv"
    path.write_text("V1\tM1\n1.0\tn/a\n2.0\t5.0\nnan\tinf\n")
    out = extract.extract_parcels(path, None)
    np.testing.assert_array_equal(out.non_finite, [1, 0, 2])
    np.testing.assert_array_equal(out.series, [[1.0, 0.0], [2.0, 5.0], [0.0, 0.0]])


def test_uncompressed_nifti_is_the_same_mapped_or_read(tmp_path, labels_path, atlas, monkeypatch):
    bold = _write_bold(tmp_path / "bold.nii", dtype=np.int16)
    monkeypatch.setattr(extract, "MAP_BUDGET_BYTES", 3 * SHAPE[0] * SHAPE[1] * SHAPE[2] * 2)
    mapped = extract.extract_parcels(bold, atlas, chunk_frames=2)

    def no_mmap(*args, **kwargs):
        raise OSError("this file system cannot map files")

    monkeypatch.setattr(extract._MappedFrames, "_map", no_mmap)
    read = extract.extract_parcels(bold, atlas, chunk_frames=2)
    assert mapped.series.tobytes() == read.series.tobytes()
    np.testing.assert_allclose(mapped.series, _nilearn_means(bold, labels_path), rtol=1e-5)


# --------------------------------------------------------------------------- threads (.nii)


def _nan_bold(tmp_path, name="bold.nii"):
    """A float32 .nii with non-finite values inside parcels in frames 7 and 20-22."""
    data = np.random.default_rng(21).normal(100.0, 20.0, size=SHAPE + (N_FRAMES,))
    data = data.astype(np.float32)
    data[3, 4, 5, 7] = np.nan
    data[6, 2, 1, 20:23] = np.inf
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, _affine()), path)
    return path


@pytest.fixture
def small_windows(monkeypatch):
    """Windows of 3 float32 frames (of 2 with chunks of 2 frames): many windows to share out
    on the test files."""
    monkeypatch.setattr(extract, "MAP_BUDGET_BYTES", 3 * SHAPE[0] * SHAPE[1] * SHAPE[2] * 4)


def _record_maps(monkeypatch, both_threads=False):
    """Wrap _MappedFrames._map to record which thread maps each window; ``both_threads``: the
    calling thread and the helper each wait in their first window for the other to have one
    (else either may take every window of a small file before the other runs)."""
    seen: list[tuple[str, int]] = []
    started = {"caller": threading.Event(), "helper": threading.Event()}
    original = extract._MappedFrames._map

    def recording(self, t0, n):
        name = threading.current_thread().name
        seen.append((name, t0))
        if both_threads and len(seen) > 1:  # seen[0]: the probe map in __init__
            me, other = (
                ("helper", "caller") if name.startswith("painnet-reduce") else ("caller", "helper")
            )
            started[me].set()
            assert started[other].wait(timeout=30), f"no window for the {other}"
        return original(self, t0, n)

    monkeypatch.setattr(extract._MappedFrames, "_map", recording)
    return seen


def _two_cpus(monkeypatch):
    monkeypatch.setattr(extract, "_usable_cpus", lambda: 2)


def _reduce_threads_alive():
    return [t for t in threading.enumerate() if t.name.startswith("painnet-reduce")]


@pytest.mark.parametrize("chunk_frames", [2, 3])  # windows of 2 and 3 frames
def test_nii_series_are_the_same_bytes_with_one_or_two_threads(
    tmp_path, labels_path, atlas, monkeypatch, small_windows, chunk_frames
):
    bold = _nan_bold(tmp_path)
    monkeypatch.setattr(extract, "NII_THREADS", 1)
    one = extract.extract_parcels(bold, atlas, chunk_frames=chunk_frames)
    monkeypatch.setattr(extract, "NII_THREADS", 2)
    _two_cpus(monkeypatch)
    seen = _record_maps(monkeypatch, both_threads=True)
    two = extract.extract_parcels(bold, atlas, chunk_frames=chunk_frames)

    mappers = {name for name, _ in seen[1:]}  # seen[0]: the probe map in __init__
    assert len(mappers) == 2, seen  # the calling thread and the helper both reduced windows
    window_starts = sorted(t0 for _, t0 in seen[1:])
    assert window_starts == list(range(0, N_FRAMES, chunk_frames)), seen  # each one once
    assert two.series.tobytes() == one.series.tobytes()
    np.testing.assert_array_equal(two.non_finite, one.non_finite)
    assert two.non_finite[7] == 1 and two.non_finite[20:23].tolist() == [1, 1, 1]
    assert not _reduce_threads_alive()


@pytest.mark.parametrize("threads", ["one cpu", "NII_THREADS=1"])
def test_no_helper_thread_on_one_cpu(
    tmp_path, labels_path, atlas, monkeypatch, small_windows, threads
):
    bold = _write_bold(tmp_path / "bold.nii")
    if threads == "one cpu":
        if hasattr(extract.os, "sched_getaffinity"):
            monkeypatch.setattr(extract.os, "sched_getaffinity", lambda pid: {0})
        else:  # pragma: no cover
            monkeypatch.setattr(extract.os, "cpu_count", lambda: 1)
    else:
        _two_cpus(monkeypatch)
        monkeypatch.setattr(extract, "NII_THREADS", 1)
    seen = _record_maps(monkeypatch)
    series, _ = extract_parcel_series(bold, atlas, chunk_frames=2)

    assert {name for name, _ in seen} == {threading.current_thread().name}
    np.testing.assert_allclose(series, _nilearn_means(bold, labels_path), rtol=1e-5)


def test_error_in_the_helper_names_the_file_and_no_thread_is_left(
    tmp_path, atlas, monkeypatch, small_windows
):
    bold = _write_bold(tmp_path / "failing_bold.nii")
    _two_cpus(monkeypatch)
    original = extract._MappedFrames._map
    helper_failed = threading.Event()

    def failing_in_helper(self, t0, n):
        if threading.current_thread().name.startswith("painnet-reduce"):
            helper_failed.set()
            raise OSError(f"{bold}: cannot map frames {t0}..{t0 + n}")
        if n > 1:  # a window (not the probe map): wait for the helper to fail in its own
            assert helper_failed.wait(timeout=30)
        return original(self, t0, n)

    monkeypatch.setattr(extract._MappedFrames, "_map", failing_in_helper)
    with pytest.raises(OSError, match=r"failing_bold\.nii: cannot map frames"):
        extract.extract_parcels(bold, atlas, chunk_frames=2)
    assert helper_failed.is_set()
    assert not _reduce_threads_alive()


def test_error_in_the_calling_thread_stops_and_joins_the_helper(
    tmp_path, atlas, monkeypatch, small_windows
):
    bold = _write_bold(tmp_path / "bold.nii")
    _two_cpus(monkeypatch)
    original = extract._ParcelReducer.sums
    helper_sums = []
    helper_busy = threading.Event()

    def failing_in_caller(self, frames, scratch=None):
        if threading.current_thread().name.startswith("painnet-reduce"):
            helper_sums.append(len(frames))
            helper_busy.set()
            time.sleep(0.005)
            return original(self, frames, scratch)
        assert helper_busy.wait(timeout=30)  # fail while the helper is at work
        raise RuntimeError("reduction failed in the calling thread")

    monkeypatch.setattr(extract._ParcelReducer, "sums", failing_in_caller)
    with pytest.raises(RuntimeError, match="calling thread"):
        extract.extract_parcels(bold, atlas, chunk_frames=2)
    assert not _reduce_threads_alive()
    assert sum(helper_sums) < N_FRAMES  # it stopped early, it did not reduce the rest


# --------------------------------------------------------------------------- the reduction


def _reference_sums(frames, flat_labels, label_ids):
    """Parcel sums in float64 by scatter-adding every labelled voxel, non-finite ones as 0."""
    clean = np.where(np.isfinite(frames), frames, 0).astype(np.float64)
    sums = np.zeros((frames.shape[0], label_ids.size))
    for k, label in enumerate(label_ids):
        sums[:, k] = clean[:, flat_labels == label].sum(axis=1)
    return sums


def _odd_atlas(rng, n_vox=3000):
    """Labels with sparse ids, parcels of 1 to ~300 voxels (most not a multiple of 8) and
    unlabelled voxels (0 and an id outside the atlas) scattered between them."""
    label_ids = np.array([3, 7, 8, 40, 41, 1000, 1001, 5000])
    sizes = np.array([1, 7, 8, 9, 17, 64, 250, 301])
    flat = np.zeros(n_vox, dtype=np.int32)
    flat[: sizes.sum()] = np.repeat(label_ids, sizes)
    flat[sizes.sum() : sizes.sum() + 50] = 99  # a label the atlas does not list
    return rng.permutation(flat), label_ids, sizes


@pytest.mark.parametrize("sweep", [False, True])
def test_reducer_sums_equal_a_float64_reference_for_any_parcel_size(sweep):
    rng = np.random.default_rng(11)
    flat, label_ids, sizes = _odd_atlas(rng)
    reducer = extract._ParcelReducer.from_labels(flat, label_ids, "odd atlas", sweep=sweep)
    frames = rng.normal(1000.0, 50.0, size=(9, flat.size)).astype(np.float32)

    sums, bad = reducer.sums(frames)

    assert bad is None
    np.testing.assert_array_equal(reducer.counts, sizes)
    np.testing.assert_allclose(sums, _reference_sums(frames, flat, label_ids), rtol=1e-7)
    if sweep:  # each lane is gathered in increasing voxel order
        assert np.all(np.diff(reducer.lanes[0]) > 0)


def test_sweeping_the_frame_changes_the_order_of_work_not_a_single_bit():
    rng = np.random.default_rng(15)
    flat, label_ids, _ = _odd_atlas(rng)
    frames = rng.normal(1000.0, 50.0, size=(6, flat.size)).astype(np.float32)
    frames[2, np.flatnonzero(flat == 1001)[:2]] = np.nan
    by_parcel = extract._ParcelReducer.from_labels(flat, label_ids, "odd atlas")
    swept = extract._ParcelReducer.from_labels(flat, label_ids, "odd atlas", sweep=True)

    (sums, bad), (swept_sums, swept_bad) = by_parcel.sums(frames), swept.sums(frames)

    assert swept_sums.tobytes() == sums.tobytes()
    np.testing.assert_array_equal(swept_bad, bad)
    np.testing.assert_array_equal(bad, [0, 0, 2, 0, 0, 0])


def test_reducer_reused_work_arrays_give_the_same_bytes_for_any_chunk_size():
    rng = np.random.default_rng(12)
    flat, label_ids, _ = _odd_atlas(rng)
    reducer = extract._ParcelReducer.from_labels(flat, label_ids, "odd atlas", sweep=True)
    frames = rng.normal(0.0, 1.0, size=(12, flat.size)).astype(np.float32)
    scratch = reducer.scratch()
    expected = reducer.sums(frames)[0]

    for bounds in ([0, 5, 12], [0, 1, 4, 12], [0, 12]):  # grow, shrink and regrow the arrays
        pieces = [reducer.sums(frames[a:b], scratch)[0] for a, b in zip(bounds, bounds[1:])]
        assert np.concatenate(pieces).tobytes() == expected.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, ">f4", np.int16, np.float64])
def test_reducer_handles_each_stored_type(dtype):
    rng = np.random.default_rng(13)
    flat, label_ids, _ = _odd_atlas(rng)
    reducer = extract._ParcelReducer.from_labels(flat, label_ids, "odd atlas")
    frames = rng.normal(500.0, 100.0, size=(4, flat.size)).astype(dtype)

    sums, bad = reducer.sums(frames)

    assert bad is None
    np.testing.assert_allclose(sums, _reference_sums(frames, flat, label_ids), rtol=1e-6)


def test_reducer_counts_non_finite_values_inside_parcels_only():
    rng = np.random.default_rng(14)
    flat, label_ids, _ = _odd_atlas(rng)
    reducer = extract._ParcelReducer.from_labels(flat, label_ids, "odd atlas", sweep=True)
    frames = rng.normal(10.0, 1.0, size=(3, flat.size)).astype(np.float32)
    inside = np.flatnonzero(np.isin(flat, label_ids))
    outside = np.flatnonzero(~np.isin(flat, label_ids))
    frames[0, inside[:3]] = [np.nan, np.inf, -np.inf]
    frames[1, outside[:5]] = np.nan  # outside every parcel: neither counted nor summed
    frames[2, inside[-1]] = np.nan
    frames[2, outside[-1]] = np.inf

    sums, bad = reducer.sums(frames)

    np.testing.assert_array_equal(bad, [3, 0, 1])
    np.testing.assert_allclose(sums, _reference_sums(frames, flat, label_ids), rtol=1e-7)


def test_reducer_rejects_empty_parcels_and_frames_of_another_grid():
    flat = np.array([0, 1, 1, 2, 0, 2], dtype=np.int32)
    with pytest.raises(ValueError, match=r"grid.nii: atlas parcels \[3\] have no voxel"):
        extract._ParcelReducer.from_labels(flat, np.array([1, 2, 3]), "grid.nii")
    reducer = extract._ParcelReducer.from_labels(flat, np.array([1, 2]), "grid.nii")
    with pytest.raises(ValueError, match=r"expected \(n, 6\)"):
        reducer.sums(np.zeros((2, 7), dtype=np.float32))


# --------------------------------------------------------------------------- gzip backends

BACKENDS = sorted(extract.GZIP_BACKENDS)


def test_isal_is_used_when_installed():
    try:
        import isal  # noqa: F401
    except ImportError:
        assert extract.GZIP_BACKEND == "zlib"
    else:
        assert extract.GZIP_BACKEND == "isal"


@pytest.mark.skipif("isal" not in extract.GZIP_BACKENDS, reason="isal is not installed")
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_isal_and_zlib_give_byte_identical_series(tmp_path, atlas, monkeypatch, dtype):
    plain = _write_bold(tmp_path / "bold.nii", dtype=dtype)
    raw = plain.read_bytes()
    single = tmp_path / "single.nii.gz"
    single.write_bytes(gzip.compress(raw, compresslevel=6))
    multi = tmp_path / "multi.nii.gz"  # members cut mid-frame, zero padding between them
    multi.write_bytes(
        gzip.compress(raw[:1001]) + b"\x00" * 3 + gzip.compress(raw[1001:], compresslevel=1)
    )
    series = {}
    for backend in ("isal", "zlib"):
        monkeypatch.setattr(extract, "GZIP_BACKEND", backend)
        for path in (single, multi):
            out = extract.extract_parcels(path, atlas, chunk_frames=3)
            series[backend, path.name] = out.series.tobytes()
    reference = extract.extract_parcels(plain, atlas).series.tobytes()
    assert set(series.values()) == {reference}


def _gzip_variants(tmp_path) -> dict:
    whole = gzip.compress(_write_bold(tmp_path / "whole.nii").read_bytes(), compresslevel=1)
    crc = bytearray(whole)
    crc[-8] ^= 0xFF  # the member's CRC-32
    length = bytearray(whole)
    length[-2] ^= 0xFF  # the member's uncompressed length
    return {
        "truncated": (whole[: len(whole) // 2], "gzip stream is truncated"),
        "bad_crc": (bytes(crc), "corrupt gzip data"),
        "bad_length": (bytes(length), "corrupt gzip data"),
        "trailing_garbage": (whole + b"\x00\x00garbage after the member", "corrupt gzip data"),
        "second_member_truncated": (whole + whole[:200], "gzip stream is truncated"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", ["truncated", "bad_crc", "bad_length", "trailing_garbage", "second_member_truncated"]
)
def test_broken_gzip_fails_the_same_with_every_backend(tmp_path, atlas, monkeypatch, backend, case):
    monkeypatch.setattr(extract, "GZIP_BACKEND", backend)
    data, message = _gzip_variants(tmp_path)[case]
    path = tmp_path / f"{case}_bold.nii.gz"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"{case}_bold\.nii\.gz: {message}"):
        extract.extract_parcels(path, atlas, chunk_frames=4)


def test_unknown_gzip_backend_is_named(tmp_path, atlas, monkeypatch):
    bold = _write_bold(tmp_path / "bold.nii.gz")
    monkeypatch.setattr(extract, "GZIP_BACKEND", "zstd")
    with pytest.raises(ValueError, match="gzip backend 'zstd' is not available"):
        extract.extract_parcels(bold, atlas)


def test_multi_member_gzip_is_read_whole(tmp_path, labels_path, atlas):
    plain = _write_bold(tmp_path / "bold.nii")
    raw = plain.read_bytes()
    cut = len(raw) // 3
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]) + b"\x00" * 8)
    series, _ = extract_parcel_series(multi, atlas, chunk_frames=5)
    reference, _ = extract_parcel_series(plain, atlas)
    np.testing.assert_array_equal(series, reference)


# --------------------------------------------------------------------------- CIFTI and TSV


def _brain_models() -> cifti2.BrainModelAxis:
    mask = np.zeros((5, 5, 4), dtype=bool)
    mask[1:4, 1:4, 1:3] = True
    surface = cifti2.BrainModelAxis.from_surface(
        np.arange(0, 120, 2), nvertex=130, name="CortexLeft"
    )
    volume = cifti2.BrainModelAxis.from_mask(mask, affine=np.eye(4), name="thalamus_left")
    return surface + volume


def test_cifti_dtseries_gives_label_means(tmp_path, monkeypatch):
    models = _brain_models()
    n_gray, n_frames = len(models), 25
    rng = np.random.default_rng(4)
    data = rng.normal(size=(n_frames, n_gray)).astype(np.float32)
    header = cifti2.Cifti2Header.from_axes((cifti2.SeriesAxis(0, 0.8, n_frames), models))
    bold = tmp_path / "sub-01_space-fsLR_den-91k_bold.dtseries.nii"
    nib.save(cifti2.Cifti2Image(data, header), bold)
    labels = rng.integers(0, 6, size=n_gray)
    atlas = Atlas(
        name="toy",
        kind="grayordinates",
        labels=labels.astype(np.int32),
        affine=None,
        label_ids=np.arange(1, 6),
        names=[f"r{i}" for i in range(1, 6)],
        space=None,
    )
    expected = np.stack(
        [data[:, labels == i].mean(axis=1, dtype=np.float64) for i in range(1, 6)], axis=1
    )
    monkeypatch.setattr(extract, "READ_BUDGET_BYTES", 2000)  # several grayordinate blocks
    series, names = extract_parcel_series(bold, atlas)
    assert names == ["r1", "r2", "r3", "r4", "r5"]
    assert series.dtype == np.float32
    np.testing.assert_allclose(series, expected, rtol=1e-5)


def test_cifti_rejects_volume_atlas_and_wrong_length(tmp_path, atlas):
    models = _brain_models()
    header = cifti2.Cifti2Header.from_axes((cifti2.SeriesAxis(0, 1.0, 3), models))
    bold = tmp_path / "bold.dtseries.nii"
    nib.save(cifti2.Cifti2Image(np.zeros((3, len(models)), np.float32), header), bold)
    with pytest.raises(ValueError, match="grayordinate atlas"):
        extract_parcel_series(bold, atlas)
    short = Atlas("short", "grayordinates", np.ones(10, np.int32), None, np.array([1]), ["a"], None)
    with pytest.raises(ValueError, match=r"bold\.dtseries\.nii.*10 grayordinates"):
        extract_parcel_series(bold, short)


def _write_tsv(tmp_path):
    table = pd.DataFrame({"V1": [1.0, 2.0, 3.0], "M1": [4.0, 5.0, 6.0], "ACC": [7.0, 8.0, 9.0]})
    path = tmp_path / "sub-01_task-rest_seg-X_stat-mean_timeseries.tsv"
    table.to_csv(path, sep="\t", index=False)
    return path


def _named_atlas(names):
    ids = np.arange(1, len(names) + 1)
    return Atlas("named", "grayordinates", ids.astype(np.int32), None, ids, list(names), None)


def test_xcpd_tsv_returns_its_columns(tmp_path):
    series, names = extract_parcel_series(_write_tsv(tmp_path), None)
    assert names == ["V1", "M1", "ACC"]
    assert series.dtype == np.float32
    np.testing.assert_array_equal(series[:, 1], [4.0, 5.0, 6.0])


def test_xcpd_tsv_is_reordered_to_atlas_names(tmp_path):
    series, names = extract_parcel_series(_write_tsv(tmp_path), _named_atlas(["ACC", "V1"]))
    assert names == ["ACC", "V1"]
    np.testing.assert_array_equal(series, [[7.0, 1.0], [8.0, 2.0], [9.0, 3.0]])


def test_xcpd_tsv_with_foreign_atlas_names(tmp_path):
    path = _write_tsv(tmp_path)
    with pytest.warns(UserWarning, match="column names differ"):
        _, names = extract_parcel_series(path, _named_atlas(["a", "b", "c"]))
    assert names == ["V1", "M1", "ACC"]
    with pytest.raises(ValueError, match="timeseries.tsv.*3 columns"):
        extract_parcel_series(path, _named_atlas(["a", "b"]))


# --------------------------------------------------------------------------- errors


def test_missing_file_is_named(tmp_path, atlas):
    with pytest.raises(FileNotFoundError, match="nope_bold.nii.gz"):
        extract_parcel_series(tmp_path / "nope_bold.nii.gz", atlas)


def test_three_d_image_is_rejected(tmp_path, atlas):
    path = tmp_path / "three_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), _affine()), path)
    with pytest.raises(ValueError, match=r"three_d\.nii\.gz.*4-D"):
        extract_parcel_series(path, atlas)


def test_zero_frames_is_rejected(tmp_path, atlas):
    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE + (0,), np.float32), _affine()), path)
    with pytest.raises(ValueError, match=r"empty\.nii\.gz.*zero frames"):
        extract_parcel_series(path, atlas)


def test_truncated_gzip_is_rejected(tmp_path, atlas):
    whole = _write_bold(tmp_path / "whole.nii.gz").read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut\.nii\.gz.*truncated"):
        extract_parcel_series(cut, atlas)


def test_short_uncompressed_file_is_rejected(tmp_path, atlas):
    whole = _write_bold(tmp_path / "whole.nii").read_bytes()
    cut = tmp_path / "cut.nii"
    cut.write_bytes(whole[: len(whole) - 100])
    with pytest.raises(ValueError, match=r"cut\.nii: file ends early.*frame 39"):
        extract_parcel_series(cut, atlas)


def test_grayordinate_atlas_with_volume_is_rejected(tmp_path):
    bold = _write_bold(tmp_path / "bold.nii.gz")
    with pytest.raises(ValueError, match=r"bold\.nii\.gz.*volume atlas"):
        extract_parcel_series(bold, _named_atlas(["a", "b"]))


def test_nifti_needs_an_atlas_and_known_suffix(tmp_path):
    bold = _write_bold(tmp_path / "bold.nii")
    with pytest.raises(ValueError, match=r"bold\.nii.*atlas is needed"):
        extract_parcel_series(bold, None)
    other = tmp_path / "bold.mgz"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"bold\.mgz.*unsupported"):
        extract_parcel_series(other, None)


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_peak_memory_is_a_small_fraction_of_the_run(tmp_path, suffix):
    """Allocations stay small (a .nii is also mapped only MAP_BUDGET_BYTES at a time, which
    tracemalloc does not see)."""
    shape = (64, 64, 40, 120)  # 78.6 MB of float32 once decompressed
    rng = np.random.default_rng(5)
    data = np.zeros(shape, dtype=np.float32)
    data[8:56, 8:56, 5:35] = rng.normal(size=(48, 48, 30, shape[3])).astype(np.float32)
    bold = tmp_path / f"big_bold{suffix}"
    nib.save(nib.Nifti1Image(data, np.eye(4)), bold)
    decompressed = data.nbytes
    labels = np.zeros(shape[:3], dtype=np.int16)
    labels[8:56, 8:56, 5:35] = rng.integers(1, 101, size=(48, 48, 30))
    atlas = Atlas(
        name="big",
        kind="volume",
        labels=labels.astype(np.int32),
        affine=np.eye(4),
        label_ids=np.arange(1, 101),
        names=[f"p{i}" for i in range(1, 101)],
        space=None,
    )
    expected = data[8:56, 8:56, 5:35][labels[8:56, 8:56, 5:35] == 7].mean(axis=0, dtype=np.float64)
    del data

    tracemalloc.start()
    try:
        series, _ = extract_parcel_series(bold, atlas)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.25 * decompressed, f"peak {peak / 1e6:.1f} MB"
    # voxels ~ N(0, 1): lanes of 8 voxels are added in float32, so a mean is exact to ~1e-8 of
    # the voxels' scale (the float32 output's own rounding); rtol alone fails means near 0
    np.testing.assert_allclose(series[:, 6], expected, rtol=1e-5, atol=1e-7)
