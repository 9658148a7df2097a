"""Per-run preprocessing: extract parcel series → clean → cache, then attach targets.

Two cache levels: raw parcel series (the expensive read of the BOLD file, keyed by the BOLD
file and atlas) and cleaned series (keyed additionally by the confounds file and the cleaning
settings), so changing a cleaning setting never re-reads the images.

Non-finite voxels (NaN, inf) inside parcels: the extraction entry stores how many each frame
had (``non_finite``), those frames are censored in cleaning (``kept`` is False, like
high-motion frames), and :func:`qc_table` / :func:`write_qc_table` report the counts per run,
whether the run was just extracted or read from the cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from painnet.atomic import write_csv_atomic
from painnet.data.atlas import Atlas
from painnet.data.cache import ArrayCache, cache_key, file_identity
from painnet.data.clean import CleanConfig, clean_series, read_confounds
from painnet.data.extract import extract_parcels
from painnet.data.targets import RatingSpec, run_targets
from painnet.data.types import RunData, RunFiles

log = logging.getLogger(__name__)

# Version of the extraction entry's content: 2 added the per-frame ``non_finite`` counts (older
# entries, without them, are not reused).
EXTRACT_FORMAT = 2


def extraction_key(files: RunFiles, atlas: Atlas | None) -> str:
    return cache_key(
        stage="extract",
        format=EXTRACT_FORMAT,
        bold=file_identity(files.bold),
        atlas=None if atlas is None else atlas.identity(),
    )


def cleaned_key(files: RunFiles, atlas: Atlas | None, clean: CleanConfig) -> str:
    return cache_key(
        stage="clean",
        extracted=extraction_key(files, atlas),
        confounds=file_identity(files.confounds),
        tr=files.tr,
        clean=clean.as_dict(),
    )


def extract_cached(files: RunFiles, atlas: Atlas | None, cache: ArrayCache) -> dict:
    """Raw parcel series, names and per-frame non-finite counts of one run (computed once)."""

    def compute():
        out = extract_parcels(files.bold, atlas)
        return {
            "series": out.series.astype(np.float32, copy=False),
            "names": np.asarray(out.names, dtype=str),
            "non_finite": out.non_finite.astype(np.int64, copy=False),
        }

    return cache.get_or_compute(extraction_key(files, atlas), compute)


def clean_cached(
    files: RunFiles, atlas: Atlas | None, clean: CleanConfig, cache: ArrayCache
) -> dict:
    """Cleaned series, kept mask, parcel names and per-frame non-finite counts of one run
    (computed at most once). Frames with non-finite voxels inside parcels are censored."""

    def compute():
        confounds, fd = None, None
        if files.confounds is not None:  # checked before the (cached) extraction
            confounds, fd = read_confounds(files.confounds, clean, None, tr=files.tr)
        raw = extract_cached(files, atlas, cache)
        series = raw["series"]
        if fd is not None and len(fd) != series.shape[0]:
            raise ValueError(
                f"{files.confounds}: {len(fd)} rows but the BOLD run has {series.shape[0]} frames"
            )
        clean_fn = clean_series
        if clean.causal:  # past frames only: the same function the real-time path applies
            from painnet.data.causal import clean_series_causal as clean_fn
        non_finite = raw["non_finite"]
        censor = {"censor": non_finite > 0} if non_finite.any() else {}
        cleaned, kept = clean_fn(
            series, files.tr, clean, confounds, fd, source=str(files.bold), **censor
        )
        return {"series": cleaned, "kept": kept, "names": raw["names"], "non_finite": non_finite}

    return cache.get_or_compute(cleaned_key(files, atlas, clean), compute)


def is_cached(files: RunFiles, atlas: Atlas | None, clean: CleanConfig, cache: ArrayCache) -> bool:
    return cleaned_key(files, atlas, clean) in cache


def prepare_runs(
    runs: Sequence[RunFiles],
    atlas: Atlas | None,
    clean: CleanConfig,
    cache: ArrayCache,
    n_jobs: int = 1,
    progress: bool = True,
) -> int:
    """Extract and clean every run not yet cached, in parallel. Returns how many were computed."""
    todo = [f for f in runs if not is_cached(f, atlas, clean, cache)]
    if not todo:
        return 0
    n_jobs = max(1, min(n_jobs if n_jobs > 0 else (os.cpu_count() or 1), len(todo)))
    columns = (
        TextColumn("[bold]extract+clean"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("runs", total=len(todo))
        if n_jobs == 1:
            for files in todo:
                clean_cached(files, atlas, clean, cache)
                bar.advance(task)
        else:
            with ProcessPoolExecutor(max_workers=n_jobs) as pool:
                futures = [pool.submit(clean_cached, f, atlas, clean, cache) for f in todo]
                for future in as_completed(futures):
                    future.result()  # re-raise a worker's error with its message
                    bar.advance(task)
    return len(todo)


def load_run(
    files: RunFiles,
    atlas: Atlas | None,
    clean: CleanConfig,
    cache: ArrayCache,
    lag_s: float,
    ratings: RatingSpec | None = None,
) -> RunData:
    """A cleaned run with its lag-paired targets (extracting and cleaning it if not cached)."""
    arrays = clean_cached(files, atlas, clean, cache)
    _log_non_finite(files, arrays["non_finite"])
    target = run_targets(files, arrays["series"].shape[0], lag_s, ratings)
    return run_data(files, arrays, target)


def run_data(files: RunFiles, arrays: Mapping, target: np.ndarray) -> RunData:
    """A run from its cleaned cache entry and its targets (NaN on censored frames)."""
    series, kept = arrays["series"], arrays["kept"].astype(bool)
    target = np.asarray(target, dtype=np.float32).copy()
    target[~kept] = np.nan
    return RunData(
        key=files.key,
        tr=files.tr,
        series=series,
        kept=kept,
        target=target,
        time_s=np.arange(series.shape[0]) * files.tr,
        parcel_names=[str(n) for n in arrays["names"]],
    )


# --------------------------------------------------------------------------- quality control

QC_COLUMNS = (
    "run",
    "bold",
    "n_frames",
    "n_kept",
    "n_frames_non_finite",
    "n_values_non_finite",
)


def _log_non_finite(files: RunFiles, non_finite: np.ndarray) -> None:
    """Say, every time a run is loaded (cached or not), how many frames were censored."""
    n_frames = int(np.count_nonzero(non_finite))
    if n_frames:
        log.warning(
            "%s: %d frames censored for %d non-finite values inside parcels",
            files.bold,
            n_frames,
            int(non_finite.sum()),
        )


def run_qc(files: RunFiles, atlas: Atlas | None, clean: CleanConfig, cache: ArrayCache) -> dict:
    """One run's quality-control row (see ``QC_COLUMNS``), from its cleaned cache entry."""
    arrays = clean_cached(files, atlas, clean, cache)
    non_finite = arrays["non_finite"]
    return {
        "run": files.key.bids_prefix(),
        "bold": str(files.bold),
        "n_frames": int(non_finite.size),
        "n_kept": int(np.count_nonzero(arrays["kept"])),
        "n_frames_non_finite": int(np.count_nonzero(non_finite)),
        "n_values_non_finite": int(non_finite.sum()),
    }


def qc_table(runs: Sequence[RunFiles], atlas: Atlas | None, clean: CleanConfig, cache: ArrayCache):
    """A ``pandas.DataFrame`` with one :func:`run_qc` row per run, in the given order."""
    import pandas as pd

    return pd.DataFrame([run_qc(f, atlas, clean, cache) for f in runs], columns=list(QC_COLUMNS))


def write_qc_table(
    path: str | os.PathLike,
    runs: Sequence[RunFiles],
    atlas: Atlas | None,
    clean: CleanConfig,
    cache: ArrayCache,
):
    """Write :func:`qc_table` as a TSV, atomically (temporary file, then rename); returns it."""
    table = qc_table(runs, atlas, clean, cache)
    write_csv_atomic(path, table, sep="\t", mkdir=True)
    return table
