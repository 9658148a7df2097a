"""Parcel time series from a BOLD file, streamed with bounded memory.

Three inputs, told apart by file name:

- ``*.nii`` / ``*.nii.gz``: a 4-D NIfTI; each parcel's signal is the mean over its voxels;
- ``*.dtseries.nii``: a CIFTI-2 dense time series; mean over each label's grayordinates;
- ``*.tsv``: an already parcellated table (XCP-D ``*_timeseries.tsv``), one column per parcel.

NIfTI runs are never loaded whole. The header is parsed by nibabel, then the voxel data, which
is stored frame after frame (each frame a Fortran-ordered block of X*Y*Z values after
``vox_offset``), is read sequentially in chunks of frames into two reused buffers: a background
thread reads (and for ``.nii.gz`` inflates with zlib) the next chunk while the main thread
reduces the current one. Plain reads also serve ``.nii``: measured faster than gathering from a
memory map, which faults in every page it touches. The reduction gathers the labelled voxels,
grouped by parcel, with one ``np.take`` and sums each parcel with ``np.add.reduceat``
accumulating in float64; only the ``(chunk, P)`` result is float64. Raw stored values are
averaged and the NIfTI scaling (``scl_slope``, ``scl_inter``) is applied to the means, which is
exact because it is linear.

Non-finite voxel values are treated as 0 (with a warning), like nilearn's NiftiLabelsMasker.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import nibabel as nib
import numpy as np

from painnet.data.atlas import Atlas, atlas_for_bold

# Bytes of one read buffer; two are alive at once. Small buffers stay in cache between the
# read and the gather, so they are no slower than big ones, and they bound memory whatever
# the run length or ``chunk_frames``.
READ_BUDGET_BYTES = 2 << 20
# Compressed bytes read from a .nii.gz per call, and most bytes inflated per zlib call (each
# call returns a new bytes object that is copied into the frame buffer).
_GZ_BLOCK = 256 << 10
_GZ_OUT_MAX = 1 << 20


def extract_parcel_series(
    bold_path: str | Path, atlas: Atlas | None, chunk_frames: int = 64
) -> tuple[np.ndarray, list[str]]:
    """Parcel time series of one run.

    Returns ``(series, names)``: ``series`` is ``(T, P)`` float32 (T frames as stored, P
    parcels in ``atlas.label_ids`` order, or in column order for a TSV) and ``names`` the P
    parcel names. ``chunk_frames`` is the most frames read at once from a NIfTI (also capped
    so one read buffer stays within ``READ_BUDGET_BYTES``). ``atlas`` may be ``None`` only for
    a TSV. A volume atlas on another grid is resampled (nearest neighbour) to the BOLD grid.
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

    index:  ``(S,)`` flat positions of the labelled voxels, grouped by parcel (spatial order
            kept inside a parcel, so the gather reads memory mostly forwards).
    starts: ``(P,)`` where each parcel's group begins in ``index``.
    counts: ``(P,)`` float64 number of voxels per parcel.
    """

    index: np.ndarray
    starts: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_labels(cls, flat_labels: np.ndarray, label_ids: np.ndarray, where: str):
        """Build from a flat label array (frame layout) and the parcels wanted, in order."""
        position = np.searchsorted(label_ids, flat_labels)
        position[position == label_ids.size] = 0
        wanted = np.flatnonzero(label_ids[position] == flat_labels)
        index = wanted[np.argsort(position[wanted], kind="stable")]
        counts = np.bincount(position[index], minlength=label_ids.size)
        if np.any(counts == 0):
            empty = label_ids[counts == 0].tolist()
            raise ValueError(f"{where}: atlas parcels {empty[:10]} have no voxel on this grid")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return cls(index=index, starts=starts, counts=counts.astype(np.float64))

    def sums(self, frames: np.ndarray) -> tuple[np.ndarray, bool]:
        """Parcel sums ``(n, P)`` float64 of ``frames`` ``(n, V)``, and whether non-finite
        values were met (they are counted as 0)."""
        picked = np.take(frames, self.index, axis=1)
        sums = np.add.reduceat(picked, self.starts, axis=1, dtype=np.float64)
        if np.isfinite(sums).all():
            return sums, False
        picked[~np.isfinite(picked)] = 0
        return np.add.reduceat(picked, self.starts, axis=1, dtype=np.float64), True


def _warn_non_finite(path: Path) -> None:
    warnings.warn(f"{path}: non-finite voxel values inside parcels were treated as 0", stacklevel=3)


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


def _extract_nifti(path: Path, atlas: Atlas, chunk_frames: int) -> tuple[np.ndarray, list[str]]:
    img = _load_nifti_header(path)
    layout = _nifti_layout(path, img)
    atlas = atlas_for_bold(atlas, img)
    flat = atlas.labels.ravel(order="F")  # NIfTI frames are Fortran-ordered
    reducer = _ParcelReducer.from_labels(flat, atlas.label_ids, str(path))
    per_chunk = max(1, min(chunk_frames, layout.n_frames, READ_BUDGET_BYTES // layout.frame_bytes))
    series = np.empty((layout.n_frames, atlas.n_parcels), dtype=np.float32)
    saw_non_finite = False
    with _open_frames(path, layout.offset) as reader:
        # closing() joins the read-ahead thread before the reader is used again or closed
        with closing(_frame_chunks(reader, layout, per_chunk, path)) as chunks:
            for t0, frames in chunks:
                sums, bad = reducer.sums(frames)
                saw_non_finite |= bad
                series[t0 : t0 + len(frames)] = _scaled(sums / reducer.counts, layout)
        reader.finish()
    if saw_non_finite:
        _warn_non_finite(path)
    return series, list(atlas.names)


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
    caller works on the current one (zlib and file reads release the GIL). A yielded array is
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
    """``.nii.gz``: inflate the gzip stream with zlib (which also checks the CRC and length
    of each member), handling multi-member files and zero padding like the gzip module."""

    def __init__(self, path: Path, offset: int) -> None:
        super().__init__(path, offset)
        self._inflate = zlib.decompressobj(wbits=31)
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
        except zlib.error as err:
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
        self._inflate = zlib.decompressobj(wbits=31)
        self._pending = rest
        return True

    def finish(self) -> None:
        """Inflate to the end so that zlib verifies the CRC of the last member."""
        scratch = memoryview(bytearray(1 << 16))
        while self.readinto(scratch):
            pass


def _open_frames(path: Path, offset: int) -> _FrameReader:
    reader = _GzipReader if path.name.endswith(".gz") else _PlainReader
    return reader(path, offset)


# --------------------------------------------------------------------------- CIFTI


def _extract_cifti(path: Path, atlas: Atlas) -> tuple[np.ndarray, list[str]]:
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
    saw_non_finite = False
    for g0 in range(0, n_gray, per_block):
        g1 = min(g0 + per_block, n_gray)
        block = np.asarray(img.dataobj[:, g0:g1]).T  # (g1 - g0, T)
        saw_non_finite |= _add_block_sums(sums, block, atlas.labels[g0:g1], ids)
    if saw_non_finite:
        _warn_non_finite(path)
    return (sums / counts[:, None]).T.astype(np.float32), list(atlas.names)


def _add_block_sums(
    sums: np.ndarray, block: np.ndarray, labels: np.ndarray, ids: np.ndarray
) -> bool:
    """Add each parcel's sum over the rows of ``block`` ``(n, T)`` into ``sums`` ``(P, T)``."""
    keep = np.flatnonzero(np.isin(labels, ids))
    if keep.size == 0:
        return False
    rows = keep[np.argsort(labels[keep], kind="stable")]
    sorted_labels = labels[rows]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    picked = block[rows]
    bad = not np.isfinite(picked).all()
    if bad:
        picked[~np.isfinite(picked)] = 0
    sums[np.searchsorted(ids, sorted_labels[starts])] += np.add.reduceat(
        picked, starts, axis=0, dtype=np.float64
    )
    return bad


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


def _extract_tsv(path: Path, atlas: Atlas | None) -> tuple[np.ndarray, list[str]]:
    """Columns of an already parcellated table (XCP-D ``*_timeseries.tsv``, header = names).

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
    has_nan = [c for c, bad in zip(table.columns, ~np.isfinite(series).all(axis=0)) if bad]
    if has_nan:
        warnings.warn(f"{path}: non-finite values in columns {has_nan[:10]}", stacklevel=3)
    return series, list(table.columns)


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
