"""Stage ``lab``: preprocess a whole paper-sized participant, painnet vs a lab's nilearn script.

The participant of the reference study with most data (P2: 28 sessions × 3 rating runs;
Lee et al. 2026) as ``.nii.gz`` runs of 80 × 80 × 56 voxels × 1,300 float32 frames (gzip level
1, ~0.46 GB each, 1.86 GB inflated), 400 parcels, each run with an fMRIPrep-style confounds
table (6 motion parameters, white matter, CSF, framewise displacement with a few high-motion
frames). Both contenders do the same work per run: parcel means, then the study's cleaning
(painnet's default ``CleanConfig``: first 30 s dropped, linear trend, 6 motion + WM + CSF
regressed, high-pass 0.005 Hz Butterworth, FD > 0.5 mm censored, z-score), then save:

- ``painnet``: ``prepare_runs(runs, atlas, CleanConfig(), ArrayCache(dir), n_jobs=workers)``:
  streamed extraction, cleaning and the content-keyed cache, ``workers`` processes;
- ``nilearn``: the script a lab would write: ``joblib.Parallel(n_jobs=workers)`` over runs of
  ``NiftiLabelsMasker(labels_img, strategy="mean").fit_transform(bold)`` then
  ``nilearn.signal.clean`` with the same settings and ``sample_mask``, then ``np.save``.

Synthetic files: ``n_distinct`` different runs are written (different voxel values, the same
labels) and the participant's runs cycle through them as hard links (copies where links are not
possible). Every run is therefore read and inflated in full by both contenders (no result is
shared between runs: painnet's cache keys on each run's path), but at most ``n_distinct`` files'
bytes are in the OS page cache, which serves both contenders alike; inflating, not the disk,
bounds the time of a ``.nii.gz`` run.

Each contender runs once, in its own fresh child process. Wall time is the whole
participant; memory is the peak of the summed resident memory of the child and all its worker
processes, sampled every 0.1 s from ``/proc`` (RSS counts shared library pages once per
process, alike for both). ``n_sessions`` can be lowered to measure part of the participant; the
report then also gives the full participant's time extrapolated linearly from the runs measured
(marked as an estimate).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import measurement, run_child, target
from benchmarks.stage_extract import ExtractSizes, write_run

TR = 0.46
PAPER_SESSIONS, PAPER_RUNS = 28, 3
MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


@dataclass(frozen=True)
class LabSizes:
    shape: tuple[int, int, int] = (80, 80, 56)
    n_frames: int = 1300
    n_parcels: int = 400
    n_sessions: int = PAPER_SESSIONS
    n_runs: int = PAPER_RUNS
    n_distinct: int = 4  # distinct BOLD files the runs cycle through
    workers: int = 2
    compresslevel: int = 1
    seed: int = 0

    @property
    def n_total(self) -> int:
        return self.n_sessions * self.n_runs


def quick_sizes() -> LabSizes:
    """A handful of tiny runs: checks the stage works, says nothing about speed."""
    return LabSizes(shape=(16, 16, 12), n_frames=120, n_parcels=12, n_sessions=1, n_runs=2)


# --------------------------------------------------------------------------- synthetic data


def write_participant(folder: Path, sizes: LabSizes) -> dict[str, Any]:
    """Write the distinct runs, link the participant's runs to them, write the confounds.

    Returns ``{"dseg": path, "runs": [{"bold", "confounds", "session", "run"}, ...]}``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    extract_sizes = ExtractSizes(
        shape=sizes.shape,
        n_frames=sizes.n_frames,
        n_parcels=sizes.n_parcels,
        compresslevel=sizes.compresslevel,
        seed=sizes.seed,
    )
    distinct = [
        write_run(folder / "distinct", f"d{k}", extract_sizes, gz_only=True, data_seed=100 + k)
        for k in range(min(sizes.n_distinct, sizes.n_total))
    ]
    rng = np.random.default_rng(sizes.seed + 7)
    runs = []
    for index in range(sizes.n_total):
        session, run = index // sizes.n_runs + 1, index % sizes.n_runs + 1
        stem = f"sub-02_ses-{session:02d}_task-rating_run-{run}"
        bold = folder / "func" / f"{stem}_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
        bold.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(distinct[index % len(distinct)][".nii.gz"], bold)
        confounds = folder / "func" / f"{stem}_desc-confounds_timeseries.tsv"
        _write_confounds(confounds, sizes.n_frames, rng)
        runs.append(
            {"bold": str(bold), "confounds": str(confounds), "session": session, "run": run}
        )
    return {"dseg": str(distinct[0]["dseg"]), "runs": runs}


def _link_or_copy(source: Path, dest: Path) -> None:
    dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        import shutil

        shutil.copyfile(source, dest)


def _write_confounds(path: Path, n_frames: int, rng: np.random.Generator) -> None:
    """Random-walk motion (mm, rad), WM and CSF signals, FD with ~2 % frames above 0.5 mm."""
    import pandas as pd

    motion = np.cumsum(rng.normal(scale=0.01, size=(n_frames, 6)), axis=0)
    fd = np.abs(rng.normal(scale=0.08, size=n_frames))
    fd[rng.choice(n_frames, size=max(1, n_frames // 50), replace=False)] = 0.8
    fd[0] = np.nan  # as fMRIPrep writes it
    table = pd.DataFrame(motion, columns=MOTION)
    table["white_matter"] = rng.normal(size=n_frames)
    table["csf"] = rng.normal(size=n_frames)
    table["framewise_displacement"] = fd
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")


# --------------------------------------------------------------------------- memory of a tree


class TreeMemory:
    """Peak of the summed resident memory of this process and all its descendants (MiB),
    sampled every ``interval`` seconds from ``/proc`` in a background thread (Linux only)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, tree_rss_mib(os.getpid()))
            self._stop.wait(self.interval)

    @staticmethod
    def available() -> bool:
        return Path("/proc/self/status").exists()


def tree_rss_mib(root: int) -> float:
    """Summed ``VmRSS`` of ``root`` and its descendants, in MiB."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(children)
        frontier.extend(children)
    total_kib = 0.0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += float(line.split()[1])
                    break
        except OSError:
            continue
    return total_kib / 1024


# --------------------------------------------------------------------------- contenders


def _painnet(participant: dict[str, Any], out: Path, workers: int) -> int:
    from painnet.data.cache import ArrayCache
    from painnet.data.clean import CleanConfig
    from painnet.data.preprocess import prepare_runs

    atlas, runs = _painnet_runs(participant)
    return prepare_runs(runs, atlas, CleanConfig(), ArrayCache(out), workers, progress=False)


def _painnet_runs(participant: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The atlas and the ``RunFiles`` of the participant (no ratings: not needed to clean)."""
    from painnet.data.atlas import load_atlas
    from painnet.data.types import RunFiles, RunKey

    atlas = load_atlas({"kind": "dseg", "path": participant["dseg"], "labels_tsv": None})
    runs = [
        RunFiles(
            key=RunKey("02", f"{r['session']:02d}", "rating", str(r["run"])),
            bold=Path(r["bold"]),
            bold_json=None,
            confounds=Path(r["confounds"]),
            ratings=Path(r["bold"]).with_name("unused_physio.tsv.gz"),
            ratings_json=Path(r["bold"]).with_name("unused_physio.json"),
            kind="nifti",
            tr=TR,
        )
        for r in participant["runs"]
    ]
    return atlas, runs


def _agreement(participant: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """painnet's cached cleaned series of the first run against the nilearn script's, on the
    frames both keep (same work done: the difference should be float32 rounding)."""
    import warnings

    from painnet.data.cache import ArrayCache
    from painnet.data.clean import CleanConfig
    from painnet.data.preprocess import cleaned_key

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atlas, runs = _painnet_runs(participant)
    first = participant["runs"][0]
    ours = ArrayCache(workdir / "out_painnet").load(cleaned_key(runs[0], atlas, CleanConfig()))
    theirs = np.load(workdir / "out_nilearn" / f"ses-{first['session']:02d}_run-{first['run']}.npy")
    if ours is None:
        return {"found_painnet_entry": False}
    kept = ours["series"][ours["kept"]]
    if kept.shape != theirs.shape:
        return {"same_shape": False, "painnet": kept.shape, "nilearn": theirs.shape}
    return {"same_shape": True, "max_abs_diff": float(np.abs(kept - theirs).max())}


def _nilearn_one_run(bold: str, confounds: str, dseg: str, out: str) -> str:
    """One run the way a lab scripts it: masker, signal.clean, np.save."""
    import warnings

    import pandas as pd
    from nilearn import signal
    from nilearn.maskers import NiftiLabelsMasker

    warnings.simplefilter("ignore")
    series = NiftiLabelsMasker(labels_img=dseg, strategy="mean").fit_transform(bold)
    table = pd.read_csv(confounds, sep="\t", na_values="n/a")
    drop = int(np.ceil(30.0 / TR - 1e-9))  # frames with onset before 30 s
    fd = table["framewise_displacement"].fillna(0.0).to_numpy()[drop:]
    regressors = table[[*MOTION, "white_matter", "csf"]].fillna(0.0).to_numpy()[drop:]
    cleaned = signal.clean(
        series[drop:],
        detrend=True,
        standardize="zscore_sample",
        confounds=regressors,
        standardize_confounds=True,
        sample_mask=np.flatnonzero(fd <= 0.5),
        filter="butterworth",
        high_pass=0.005,
        t_r=TR,
    )
    np.save(out, cleaned.astype(np.float32))
    return out


def _nilearn(participant: dict[str, Any], out: Path, workers: int) -> int:
    from joblib import Parallel, delayed

    out.mkdir(parents=True, exist_ok=True)
    jobs = (
        delayed(_nilearn_one_run)(
            r["bold"],
            r["confounds"],
            participant["dseg"],
            str(out / f"ses-{r['session']:02d}_run-{r['run']}.npy"),
        )
        for r in participant["runs"]
    )
    return len(Parallel(n_jobs=workers)(jobs))


CONTENDERS = {"painnet": _painnet, "nilearn": _nilearn}


def child_lab(params: dict[str, Any]) -> dict[str, Any]:
    """Child process: one contender over the whole participant, wall time and tree memory."""
    import warnings

    warnings.simplefilter("ignore")
    run = CONTENDERS[params["contender"]]
    participant = params["participant"]
    start_mib = tree_rss_mib(os.getpid())
    with TreeMemory() as mem:
        t0 = time.perf_counter()
        n_done = run(participant, Path(params["out"]), int(params["workers"]))
        wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "n_runs": n_done,
        "peak_tree_mib": mem.peak_mib,
        "start_rss_mib": start_mib,
    }


# --------------------------------------------------------------------------- stage


def run_stage(sizes: LabSizes, workdir: Path, log=print) -> dict[str, Any]:
    """Write the participant, run both contenders once each, compare."""
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    participant = write_participant(workdir / "participant", sizes)
    write_s = time.perf_counter() - t0
    gz_bytes = sum(Path(r["bold"]).stat().st_size for r in participant["runs"])
    log(
        f"  wrote {sizes.n_total} runs ({min(sizes.n_distinct, sizes.n_total)} distinct) in "
        f"{write_s:.0f} s: {gz_bytes / 1e9:.2f} GB of .nii.gz"
    )
    results, measurements = {}, []
    for name in ("painnet", "nilearn"):
        res = run_child(
            "lab",
            {
                "contender": name,
                "participant": participant,
                "out": str(workdir / f"out_{name}"),
                "workers": sizes.workers,
            },
            timeout_s=6 * 3600,
        )
        if res["n_runs"] != sizes.n_total:
            raise RuntimeError(f"{name} processed {res['n_runs']} of {sizes.n_total} runs")
        results[name] = res
        measurements.append(
            measurement(
                f"{name} participant",
                _WHAT[name],
                [res["wall_s"]],
                peak_mem_mb=res["peak_tree_mib"],
                items=sizes.n_total * 3600,
                rate_unit="runs/h",
                peak_mem_method="summed VmRSS of the process tree, sampled every 0.1 s",
                baseline_rss_mb=res["start_rss_mib"],
            )
        )
        log(
            f"  {name:8s} {sizes.n_total} runs in {res['wall_s']:.1f} s, "
            f"peak tree RSS {res['peak_tree_mib']:.0f} MiB"
        )
    checks = {"first_run": _agreement(participant, workdir)}
    log(f"  first run, painnet vs nilearn cleaned series: {checks['first_run']}")
    ratio = results["nilearn"]["wall_s"] / results["painnet"]["wall_s"]
    paper_runs = PAPER_SESSIONS * PAPER_RUNS
    estimate = {
        name: {
            "estimate": sizes.n_total != paper_runs,
            "runs_measured": sizes.n_total,
            "paper_runs": paper_runs,
            "total_s": res["wall_s"] * paper_runs / sizes.n_total,
        }
        for name, res in results.items()
    }
    return {
        "what": "one participant (sessions x runs of .nii.gz): extraction + cleaning + saving, "
        "painnet prepare_runs vs NiftiLabelsMasker + signal.clean in joblib",
        "sizes": {
            **asdict(sizes),
            "n_runs_total": sizes.n_total,
            "bytes_gz_total": gz_bytes,
            "bytes_uncompressed_per_run": int(np.prod(sizes.shape)) * 4 * sizes.n_frames + 352,
        },
        "method": (
            f"each contender once in a fresh child process with {sizes.workers} workers; "
            f"{min(sizes.n_distinct, sizes.n_total)} distinct files cycled through hard links "
            "(page cache shared alike); memory = peak summed RSS of the process tree"
        ),
        "write_s": write_s,
        "measurements": measurements,
        "targets": [
            target(
                "lab speed-up vs nilearn",
                "nilearn script wall / painnet prepare_runs wall (whole participant measured)",
                ratio,
                1.0,
                "min",
                "x",
                "benchmarks: painnet must not be slower than the script it replaces",
            ),
            target(
                "lab memory vs nilearn",
                "painnet peak tree RSS / nilearn script peak tree RSS",
                results["painnet"]["peak_tree_mib"] / results["nilearn"]["peak_tree_mib"],
                1.0,
                "max",
                "x",
                "benchmarks: painnet must not need more memory than the script it replaces",
            ),
        ],
        "paper_participant_estimate": estimate,
        "checks": checks,
        "wall_s": time.perf_counter() - t_start,
    }


_WHAT = {
    "painnet": "prepare_runs(runs, atlas, CleanConfig(), ArrayCache, n_jobs=workers)",
    "nilearn": "joblib Parallel: NiftiLabelsMasker.fit_transform + signal.clean + np.save",
}
