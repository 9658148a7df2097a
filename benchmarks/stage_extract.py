"""Stage 1: parcel extraction of one paper-sized run, painnet vs. nilearn vs. the I/O floor.

The run is written once to a temporary folder as ``.nii.gz`` and ``.nii`` (identical voxels):
grid 80 × 80 × 56 (the study's), 1,300 float32 frames, zeros outside an ellipsoidal "brain";
inside, ``1000 + 20 N(0, 1)`` per voxel and frame (full-entropy float32 mantissas, so the gzip
ratio is set by the empty background, like real BOLD). The label image splits the brain into
~400 blobs (Voronoi cells of random seed voxels). The gzip stream is written at level 1
(nibabel's default ``compresslevel``); inflating speed hardly depends on the level.

Contenders per file, each in its own fresh child process (so peak memory is its own):

- ``floor``: read the file once into one reused 2 MiB buffer, and nothing more — no parsing,
  no reduction. A ``.nii.gz`` is inflated by each available decompressor in turn (``floor
  zlib``, ``floor isal`` = ISA-L igzip, ``floor zlib-ng``); the floor is the fastest of them;
- ``nilearn``: ``NiftiLabelsMasker(labels_img, strategy="mean").fit_transform(bold)``;
- ``painnet``: ``extract_parcel_series(bold, load_atlas(dseg spec))`` as installed (ISA-L when
  ``isal`` is there); on ``.nii.gz`` also ``painnet zlib`` (forced to zlib, the history's
  configuration).

A child first runs its contender on a tiny file (so lazy imports are done), resets the
process's memory high-water mark, runs once on the real file (that run also warms the page
cache; its added peak resident memory is the reported memory), then times ``repeats`` more
runs: ``best_s`` is the best of those, ``median_s`` their median.

Contenders run minutes apart, so load from other jobs can move their ratio. The stage also
times the ``.nii`` floor and painnet *interleaved* in one child (floor, painnet, floor, ...,
``ab_rounds`` each; target ``painnet/floor .nii interleaved``, best over best), with the CPU
time of each call beside its wall time: that ratio moves much less with other jobs' load.
"""

from __future__ import annotations

import importlib
import os
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import PeakMemory, measurement, run_child, target, time_calls

CONTENDERS = ("floor", "nilearn", "painnet")
FORMATS = (".nii.gz", ".nii")
# gzip decompressors with zlib's decompressobj API: name -> module
DECOMPRESSORS = {"zlib": "zlib", "isal": "isal.isal_zlib", "zlib-ng": "zlib_ng.zlib_ng"}
_READ_BLOCK = 2 << 20  # reused buffer of the floor reader
_GZ_IN = 256 << 10
_WRITE_FRAMES = 32  # frames generated and written at once


@dataclass(frozen=True)
class ExtractSizes:
    shape: tuple[int, int, int] = (80, 80, 56)
    n_frames: int = 1300
    n_parcels: int = 400
    voxel_mm: float = 2.7
    compresslevel: int = 1
    repeats: int = 5  # timed runs of floor and painnet (after the warm run)
    nilearn_repeats: int = 2  # timed runs of nilearn (tens of seconds and GB each)
    ab_rounds: int = 7  # interleaved floor/painnet rounds on the .nii
    seed: int = 0


# --------------------------------------------------------------------------- synthetic files


def brain_labels(shape: tuple[int, int, int], n_parcels: int, seed: int) -> np.ndarray:
    """Label image (X, Y, Z) int16: ``n_parcels`` Voronoi blobs filling an ellipsoid brain.

    The ellipsoid's semi-axes are 38 %, 45 % and 40 % of the grid (about 30 % of the grid's
    voxels are brain); label 0 outside.
    """
    from scipy.spatial import cKDTree

    grid = np.indices(shape, dtype=np.float64)
    centre = (np.array(shape, dtype=np.float64) - 1) / 2
    semi = np.array([0.38, 0.45, 0.40]) * np.array(shape)
    radius2 = sum(((grid[i] - centre[i]) / semi[i]) ** 2 for i in range(3))
    brain = np.argwhere(radius2 <= 1.0)
    if brain.shape[0] < n_parcels:
        raise ValueError(f"grid {shape} has {brain.shape[0]} brain voxels < {n_parcels} parcels")
    rng = np.random.default_rng(seed)
    seeds = brain[rng.choice(brain.shape[0], size=n_parcels, replace=False)]
    _, nearest = cKDTree(seeds).query(brain)
    labels = np.zeros(shape, dtype=np.int16)
    labels[tuple(brain.T)] = nearest + 1
    return labels


def _affine(voxel_mm: float, shape: tuple[int, int, int]) -> np.ndarray:
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -voxel_mm * (np.array(shape) - 1) / 2
    return affine


def _nifti_header_bytes(shape4d: tuple[int, ...], affine: np.ndarray, tr: float) -> bytes:
    """352 bytes: a NIfTI-1 header for float32 data at ``vox_offset`` 352, no extension."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape4d)
    hdr.set_data_dtype(np.float32)
    hdr.set_zooms((*np.abs(np.diag(affine)[:3]), tr))
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=4)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\x00" * 4


def write_run(
    folder: Path,
    stem: str,
    sizes: ExtractSizes,
    gz_only: bool = False,
    data_seed: int | None = None,
) -> dict[str, Path]:
    """Write ``<stem>_bold.nii.gz``, ``<stem>_bold.nii`` (unless ``gz_only``) and
    ``<stem>_dseg.nii.gz``.

    Frames are generated ``_WRITE_FRAMES`` at a time and appended to both files, so writing
    never holds the whole run in memory. The labels come from ``sizes.seed``, the voxel values
    from ``data_seed`` (default ``sizes.seed + 1``). Returns the paths written.
    """
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    labels = brain_labels(sizes.shape, sizes.n_parcels, sizes.seed)
    affine = _affine(sizes.voxel_mm, sizes.shape)
    paths = {
        ".nii.gz": folder / f"{stem}_bold.nii.gz",
        ".nii": folder / f"{stem}_bold.nii",
        "dseg": folder / f"{stem}_dseg.nii.gz",
    }
    nib.save(nib.Nifti1Image(labels, affine), paths["dseg"])
    header = _nifti_header_bytes((*sizes.shape, sizes.n_frames), affine, 0.46)
    brain = np.flatnonzero(labels.ravel(order="F"))  # frames are stored Fortran-ordered
    n_vox = int(np.prod(sizes.shape))
    rng = np.random.default_rng(sizes.seed + 1 if data_seed is None else data_seed)
    deflate = zlib.compressobj(sizes.compresslevel, zlib.DEFLATED, 31)  # 31: gzip container
    if gz_only:
        del paths[".nii"]
    raw_path = paths.get(".nii", os.devnull)
    with open(raw_path, "wb") as raw, open(paths[".nii.gz"], "wb") as gz:
        raw.write(header)
        gz.write(deflate.compress(header))
        frames = np.zeros((_WRITE_FRAMES, n_vox), dtype=np.float32)
        for t0 in range(0, sizes.n_frames, _WRITE_FRAMES):
            n = min(_WRITE_FRAMES, sizes.n_frames - t0)
            values = rng.standard_normal((n, brain.size), dtype=np.float32) * 20 + 1000
            frames[:n, brain] = values
            block = memoryview(frames[:n]).cast("B")
            raw.write(block)
            gz.write(deflate.compress(block))
        gz.write(deflate.flush())
    return paths


# --------------------------------------------------------------------------- contenders


def available_decompressors() -> list[str]:
    """The names in ``DECOMPRESSORS`` whose module can be imported here."""
    names = []
    for name, module in DECOMPRESSORS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        names.append(name)
    return names


def read_floor(path: str | Path, decompressor: str = "zlib") -> int:
    """Read (inflating ``.gz`` with ``decompressor``) the whole file into one reused buffer;
    returns bytes produced."""
    buffer = bytearray(_READ_BLOCK)
    view = memoryview(buffer)
    total = 0
    with open(path, "rb", buffering=0) as fh:
        if not str(path).endswith(".gz"):
            while n := fh.readinto(view):
                total += n
            return total
        inflate = importlib.import_module(DECOMPRESSORS[decompressor]).decompressobj(wbits=31)
        data = b""
        while True:
            data = inflate.unconsumed_tail or fh.read(_GZ_IN)
            if not data:
                break
            out = inflate.decompress(data, _READ_BLOCK)
            view[: len(out)] = out
            total += len(out)
            if inflate.eof:
                break
    return total


def run_nilearn(bold: str | Path, dseg: str | Path) -> np.ndarray:
    from nilearn.maskers import NiftiLabelsMasker

    masker = NiftiLabelsMasker(labels_img=str(dseg), strategy="mean")
    return masker.fit_transform(str(bold))


def run_painnet(bold: str | Path, dseg: str | Path, gzip_backend: str | None = None) -> np.ndarray:
    from painnet.data import extract
    from painnet.data.atlas import load_atlas
    from painnet.data.extract import extract_parcel_series

    if gzip_backend is not None:
        extract.GZIP_BACKEND = gzip_backend
    atlas = load_atlas({"kind": "dseg", "path": str(dseg), "labels_tsv": None})
    return extract_parcel_series(bold, atlas)[0]


def _contender(name: str, bold: str, dseg: str, variant: str | None = None):
    if name == "floor":
        return lambda: read_floor(bold, variant or "zlib")
    if name == "nilearn":
        return lambda: run_nilearn(bold, dseg)
    if name == "painnet":
        return lambda: run_painnet(bold, dseg, variant)
    raise ValueError(f"unknown extraction contender {name!r}; expected one of {CONTENDERS}")


def child_extract(params: dict[str, Any]) -> dict[str, Any]:
    """Child process: warm up on the tiny file, then memory + timings on the real one."""
    import warnings

    warnings.simplefilter("ignore")
    if params.get("interleaved"):
        return interleaved(params["bold"], params["dseg"], int(params["repeats"]))
    name, variant = params["contender"], params.get("variant")
    # lazy imports, not measured
    _contender(name, params["warm_bold"], params["warm_dseg"], variant)()
    run = _contender(name, params["bold"], params["dseg"], variant)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        out = run()
        first_s = time.perf_counter() - t0
    if isinstance(out, np.ndarray) and params.get("save"):
        np.save(params["save"], out.astype(np.float32))
    times = time_calls(run, int(params["repeats"]))
    return {"first_s": first_s, "times": times, **mem.as_dict()}


def interleaved(bold: str, dseg: str, rounds: int) -> dict[str, Any]:
    """Floor and painnet alternately on one uncompressed file, ``rounds`` times each, after
    one warm call of each: wall and CPU seconds per call, and the load average around it."""
    floor = _contender("floor", bold, dseg)
    painnet = _contender("painnet", bold, dseg)
    floor()  # imports and page cache, not timed
    painnet()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    out: dict[str, Any] = {name: {"wall": [], "cpu": []} for name in ("floor", "painnet")}
    for _ in range(max(1, rounds)):
        for name, call in (("floor", floor), ("painnet", painnet)):
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            out[name]["wall"].append(time.perf_counter() - t0)
            out[name]["cpu"].append(time.process_time() - c0)
    out["load_start"] = load_start
    out["load_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return out


def _interleaved_summary(ab: dict[str, Any]) -> dict[str, Any]:
    """Best and median seconds of each contender, and painnet/floor ratios (best over best,
    and the median of the per-round ratios), in wall and in CPU time."""
    summary: dict[str, Any] = {"load_start": ab["load_start"], "load_end": ab["load_end"]}
    for clock in ("wall", "cpu"):
        floor, ours = np.array(ab["floor"][clock]), np.array(ab["painnet"][clock])
        summary[clock] = {
            "floor_best_s": float(floor.min()),
            "floor_median_s": float(np.median(floor)),
            "painnet_best_s": float(ours.min()),
            "painnet_median_s": float(np.median(ours)),
            "ratio_best": float(ours.min() / floor.min()),
            "ratio_median": float(np.median(ours / floor)),
        }
    return summary


# --------------------------------------------------------------------------- stage


def run_stage(sizes: ExtractSizes, workdir: Path, log=print) -> dict[str, Any]:
    """Write the synthetic run, measure every contender on both formats, check the targets."""
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    paths = write_run(workdir, "bench", sizes)
    write_s = time.perf_counter() - t0
    tiny = ExtractSizes(shape=(10, 10, 8), n_frames=4, n_parcels=3, seed=sizes.seed)
    warm = write_run(workdir, "warm", tiny)
    log(
        f"  wrote synthetic run in {write_s:.1f} s: {paths['.nii.gz'].stat().st_size / 1e6:.0f} MB"
        f" (.nii.gz), {paths['.nii'].stat().st_size / 1e6:.0f} MB (.nii)"
    )

    results: dict[str, dict[str, dict]] = {}
    measurements = []
    for fmt in FORMATS:
        results[fmt] = {}
        for label, name, variant in _plan(fmt):
            tag = label.replace(" ", "_").replace("-", "_")
            save = workdir / f"series_{tag}{fmt.replace('.', '_')}.npy"
            res = run_child(
                "extract",
                {
                    "contender": name,
                    "variant": variant,
                    "bold": str(paths[fmt]),
                    "dseg": str(paths["dseg"]),
                    "warm_bold": str(warm[fmt]),
                    "warm_dseg": str(warm["dseg"]),
                    "repeats": sizes.nilearn_repeats if name == "nilearn" else sizes.repeats,
                    "save": str(save) if name != "floor" else None,
                },
            )
            results[fmt][label] = res
            measurements.append(
                measurement(
                    f"{label} {fmt}",
                    _WHAT[name] + (f" ({variant})" if variant else ""),
                    res["times"],
                    peak_mem_mb=res["peak_mem_mb"],
                    first_run_s=res["first_s"],
                    peak_mem_method=res["peak_mem_method"],
                    baseline_rss_mb=res["baseline_rss_mb"],
                )
            )
            log(
                f"  {label:13s} {fmt:7s} best {min(res['times']):.2f} s, "
                f"peak +{res['peak_mem_mb']:.0f} MiB"
            )

    checks = {fmt: _agreement(workdir, fmt) for fmt in FORMATS}
    targets = [t for fmt in FORMATS for t in _targets(results[fmt], fmt)]
    ab = _interleaved_summary(
        run_child(
            "extract",
            {
                "interleaved": True,
                "bold": str(paths[".nii"]),
                "dseg": str(paths["dseg"]),
                "repeats": sizes.ab_rounds,
            },
        )
    )
    log(
        f"  interleaved .nii: painnet/floor {ab['wall']['ratio_best']:.2f} (wall, best), "
        f"{ab['cpu']['ratio_best']:.2f} (CPU, best), load {ab['load_start']}"
    )
    targets.append(
        target(
            "painnet/floor .nii interleaved",
            f"painnet / floor on the .nii alternating in one process ({sizes.ab_rounds} rounds;"
            " best wall over best wall)",
            ab["wall"]["ratio_best"],
            1.3,
            "max",
            "x",
            "project brief",
        )
    )
    n_vox = int(np.prod(sizes.shape))
    return {
        "what": "parcel means of one run from a 4-D NIfTI: I/O floor vs nilearn vs painnet",
        "sizes": {
            **{k: v for k, v in asdict(sizes).items() if "repeats" not in k and k != "ab_rounds"},
            "brain_voxels": int((brain_labels(sizes.shape, sizes.n_parcels, sizes.seed) > 0).sum()),
            "voxels_per_frame": n_vox,
            "bytes_uncompressed": n_vox * 4 * sizes.n_frames + 352,
            "bytes_gz": paths[".nii.gz"].stat().st_size,
        },
        "method": (
            "each contender in a fresh child process; 1 warm run (also the memory run), then "
            f"best and median of {sizes.repeats} timed runs ({sizes.nilearn_repeats} for "
            "nilearn); page cache warm"
        ),
        "write_s": write_s,
        "measurements": measurements,
        "targets": targets,
        "checks": checks,
        "interleaved_nii": ab,
        "wall_s": time.perf_counter() - t_start,
    }


_WHAT = {
    "floor": "read (+ inflate) the file into one reused buffer, nothing more",
    "nilearn": 'NiftiLabelsMasker(labels_img, strategy="mean").fit_transform(bold)',
    "painnet": "painnet.data.extract.extract_parcel_series(bold, load_atlas(dseg))",
}


def _plan(fmt: str) -> list[tuple[str, str, str | None]]:
    """``(label, contender, variant)`` measured on one format."""
    if fmt != ".nii.gz":
        return [
            ("floor", "floor", None),
            ("nilearn", "nilearn", None),
            ("painnet", "painnet", None),
        ]
    floors = [(f"floor {name}", "floor", name) for name in available_decompressors()]
    return [
        *floors,
        ("nilearn", "nilearn", None),
        ("painnet", "painnet", None),
        ("painnet zlib", "painnet", "zlib"),
    ]


def _fastest_floor(best: dict[str, float]) -> tuple[str, float]:
    """``(label, seconds)`` of the fastest floor measured."""
    floors = {label: t for label, t in best.items() if label.startswith("floor")}
    label = min(floors, key=floors.get)
    return label, floors[label]


def _targets(res: dict[str, dict], fmt: str) -> list[dict[str, Any]]:
    best = {name: min(r["times"]) for name, r in res.items()}
    painnet_mem = res["painnet"]["peak_mem_mb"]
    nilearn_mem = res["nilearn"]["peak_mem_mb"]
    brief = "project brief"
    floor_label, floor_s = _fastest_floor(best)
    history = []
    if fmt == ".nii.gz":
        history = [
            target(
                f"painnet/zlib floor {fmt}",
                "painnet time (as installed) / zlib floor time (best of N)",
                best["painnet"] / best["floor zlib"],
                1.3,
                "max",
                "x",
                brief,
            ),
            target(
                f"painnet zlib/zlib floor {fmt}",
                "painnet forced to zlib / zlib floor (best of N): the history's ratio",
                best["painnet zlib"] / best["floor zlib"],
                1.3,
                "max",
                "x",
                brief,
            ),
        ]
    return [
        target(
            f"painnet/floor {fmt}",
            f"painnet time / fastest floor time (best of N; fastest: {floor_label})",
            best["painnet"] / floor_s,
            1.3,
            "max",
            "x",
            brief,
        ),
        *history,
        target(
            f"speed-up vs nilearn {fmt}",
            "nilearn time / painnet time (best of N)",
            best["nilearn"] / best["painnet"],
            3.0,
            "min",
            "x",
            brief,
        ),
        target(
            f"memory vs nilearn {fmt}",
            "painnet peak added RSS / nilearn peak added RSS",
            painnet_mem / nilearn_mem if nilearn_mem else None,
            0.25,
            "max",
            "x",
            brief,
        ),
    ]


def _agreement(workdir: Path, fmt: str) -> dict[str, Any]:
    """Largest difference between painnet's and nilearn's parcel means (same file), and
    whether painnet's series are the same bytes with zlib as with the installed inflater."""
    tag = fmt.replace(".", "_")
    ours = np.load(workdir / f"series_painnet{tag}.npy")
    theirs = np.load(workdir / f"series_nilearn{tag}.npy")
    if ours.shape != theirs.shape:
        return {"same_shape": False, "painnet_shape": ours.shape, "nilearn_shape": theirs.shape}
    diff = np.abs(ours.astype(np.float64) - theirs)
    check: dict[str, Any] = {
        "same_shape": True,
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / np.maximum(np.abs(theirs), 1e-12)).max()),
    }
    zlib_series = workdir / f"series_painnet_zlib{tag}.npy"
    if zlib_series.exists():  # the installed decompressor and zlib: the same bytes
        check["painnet_zlib_byte_identical"] = bool(
            np.load(zlib_series).tobytes() == ours.tobytes()
        )
    return check
