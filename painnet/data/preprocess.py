"""Per-run preprocessing: extract parcel series → clean → cache, then attach targets.

Two cache levels: raw parcel series (the expensive read of the BOLD file, keyed by the BOLD
file and atlas) and cleaned series (keyed additionally by the confounds file and the cleaning
settings), so changing a cleaning setting never re-reads the images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from painnet.data.atlas import Atlas
from painnet.data.cache import ArrayCache, cache_key, file_identity
from painnet.data.clean import CleanConfig, clean_series, read_confounds
from painnet.data.extract import extract_parcel_series
from painnet.data.targets import run_targets
from painnet.data.types import RunData, RunFiles


def extraction_key(files: RunFiles, atlas: Atlas | None) -> str:
    return cache_key(
        stage="extract",
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
    def compute():
        series, names = extract_parcel_series(files.bold, atlas)
        return {
            "series": series.astype(np.float32, copy=False),
            "names": np.asarray(names, dtype=str),
        }

    return cache.get_or_compute(extraction_key(files, atlas), compute)


def clean_cached(
    files: RunFiles, atlas: Atlas | None, clean: CleanConfig, cache: ArrayCache
) -> dict:
    """Cleaned series, kept mask and parcel names of one run (computed at most once)."""

    def compute():
        raw = extract_cached(files, atlas, cache)
        series = raw["series"]
        confounds, fd = None, None
        if files.confounds is not None:
            confounds, fd = read_confounds(files.confounds, clean, series.shape[0])
        cleaned, kept = clean_series(series, files.tr, clean, confounds, fd, source=str(files.bold))
        return {"series": cleaned, "kept": kept, "names": raw["names"]}

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
    files: RunFiles, atlas: Atlas | None, clean: CleanConfig, cache: ArrayCache, lag_s: float
) -> RunData:
    """A cleaned run with its lag-paired targets (extracting and cleaning it if not cached)."""
    arrays = clean_cached(files, atlas, clean, cache)
    series, kept = arrays["series"], arrays["kept"].astype(bool)
    target = run_targets(files, series.shape[0], lag_s)
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
