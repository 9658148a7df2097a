"""Parcel time series from a BOLD file, streamed with bounded memory.

Three inputs, told apart by file name:

- ``*.nii`` / ``*.nii.gz``: a 4-D NIfTI; each parcel's signal is the mean over its voxels;
- ``*.dtseries.nii``: a CIFTI-2 dense time series; mean over each label's grayordinates;
- ``*.tsv``: an already parcellated table (XCP-D ``*_timeseries.tsv``), one column per parcel.

NIfTI runs are never loaded whole. The header is parsed by nibabel; the voxel data, stored frame
after frame (each frame a Fortran-ordered block of X*Y*Z values after ``vox_offset``), is then
reduced window by window:

- ``.nii``: memory-mapped a window of frames at a time (``MAP_BUDGET_BYTES``); the reduction
  reads the labelled voxels straight from the page cache, so no byte is copied into a buffer.
  Where the process may use more than one CPU, ``NII_THREADS`` threads (the caller's and
  helpers) each take the next unreduced window, map it and reduce it: the gather waits on
  memory more than on arithmetic, so a second core nearly halves it; the chunks are the same
  whatever the thread count, so are the series, to the bit. Where a file cannot be mapped,
  plain reads into a reused buffer are used instead.
- ``.nii.gz``: a background thread inflates the next chunk of frames into one of two reused
  buffers while the main thread reduces the current one. Inflating uses ISA-L's igzip (the
  ``isal`` package) when it is installed, else Python's zlib: the same bytes either way (both
  check each member's CRC and length), about 2x faster with ISA-L (``benchmarks/README.md``).

The reduction (:class:`_ParcelReducer`) gathers each parcel's voxels into lanes of
``_LANES`` (one ``np.take`` per chunk, into reused arrays; for a mapped ``.nii`` the groups
of lanes are ordered by their first voxel, so that each lane sweeps the frame forwards), adds
the lanes in the stored precision when that is exact or close (float32 for float32 and
8/16-bit integers; a sum of 8 values), then adds the lane sums of each parcel with
``np.add.reduceat`` in float64. The gather (about 1 ns per labelled voxel and frame) is what
bounds a ``.nii`` (``benchmarks/RESULTS.md``). Raw stored values are averaged and the NIfTI
scaling (``scl_slope``, ``scl_inter``) is applied to the means, which is exact because it is
linear.

Non-finite voxel values inside parcels count as 0 in the means (as in nilearn's
NiftiLabelsMasker), and :func:`extract_parcels` returns how many there were in each frame, so
that cleaning can censor those frames (:mod:`painnet.data.preprocess`).
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import nibabel as nib
import numpy as np

from painnet.data.atlas import Atlas, atlas_for_bold

try:  # ISA-L igzip: same output as zlib, about twice as fast to inflate
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - depends on the platform's wheels
    _isal_zlib = None

# Bytes of one read buffer; two are alive at once. Small buffers stay in cache between the
# read and the gather, so they are no slower than big ones, and they bound memory whatever
# the run length or ``chunk_frames``.
READ_BUDGET_BYTES = 2 << 20
# Bytes of a .nii mapped at once (mapped pages of the file count in the resident memory;
# 32 and 64 MiB measured no faster).
MAP_BUDGET_BYTES = 16 << 20
# Most threads reducing a mapped .nii (the caller's included; at most the CPUs this process
# may use). Each thread maps and reduces whole windows of its own: the gather is bound by
# memory latency (about 0.3 s for a 1.9 GB run from the page cache, 0.19 s from cache), which
# a second core overlaps. A pipeline instead (a thread copying frames into buffers, another
# reducing them) adds the copy's CPU. With other jobs on the cores (busy loops, a torch
# training loop, a second extraction) two threads measured no slower than one.
NII_THREADS = 2
# Most bytes of mapped frames reduced at once (the gathered voxels, in reused arrays, are
# about a third of them; 16 MiB measured no faster).
MAP_CHUNK_BYTES = 8 << 20
# Compressed bytes read from a .nii.gz per call, and most bytes inflated per call (each call
# returns a new bytes object that is copied into the frame buffer).
_GZ_BLOCK = 256 << 10
_GZ_OUT_MAX = 1 << 20
# Voxels added per lane in the stored precision before the float64 sum (see _ParcelReducer).
_LANES = 8

# Inflaters by name, fastest first; GZIP_BACKEND is the one used (tests and benchmarks may
# set it to "zlib" to compare).
GZIP_BACKENDS: dict[str, Any] = {"isal": _isal_zlib, "zlib": zlib}
GZIP_BACKENDS = {name: module for name, module in GZIP_BACKENDS.items() if module is not None}
GZIP_BACKEND = next(iter(GZIP_BACKENDS))
_GZIP_ERRORS = tuple({module.error for module in GZIP_BACKENDS.values()})


@dataclass(frozen=True)
class ParcelSeries:
    """What :func:`extract_parcels` returns for one run.

    series:     ``(T, P)`` float32 parcel means (non-finite voxels counted as 0).
    names:      the P parcel names.
    non_finite: ``(T,)`` int64, how many non-finite values (NaN, inf) lay inside parcels in
                each frame (for a TSV: non-finite cells of the row).
    """

    series: np.ndarray
    names: list[str]
    non_finite: np.ndarray


def extract_parcel_series(
    bold_path: str | Path, atlas: Atlas | None, chunk_frames: int = 64
) -> tuple[np.ndarray, list[str]]:
    """Parcel time series of one run: ``(series, names)`` (see :func:`extract_parcels`).

    Warns when non-finite values were met; use :func:`extract_parcels` to get their counts.
    """
    out = extract_parcels(bold_path, atlas, chunk_frames)
    if out.non_finite.any():
        warnings.warn(
            f"{bold_path}: {int(out.non_finite.sum())} non-finite values inside parcels in "
            f"{int(np.count_nonzero(out.non_finite))} frames were treated as 0",
            stacklevel=2,
        )
    return out.series, out.names


def extract_parcels(
    bold_path: str | Path, atlas: Atlas | None, chunk_frames: int = 64
) -> ParcelSeries:
    """Parcel time series of one run, with the count of non-finite values per frame.

    ``series`` is ``(T, P)`` float32 (T frames as stored, P parcels in ``atlas.label_ids``
    order, or in column order for a TSV). ``chunk_frames`` is the most frames read at once from
    a NIfTI (also capped so one read buffer stays within ``READ_BUDGET_BYTES``). ``atlas`` may
    be ``None`` only for a TSV. A volume atlas on another grid is resampled (nearest neighbour)
    to the BOLD grid.
    """
    path = Path(bold_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"BOLD file not found: {path}")
    if int(chunk_frames) < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    name = path.name
    if name.endswith(".dtseries.nii"):
        return _extract_cifti(path, _require_atlas(atlas, path))
    if name.endswith((".tsv", ".tsv.gz")):
        return _extract_tsv(path, atlas)
    if name.endswith((".nii", ".nii.gz")):
        return _extract_nifti(path, _require_atlas(atlas, path), int(chunk_frames))
    raise ValueError(
        f"{path}: unsupported BOLD file; expected .nii, .nii.gz, .dtseries.nii or .tsv"
    )


def _require_atlas(atlas: Atlas | None, path: Path) -> Atlas:
    if atlas is None:
        raise ValueError(f"{path}: an atlas is needed to parcellate this file")
    return atlas


# --------------------------------------------------------------------------- reduction


@dataclass(frozen=True)
class _ParcelReducer:
    """Precomputed map from flat frames ``(n, V)`` to parcel sums ``(n, P)`` (``/ counts``
    gives the means).

    Each parcel's voxels (in spatial order) are dealt into groups of ``_LANES``: a group holds
    ``_LANES`` voxels of one parcel, ``lanes[:, g]``; in parcel order, a parcel's groups are
    contiguous and start at ``group_starts``. With ``sweep`` the groups are stored sorted by
    their first voxel instead, so that each lane of the gather sweeps the frame forwards, and
    ``group_order`` puts the group sums back in parcel order. That pays where the frames come
    from memory (a mapped ``.nii``: the gather measured ~15 % faster than parcel after parcel,
    which jumps back and forth across the frame), not where a frame was just written into a
    small buffer and is still in cache (``.nii.gz``, real time): there the extra reordering
    costs 10-25 %, so sweeping is off by default. A parcel whose size is not a multiple of
    ``_LANES`` has padding slots in its last group (``pad``: flat positions in ``lanes``);
    they gather voxel 0 and are set to 0 before the lanes are added.

    lanes:        ``(_LANES, G)`` intp voxel positions.
    pad:          flat positions of the padding slots in ``lanes``.
    group_order:  ``(G,)`` intp: for each group in parcel order, its column in ``lanes``
                  (``None``: the columns are in parcel order).
    group_starts: ``(P,)`` first group of each parcel (parcel order).
    counts:       ``(P,)`` float64 number of voxels per parcel.
    n_vox:        values per frame (the length of the label array).
    """

    lanes: np.ndarray
    pad: np.ndarray
    group_order: np.ndarray | None
    group_starts: np.ndarray
    counts: np.ndarray
    n_vox: int

    @classmethod
    def from_labels(
        cls, flat_labels: np.ndarray, label_ids: np.ndarray, where: str, sweep: bool = False
    ):
        """Build from a flat label array (frame layout) and the parcels wanted, in order;
        ``sweep``: store the groups in spatial order (for frames read from memory)."""
        position = _parcel_positions(flat_labels, label_ids)
        wanted = np.flatnonzero(position >= 0)
        # a stable sort of small integers is a radix sort: fast, and spatial order is kept
        small = np.int16 if label_ids.size < np.iinfo(np.int16).max else np.int32
        index = wanted[np.argsort(position[wanted].astype(small), kind="stable")]
        counts = np.bincount(position[index], minlength=label_ids.size)
        if np.any(counts == 0):
            empty = label_ids[counts == 0].tolist()
            raise ValueError(f"{where}: atlas parcels {empty[:10]} have no voxel on this grid")
        groups = -(-counts // _LANES)
        group_starts = np.concatenate([[0], np.cumsum(groups)[:-1]])
        rank = np.arange(index.size) - np.repeat(np.cumsum(counts) - counts, counts)
        group = np.repeat(group_starts, counts) + rank // _LANES
        lanes = np.zeros((_LANES, int(groups.sum())), dtype=np.intp)
        is_pad = np.ones(lanes.shape, dtype=bool)
        lanes[rank % _LANES, group] = index
        is_pad[rank % _LANES, group] = False
        group_order = None
        if sweep:  # lane 0 always holds a group's first voxel
            spatial = np.argsort(lanes[0], kind="stable")
            group_order = np.empty_like(spatial)
            group_order[spatial] = np.arange(spatial.size)
            lanes, is_pad = np.ascontiguousarray(lanes[:, spatial]), is_pad[:, spatial]
        return cls(
            lanes=lanes,
            pad=np.flatnonzero(is_pad),
            group_order=group_order,
            group_starts=group_starts,
            counts=counts.astype(np.float64),
            n_vox=int(flat_labels.size),
        )

    def scratch(self) -> _ReduceScratch:
        """Reusable work arrays for :meth:`sums` (one per thread)."""
        return _ReduceScratch()

    def sums(
        self, frames: np.ndarray, scratch: _ReduceScratch | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Parcel sums ``(n, P)`` float64 of ``frames`` ``(n, V)``, and the number of
        non-finite values inside parcels per frame (``None`` when there were none; they are
        counted as 0 in the sums).

        With ``scratch`` the gathered voxels go into arrays reused from call to call: fresh
        multi-MiB arrays cost page faults on every chunk.
        """
        n = frames.shape[0]
        if frames.ndim != 2 or frames.shape[1] != self.n_vox:
            raise ValueError(f"frames of shape {frames.shape}: expected (n, {self.n_vox})")
        lane_dtype = _lane_dtype(frames.dtype)
        work = scratch if scratch is not None else _ReduceScratch()
        # mode="clip" lets take write into ``out`` directly (the positions are in range)
        picked = np.take(
            frames,
            self.lanes,
            axis=1,
            mode="clip",
            out=work.get("picked", (n, *self.lanes.shape), frames.dtype),
        )
        flat = picked.reshape(n, -1)
        flat[:, self.pad] = 0
        lane_sums = picked.sum(
            axis=1, dtype=lane_dtype, out=work.get("lanes", (n, self.lanes.shape[1]), lane_dtype)
        )
        sums = self._parcel_sums(lane_sums, work)
        if np.isfinite(sums).all():
            return sums, None
        bad = ~np.isfinite(flat)
        flat[bad] = 0
        sums = self._parcel_sums(picked.sum(axis=1, dtype=np.float64), work)
        return sums, bad.sum(axis=1)

    def _parcel_sums(self, lane_sums: np.ndarray, work: _ReduceScratch) -> np.ndarray:
        """Group sums ``(n, G)`` (``lanes`` order) -> parcel sums ``(n, P)`` float64."""
        if self.group_order is None:
            return np.add.reduceat(lane_sums, self.group_starts, axis=1, dtype=np.float64)
        by_parcel = np.take(
            lane_sums,
            self.group_order,
            axis=1,
            mode="clip",
            out=work.get("by_parcel", lane_sums.shape, lane_sums.dtype),
        )
        return np.add.reduceat(by_parcel, self.group_starts, axis=1, dtype=np.float64)


class _ReduceScratch:
    """Work arrays of :meth:`_ParcelReducer.sums`, kept between calls and grown on demand."""

    def __init__(self) -> None:
        self._arrays: dict[tuple[str, np.dtype], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype`` (contents undefined)."""
        size = math.prod(shape)
        key = (name, np.dtype(dtype))
        have = self._arrays.get(key)
        if have is None or have.size < size:
            have = self._arrays[key] = np.empty(size, dtype=key[1])
        return have[:size].reshape(shape)


def _parcel_positions(flat_labels: np.ndarray, label_ids: np.ndarray) -> np.ndarray:
    """For each voxel, the position of its label in ``label_ids`` (sorted), or -1."""
    lo = min(int(flat_labels.min()), int(label_ids.min()))
    hi = max(int(flat_labels.max()), int(label_ids.max()))
    if flat_labels.dtype.kind in "iu" and lo >= 0 and hi < (1 << 22):  # a lookup table
        table = np.full(hi + 1, -1, dtype=np.int32)
        table[label_ids] = np.arange(label_ids.size, dtype=np.int32)
        return table[flat_labels]
    position = np.searchsorted(label_ids, flat_labels)
    position[position == label_ids.size] = 0
    return np.where(label_ids[position] == flat_labels, position, -1)


def _lane_dtype(stored: np.dtype) -> type:
    """float32 where adding ``_LANES`` stored values in it is exact (8/16-bit integers) or as
    precise as the values (float32 and float16); float64 otherwise."""
    if (stored.kind in "iu" and stored.itemsize <= 2) or (
        stored.kind == "f" and stored.itemsize <= 4
    ):
        return np.float32
    return np.float64


# --------------------------------------------------------------------------- NIfTI


@dataclass(frozen=True)
class _NiftiLayout:
    """Where and how a 4-D NIfTI stores its frames."""

    n_vox: int  # X*Y*Z values per frame
    n_frames: int
    dtype: np.dtype  # stored dtype, with byte order
    offset: int  # bytes before the first frame (vox_offset)
    slope: float
    inter: float

    @property
    def frame_bytes(self) -> int:
        return self.n_vox * self.dtype.itemsize


def _extract_nifti(path: Path, atlas: Atlas, chunk_frames: int) -> ParcelSeries:
    img = _load_nifti_header(path)
    layout = _nifti_layout(path, img)
    atlas = atlas_for_bold(atlas, img)
    flat = atlas.labels.ravel(order="F")  # NIfTI frames are Fortran-ordered
    # a .nii is gathered from the page cache (memory): sweep; a .nii.gz from a cached buffer
    sweep = not path.name.endswith(".gz")
    reducer = _ParcelReducer.from_labels(flat, atlas.label_ids, str(path), sweep=sweep)
    series = np.empty((layout.n_frames, atlas.n_parcels), dtype=np.float32)
    non_finite = np.zeros(layout.n_frames, dtype=np.int64)

    def reduce(chunks: Iterator[tuple[int, np.ndarray]]) -> None:
        """Reduce ``chunks`` into their rows of ``series`` (one call per thread: the rows of
        different calls never overlap)."""
        scratch = reducer.scratch()
        for t0, frames in chunks:
            sums, bad = reducer.sums(frames, scratch)
            if bad is not None:
                non_finite[t0 : t0 + len(frames)] = bad
            series[t0 : t0 + len(frames)] = _scaled(sums / reducer.counts, layout)

    mapped = None
    if not path.name.endswith(".gz"):
        _check_nii_size(path, layout)
        try:
            mapped = _MappedFrames(path, layout)
        except (OSError, ValueError):  # a file system without mmap: read it instead
            mapped = None
    if mapped is not None:
        with mapped:
            per_chunk = _frames_within(MAP_CHUNK_BYTES, chunk_frames, layout)
            mapped.reduce(reduce, per_chunk, _reduce_threads())
    else:
        with closing(_read_chunks(path, layout, chunk_frames)) as chunks:  # closes the file
            reduce(chunks)
    return ParcelSeries(series, list(atlas.names), non_finite)


def _reduce_threads() -> int:
    """Threads to reduce a mapped ``.nii`` with: ``NII_THREADS``, at most the CPUs this
    process may use (one on a single CPU: no helper thread is started)."""
    return max(1, min(NII_THREADS, _usable_cpus()))


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover - platforms without affinity masks


def _read_chunks(
    path: Path, layout: _NiftiLayout, chunk_frames: int
) -> Iterator[tuple[int, np.ndarray]]:
    """``(first_frame, frames (n, V))`` of a ``.nii.gz``, or of a ``.nii`` that cannot be
    mapped, read into reused buffers; a chunk is valid until the next one. Chunks hold at most
    ``chunk_frames`` frames and ``READ_BUDGET_BYTES`` of them.
    """
    per_chunk = _frames_within(READ_BUDGET_BYTES, chunk_frames, layout)
    with _open_frames(path, layout.offset) as reader:
        # closing() joins the read-ahead thread before the reader is used again or closed
        with closing(_frame_chunks(reader, layout, per_chunk, path)) as chunks:
            yield from chunks
        reader.finish()


def _frames_within(budget: int, chunk_frames: int, layout: _NiftiLayout) -> int:
    """Frames per chunk: at most ``chunk_frames`` and ``budget`` bytes, at least one."""
    return max(1, min(chunk_frames, layout.n_frames, budget // layout.frame_bytes))


def _check_nii_size(path: Path, layout: _NiftiLayout) -> None:
    stored = path.stat().st_size - layout.offset
    if stored < layout.n_frames * layout.frame_bytes:
        raise ValueError(
            f"{path}: file ends early, inside frame {max(stored, 0) // layout.frame_bytes} "
            f"of {layout.n_frames}"
        )


class _MappedFrames:
    """An uncompressed ``.nii`` mapped read-only, ``MAP_BUDGET_BYTES`` of frames at a time
    (the page cache is read in place; the window after those being reduced is announced to the
    kernel for read-ahead)."""

    def __init__(self, path: Path, layout: _NiftiLayout) -> None:
        self.layout = layout
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed in __exit__)
        self.window = max(1, MAP_BUDGET_BYTES // layout.frame_bytes)
        try:
            self._map(0, 1).close()  # fail here, not mid-run, where mapping is not supported
        except BaseException:
            self._file.close()
            raise

    def _map(self, t0: int, n: int) -> mmap.mmap:
        start = self.layout.offset + t0 * self.layout.frame_bytes
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(
            self._file.fileno(),
            start - aligned + n * self.layout.frame_bytes,
            flags=flags,
            prot=mmap.PROT_READ,
            offset=aligned,
        )

    def reduce(
        self,
        reduce: Callable[[Iterator[tuple[int, np.ndarray]]], None],
        per_chunk: int,
        threads: int = 1,
    ) -> None:
        """Call ``reduce(chunks)`` in ``threads`` threads (this one and helpers), each over the
        chunks of the windows it takes, the next untaken window each time.

        Chunks are the same whatever the thread count (a window holds whole chunks). An error
        in any thread stops the others after their current window, every helper is joined, and
        the error is raised here (this thread's own first).
        """
        self.window = max(per_chunk, self.window // per_chunk * per_chunk)  # whole chunks
        starts = iter(range(0, self.layout.n_frames, self.window))
        lock, failed = threading.Lock(), threading.Event()

        def windows() -> Iterator[int]:
            while not failed.is_set():
                with lock:  # one taker at a time: each window goes to exactly one thread
                    w0 = next(starts, None)
                if w0 is None:
                    return
                yield w0

        def work() -> None:
            try:
                with closing(self.chunks(per_chunk, windows(), ahead=threads)) as chunks:
                    reduce(chunks)
            except BaseException:
                failed.set()
                raise

        if threads <= 1:
            work()
            return
        # leaving the with block joins the helpers, also when this thread's share fails
        with ThreadPoolExecutor(threads - 1, thread_name_prefix="painnet-reduce") as pool:
            try:
                helpers = [pool.submit(work) for _ in range(threads - 1)]
                work()
                for helper in helpers:
                    helper.result()
            except BaseException:  # also an interrupt while waiting: stop the helpers early
                failed.set()
                raise

    def chunks(
        self, per_chunk: int, windows: Iterator[int], ahead: int
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_frame, frames (n, V))`` of the windows starting at the frames ``windows``
        yields (``self.window`` frames each, set by :meth:`reduce` to whole chunks); a chunk is
        valid until the next one. The window ``ahead`` windows after each is announced to the
        kernel (the next one this or another thread will take)."""
        layout = self.layout
        for w0 in windows:
            n = min(self.window, layout.n_frames - w0)
            self._announce(w0 + ahead * self.window)
            start = layout.offset + w0 * layout.frame_bytes
            mapped = self._map(w0, n)
            try:
                frames = np.frombuffer(
                    mapped,
                    dtype=layout.dtype,
                    count=n * layout.n_vox,
                    offset=start % mmap.ALLOCATIONGRANULARITY,
                ).reshape(n, layout.n_vox)
                for t0 in range(0, n, per_chunk):
                    yield w0 + t0, frames[t0 : t0 + per_chunk]
                del frames  # the map can only be closed once no array uses it
            finally:
                # a caller may still hold a chunk: then the map goes when the chunk is freed
                with suppress(BufferError):
                    mapped.close()

    def _announce(self, t0: int) -> None:
        """Ask the kernel to start reading the window that begins at frame ``t0``."""
        if t0 >= self.layout.n_frames or not hasattr(os, "posix_fadvise"):
            return
        n = min(self.window, self.layout.n_frames - t0)
        start = self.layout.offset + t0 * self.layout.frame_bytes
        os.posix_fadvise(
            self._file.fileno(), start, n * self.layout.frame_bytes, os.POSIX_FADV_WILLNEED
        )

    def __enter__(self) -> _MappedFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _scaled(means: np.ndarray, layout: _NiftiLayout) -> np.ndarray:
    if layout.slope == 1.0 and layout.inter == 0.0:
        return means
    return means * layout.slope + layout.inter


def _load_nifti_header(path: Path) -> Any:
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises many types for unreadable files
        raise ValueError(f"{path}: cannot read as NIfTI: {err}") from err
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{path}: not a NIfTI image ({type(img).__name__})")
    return img


def _nifti_layout(path: Path, img: Any) -> _NiftiLayout:
    shape = img.shape
    if len(shape) != 4:
        raise ValueError(f"{path}: BOLD must be 4-D, got shape {shape}")
    if shape[3] == 0:
        raise ValueError(f"{path}: BOLD has zero frames")
    if 0 in shape[:3]:
        raise ValueError(f"{path}: BOLD has an empty spatial grid {shape[:3]}")
    proxy = img.dataobj
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "iuf":
        raise ValueError(f"{path}: unsupported voxel type {dtype}")
    if getattr(proxy, "order", "F") != "F":
        raise ValueError(f"{path}: expected Fortran-ordered NIfTI data")
    return _NiftiLayout(
        n_vox=int(np.prod(shape[:3])),
        n_frames=int(shape[3]),
        dtype=dtype,
        offset=int(proxy.offset),
        slope=float(proxy.slope),
        inter=float(proxy.inter),
    )


def _frame_chunks(
    reader: _FrameReader, layout: _NiftiLayout, per_chunk: int, path: Path
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_frame, frames)`` with ``frames`` ``(n, V)`` in the stored dtype.

    The next chunk is read in a worker thread into the other of two reused buffers while the
    caller works on the current one (zlib, ISA-L and file reads release the GIL). A yielded array is
    valid until the next item is requested.
    """
    bounds = [
        (t0, min(t0 + per_chunk, layout.n_frames)) for t0 in range(0, layout.n_frames, per_chunk)
    ]
    buffers = [np.empty(per_chunk * layout.frame_bytes, dtype=np.uint8) for _ in range(2)]

    def fill(k: int) -> np.ndarray:
        t0, t1 = bounds[k]
        raw = buffers[k % 2][: (t1 - t0) * layout.frame_bytes]
        got = reader.readinto(memoryview(raw))
        if got != raw.nbytes:
            raise ValueError(
                f"{path}: file ends early, inside frame {t0 + got // layout.frame_bytes} "
                f"of {layout.n_frames}"
            )
        return raw.view(layout.dtype).reshape(t1 - t0, layout.n_vox)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="painnet-read") as pool:
        pending = pool.submit(fill, 0)
        for k, (t0, _) in enumerate(bounds):
            frames = pending.result()
            if k + 1 < len(bounds):
                pending = pool.submit(fill, k + 1)
            yield t0, frames


class _FrameReader:
    """Sequential reader of the bytes after ``offset``; ``readinto`` fills as much as it can."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "rb", buffering=0)  # noqa: SIM115 (closed in close())

    def readinto(self, view: memoryview) -> int:
        raise NotImplementedError

    def finish(self) -> None:
        """Called after the last frame: check what remains of the file (nothing by default)."""

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PlainReader(_FrameReader):
    """Uncompressed ``.nii``: plain reads into the caller's buffer (no extra copy)."""

    def __init__(self, path: Path, offset: int) -> None:
        super().__init__(path, offset)
        self._file.seek(offset)

    def readinto(self, view: memoryview) -> int:
        filled = 0
        while filled < len(view):
            n = self._file.readinto(view[filled:])
            if not n:
                break
            filled += n
        return filled


class _GzipReader(_FrameReader):
    """``.nii.gz``: inflate the gzip stream (ISA-L or zlib, ``GZIP_BACKEND``; both check the
    CRC and length of each member), handling multi-member files and zero padding like the
    gzip module. Errors of either library become the same ``ValueError`` naming the file."""

    def __init__(self, path: Path, offset: int, backend: str | None = None) -> None:
        super().__init__(path, offset)
        name = GZIP_BACKEND if backend is None else backend
        if name not in GZIP_BACKENDS:
            raise ValueError(f"gzip backend {name!r} is not available; have {list(GZIP_BACKENDS)}")
        self._zlib = GZIP_BACKENDS[name]
        self._inflate = self._zlib.decompressobj(wbits=31)
        self._pending = b""  # compressed bytes read past the end of the previous member
        skipped = self.readinto(memoryview(bytearray(offset)))
        if skipped != offset:
            raise ValueError(f"{path}: file ends inside the NIfTI header")

    def readinto(self, view: memoryview) -> int:
        filled = 0
        try:
            while filled < len(view):
                if self._inflate.eof and not self._next_member():
                    break
                data = self._inflate.unconsumed_tail or self._pending or self._file.read(_GZ_BLOCK)
                self._pending = b""
                if not data:
                    raise ValueError(f"{self.path}: gzip stream is truncated")
                out = self._inflate.decompress(data, min(len(view) - filled, _GZ_OUT_MAX))
                view[filled : filled + len(out)] = out
                filled += len(out)
        except _GZIP_ERRORS as err:
            raise ValueError(f"{self.path}: corrupt gzip data: {err}") from err
        return filled

    def _next_member(self) -> bool:
        """After a member ends: start the next one; False at the end of the file."""
        rest = self._inflate.unused_data
        while True:
            rest = rest.lstrip(b"\x00")
            if rest:
                break
            rest = self._file.read(_GZ_BLOCK)
            if not rest:
                return False
        self._inflate = self._zlib.decompressobj(wbits=31)
        self._pending = rest
        return True

    def finish(self) -> None:
        """Inflate to the end so that the last member's CRC and length are verified."""
        scratch = memoryview(bytearray(1 << 16))
        while self.readinto(scratch):
            pass


def _open_frames(path: Path, offset: int) -> _FrameReader:
    reader = _GzipReader if path.name.endswith(".gz") else _PlainReader
    return reader(path, offset)


# --------------------------------------------------------------------------- CIFTI


def _extract_cifti(path: Path, atlas: Atlas) -> ParcelSeries:
    """Label means of a dtseries, read in blocks of grayordinates.

    CIFTI-2 stores the ``(T, N)`` matrix Fortran-ordered (time fastest), so a block of
    grayordinates ``[:, g0:g1]`` is one contiguous read while a block of frames is not.
    Parcel sums ``(P, T)`` accumulate in float64 across blocks.
    """
    img = _load_cifti(path)
    n_frames, n_gray = (int(s) for s in img.shape)
    atlas = atlas_for_bold(atlas, img)
    ids = atlas.label_ids
    counts = np.bincount(
        np.searchsorted(ids, atlas.labels[np.isin(atlas.labels, ids)]), minlength=ids.size
    )
    if np.any(counts == 0):
        raise ValueError(f"{path}: atlas parcels {ids[counts == 0][:10].tolist()} are empty")
    per_block = max(1, READ_BUDGET_BYTES // (n_frames * 8))  # 8: scaled data comes as float64
    sums = np.zeros((ids.size, n_frames), dtype=np.float64)
    non_finite = np.zeros(n_frames, dtype=np.int64)
    for g0 in range(0, n_gray, per_block):
        g1 = min(g0 + per_block, n_gray)
        block = np.asarray(img.dataobj[:, g0:g1]).T  # (g1 - g0, T)
        non_finite += _add_block_sums(sums, block, atlas.labels[g0:g1], ids)
    series = (sums / counts[:, None]).T.astype(np.float32)
    return ParcelSeries(series, list(atlas.names), non_finite)


def _add_block_sums(
    sums: np.ndarray, block: np.ndarray, labels: np.ndarray, ids: np.ndarray
) -> np.ndarray | int:
    """Add each parcel's sum over the rows of ``block`` ``(n, T)`` into ``sums`` ``(P, T)``;
    returns the number of non-finite values inside parcels per frame (counted as 0)."""
    keep = np.flatnonzero(np.isin(labels, ids))
    if keep.size == 0:
        return 0
    rows = keep[np.argsort(labels[keep], kind="stable")]
    sorted_labels = labels[rows]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    picked = block[rows]
    bad = ~np.isfinite(picked)
    picked[bad] = 0
    sums[np.searchsorted(ids, sorted_labels[starts])] += np.add.reduceat(
        picked, starts, axis=0, dtype=np.float64
    )
    return bad.sum(axis=0)


def _load_cifti(path: Path) -> Any:
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises many types for unreadable files
        raise ValueError(f"{path}: cannot read as CIFTI-2: {err}") from err
    if not isinstance(img, nib.Cifti2Image):
        raise ValueError(f"{path}: not a CIFTI-2 image ({type(img).__name__})")
    if len(img.shape) != 2:
        raise ValueError(f"{path}: dtseries must be 2-D (time, grayordinates), got {img.shape}")
    axes = [img.header.get_axis(i) for i in range(2)]
    if not isinstance(axes[0], nib.cifti2.SeriesAxis) or not isinstance(
        axes[1], nib.cifti2.BrainModelAxis
    ):
        raise ValueError(f"{path}: expected (series, brain model) axes, is it a dtseries?")
    if img.shape[0] == 0:
        raise ValueError(f"{path}: BOLD has zero frames")
    return img


# --------------------------------------------------------------------------- TSV


def _extract_tsv(path: Path, atlas: Atlas | None) -> ParcelSeries:
    """Columns of an already parcellated table (XCP-D ``*_timeseries.tsv``, header = names).

    Non-finite cells (``n/a``, NaN, inf) become 0 and are counted per row, as for voxels.

    With an atlas whose names all appear among the columns, those columns are returned in
    atlas order; an atlas with other names but as many parcels as columns is accepted with a
    warning (file order kept); anything else is an error.
    """
    import pandas as pd

    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"])
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path}: cannot parse as TSV: {err}") from err
    if table.shape[1] == 0:
        raise ValueError(f"{path}: no parcel columns")
    if table.shape[0] == 0:
        raise ValueError(f"{path}: zero frames (no data rows)")
    table.columns = [str(c) for c in table.columns]
    not_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if not_numeric:
        raise ValueError(f"{path}: non-numeric columns {not_numeric[:10]}")
    if atlas is not None:
        table = _match_columns(table, atlas, path)
    series = table.to_numpy(dtype=np.float32)
    bad = ~np.isfinite(series)
    series[bad] = 0
    return ParcelSeries(series, list(table.columns), bad.sum(axis=1))


def _match_columns(table: Any, atlas: Atlas, path: Path) -> Any:
    missing = [n for n in atlas.names if n not in table.columns]
    if not missing:
        return table[list(atlas.names)]
    if len(table.columns) == atlas.n_parcels:
        warnings.warn(
            f"{path}: column names differ from atlas {atlas.name!r} parcel names; "
            "keeping the file's column order",
            stacklevel=4,
        )
        return table
    raise ValueError(
        f"{path}: {table.shape[1]} columns, atlas {atlas.name!r} has {atlas.n_parcels} parcels "
        f"and names such as {missing[:5]} are not columns"
    )
