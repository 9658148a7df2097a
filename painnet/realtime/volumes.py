"""One volume → parcel means, and one volume's confound values.

:class:`VolumeReducer` sums the stored voxel values of each parcel with the offline extraction's
own reducer and applies the NIfTI scaling to the means, as :mod:`painnet.data.extract` does for
whole runs, so a volume streamed alone gives bit for bit the parcel means of the same frame of
the stored run. A volume with non-finite voxel values inside parcels is censored, as offline.

Confounds of a volume come from a sidecar ``<volume name without .nii/.nii.gz>_confounds.json``:
one JSON object with fMRIPrep column names (``trans_x`` … ``rot_z``, ``framewise_displacement``,
``white_matter``, ``csf``, …). ``null`` values are read as 0, like the empty first row of
fMRIPrep's derivative columns offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np

from painnet.data.atlas import Atlas
from painnet.data.clean import MOTION_6, CleanConfig, confound_columns, framewise_displacement
from painnet.data.extract import _ParcelReducer  # the offline arithmetic, shared on purpose
from painnet.realtime.model import ReferenceGrid

SIDECAR_SUFFIX = "_confounds.json"


class VolumeError(ValueError):
    """A volume that cannot be read (yet): truncated, corrupt, or not a 3-D NIfTI."""


class GridError(ValueError):
    """A volume on another voxel grid than the training data."""


def volume_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def sidecar_path(volume: Path) -> Path:
    return volume.with_name(volume_stem(volume) + SIDECAR_SUFFIX)


class VolumeReducer:
    """Parcel means of single volumes on the reference grid.

    The sums use the offline extraction's own reducer (same voxel order, same partial sums),
    so a streamed volume's means are bit for bit the stored run's.
    """

    def __init__(self, atlas: Atlas, grid: ReferenceGrid):
        if atlas.labels.shape != grid.shape:
            raise ValueError(f"atlas grid {atlas.labels.shape} is not the reference {grid.shape}")
        self.grid = grid
        self.n_parcels = atlas.n_parcels
        flat = atlas.labels.ravel(order="F")  # NIfTI volumes are Fortran-ordered
        self._reducer = _ParcelReducer.from_labels(flat, atlas.label_ids, grid.source)

    def read(self, path: Path) -> tuple[np.ndarray, int]:
        """Parcel means (P,) float32 of the volume at ``path``, and how many non-finite voxel
        values lay inside parcels (counted as 0; offline such frames are censored).

        Raises :class:`VolumeError` if the file cannot be read as a one-frame NIfTI and
        :class:`GridError` if it is on another grid.
        """
        try:
            img = nib.load(path)
            shape = img.shape
            if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
                raise VolumeError(f"{path}: not a NIfTI image")
            if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
                raise VolumeError(f"{path}: expected one 3-D volume, got shape {shape}")
            if not self.grid.matches(shape, img.affine):
                raise GridError(
                    f"{path}: volume grid {tuple(shape[:3])} with affine\n{np.round(img.affine, 3)}"
                    f"\nis not the training grid {self.grid.shape} with affine\n"
                    f"{np.round(self.grid.affine, 3)}\n(from {self.grid.source})"
                )
            proxy = img.dataobj
            raw = np.asarray(proxy.get_unscaled())
            slope, inter = float(proxy.slope), float(proxy.inter)
        except (VolumeError, GridError):
            raise
        except Exception as err:  # nibabel / gzip / zlib raise many types on partial files
            raise VolumeError(f"{path}: cannot read volume: {err}") from err
        if raw.dtype.kind not in "iuf":
            raise VolumeError(f"{path}: unsupported voxel type {raw.dtype}")
        sums, bad = self._reducer.sums(raw.reshape(-1, order="F")[None, :])
        means = sums[0] / self._reducer.counts
        if slope != 1.0 or inter != 0.0:
            means = means * slope + inter
        return means.astype(np.float32), 0 if bad is None else int(bad.sum())


class ConfoundReader:
    """Confound vector and framewise displacement of a volume, for a cleaning strategy."""

    def __init__(self, clean: CleanConfig):
        self.clean = clean
        self.columns: list[str] | None = None  # fixed by the first sidecar (aCompCor names)
        compcor = [
            f"{prefix}_comp_cor_{i:02d}"
            for prefix, n in (
                ("a", clean.n_acompcor),
                ("w", getattr(clean, "n_wm_compcor", 0)),
                ("c", getattr(clean, "n_csf_compcor", 0)),
            )
            for i in range(n)
        ]
        self.n_confounds = len(confound_columns(clean, compcor))
        self.fd_from_motion = getattr(clean, "fd_source", "column") == "motion"
        self._last_motion: np.ndarray | None = None
        self.needs_fd = clean.fd_threshold is not None
        self.needs_any = self.needs_fd or self.n_confounds > 0

    def read(self, volume: Path) -> tuple[np.ndarray | None, float] | None:
        """``(confounds or None, fd)``; None when a sidecar is needed and absent."""
        if not self.needs_any:
            return None, 0.0
        path = sidecar_path(volume)
        if not path.is_file():
            return None
        try:
            row = json.loads(path.read_text())
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise VolumeError(f"{path}: cannot read confounds: {err}") from err
        if self.columns is None:
            self.columns = confound_columns(self.clean, list(row))
        missing = [c for c in self.columns if c not in row]
        fd_columns = MOTION_6 if self.fd_from_motion else ["framewise_displacement"]
        if self.needs_fd:
            missing += [c for c in fd_columns if c not in row and c not in missing]
        if missing:
            raise VolumeError(f"{path}: confound values missing for the cleaning: {missing}")
        values = np.array([_number(row[c]) for c in self.columns], dtype=np.float64)
        if self.fd_from_motion and self.needs_fd:
            fd = self._fd_from_motion(np.array([_number(row[c]) for c in MOTION_6]))
        else:
            fd = _number(row.get("framewise_displacement"))
        return (values if self.columns else None), fd

    def _fd_from_motion(self, motion: np.ndarray) -> float:
        """FD against the last volume read (0 for the first), as
        :func:`painnet.data.clean.framewise_displacement` without a low-pass."""
        last, self._last_motion = self._last_motion, motion
        if last is None:
            return 0.0
        pair = np.stack([last, motion])
        return float(framewise_displacement(pair, head_radius_mm=self.clean.head_radius_mm)[1])


def _number(value) -> float:
    """JSON value → float; null/NaN → 0.0 (as the offline reader fills empty cells)."""
    if value is None:
        return 0.0
    out = float(value)
    return 0.0 if math.isnan(out) else out
