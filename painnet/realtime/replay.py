"""Replay a stored run into a watch folder, one volume file per TR (or as fast as possible).

Each volume is written as ``vol-00001.nii`` (numbering from 1), under a temporary name and
then renamed, after its confounds sidecar ``vol-00001_confounds.json`` (the run's fMRIPrep
confounds row, found next to the BOLD by BIDS naming or given explicitly). Stored values are kept
(unscaled stores exactly), so the streamed volumes hold the stored run's data.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from painnet.atomic import atomic_path, write_bytes_atomic
from painnet.realtime.volumes import SIDECAR_SUFFIX

log = logging.getLogger(__name__)


def confounds_for(bold: Path) -> Path | None:
    """The fMRIPrep confounds table of a ``*_desc-preproc_bold.nii[.gz]``, if it exists."""
    match = re.match(r"(.*?)(_space-[^_]+)?(_res-[^_]+)?_desc-preproc_bold\.nii(\.gz)?$", bold.name)
    if not match:
        return None
    path = bold.with_name(f"{match.group(1)}_desc-confounds_timeseries.tsv")
    return path if path.is_file() else None


class Replay(threading.Thread):
    """Writes the volumes of ``bold`` into ``folder`` at ``tr / speed`` s each (speed 0: no wait).

    ``arrivals`` records ``time.time()`` just after each volume appeared under its final name.
    """

    def __init__(
        self,
        bold: str | Path,
        folder: str | Path,
        tr: float,
        speed: float = 1.0,
        confounds: str | Path | None = None,
        compress: bool = False,
        stop: threading.Event | None = None,
        skip: set[int] | frozenset[int] = frozenset(),
        max_volumes: int | None = None,
    ):
        super().__init__(name="painnet-replay", daemon=True)
        self.bold = Path(bold)
        self.folder = Path(folder)
        self.tr = float(tr)
        self.speed = float(speed)
        self.compress = compress
        self.stop = stop or threading.Event()
        self.skip = set(skip)
        self.max_volumes = max_volumes
        try:
            self.img = nib.load(self.bold, keep_file_open=True)
        except Exception as err:  # nibabel raises many types for unreadable files
            raise ValueError(f"{self.bold}: cannot read as NIfTI: {err}") from err
        if len(self.img.shape) != 4:
            raise ValueError(f"{self.bold}: replay needs a 4-D run, got shape {self.img.shape}")
        self.n_volumes = int(self.img.shape[3])
        if max_volumes is not None:
            self.n_volumes = min(self.n_volumes, int(max_volumes))
        self.confounds = Path(confounds) if confounds else confounds_for(self.bold)
        self.table = None
        if self.confounds is not None:
            self.table = pd.read_csv(self.confounds, sep="\t", na_values=["n/a"])
            if len(self.table) != self.img.shape[3]:
                raise ValueError(
                    f"{self.confounds}: {len(self.table)} rows for {self.img.shape[3]} volumes"
                )
        self.arrivals: dict[int, float] = {}
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            start = time.time()
            for t in range(self.n_volumes):
                if self.stop.is_set():
                    break
                if self.speed > 0:
                    wait = start + t * self.tr / self.speed - time.time()
                    if wait > 0:
                        time.sleep(wait)
                if t in self.skip:
                    continue
                self._write(t)
        except BaseException as err:  # reported by the session, never lost in the thread
            self.error = err
            log.error("replay stopped: %s", err)
        finally:
            self.done.set()

    def _write(self, t: int) -> None:
        name = f"vol-{t + 1:05d}"
        if self.table is not None:
            row = {
                k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in self.table.iloc[t].to_dict().items()
            }
            write_bytes_atomic(self.folder / f"{name}{SIDECAR_SUFFIX}", json.dumps(row).encode())
        write_volume(self.img, t, self.folder / f"{name}.nii{'.gz' if self.compress else ''}")
        self.arrivals[t] = time.time()


def write_volume(img, t: int, path: Path) -> None:
    """Write frame ``t`` of a 4-D image as a 3-D NIfTI at ``path`` (temporary name, rename).

    Unscaled stores keep their stored type and values exactly; scaled ones are written as the
    scaled float32 values.
    """
    proxy = img.dataobj
    data = np.asarray(proxy[..., t])
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    out = nib.Nifti1Image(data, img.affine)
    out.header.set_xyzt_units(*img.header.get_xyzt_units())
    with atomic_path(path) as tmp:
        nib.save(out, tmp)
