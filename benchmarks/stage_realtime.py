"""Stage 6: real-time decoding latency, from a volume's arrival in the watch folder to its estimate.

Cases (each in its own child process):

- ``demo``: the simulator's ``demo`` grid and atlas (14 × 17 × 14, 100 parcels);
- ``paper``: the study's grid, 80 × 80 × 56 at 2.7 mm, 400 Voronoi parcels (as stage 1).

and two models each: ConvAttn (``model=convattn`` defaults, random weights: latency does not
depend on training) and the edge model (random symmetric ``P × P`` weights). Cleaning is the
causal default (6 motion + WM/CSF regression, high-pass 0.005 Hz, FD censoring 0.5 mm) with
``drop_initial_s=0`` so every volume after the first window's worth gets an estimate.

A writer *process* (the scanner) writes one float32 ``.nii`` volume plus its confounds sidecar
every ``interval_s`` (temporary name, then rename) into a folder that
:func:`painnet.realtime.run_session` watches, as ``painnet-realtime RUN_DIR --watch DIR`` does.
The latency of a volume is the wall time when its estimate is ready minus the later of two
instants before which the volume cannot have appeared: its modification time (stamped by the
kernel's coarse clock, up to one tick early) and a time stamp the writer takes just before the
rename. Both bounds can only make the latency look longer than it is. (The session's own
``latency_ms`` column measures from the modification time alone; it is reported alongside as
``tsv_latency_*``.) ``interval_s`` is shorter than the TR to keep
the stage short; a volume is processed before the next arrives unless processing takes longer
than ``interval_s``, in which case latencies pile up and the p99 shows it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import measurement, run_child, target

TR_S = 0.46
MEDIAN_GOAL_S = 0.100  # issue 14: median well under 100 ms
P99_GOAL_S = TR_S  # issue 14: p99 under the TR, so the stream never falls behind the scanner
CONFOUNDS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "white_matter", "csf")


@dataclass(frozen=True)
class RealtimeSizes:
    cases: tuple[str, ...] = ("demo", "paper")
    models: tuple[str, ...] = ("convattn", "edge_pcr")
    n_volumes: int = 300  # timed volumes per case (after the window fills)
    interval_s: float = 0.2
    paper_shape: tuple[int, int, int] = (80, 80, 56)
    paper_parcels: int = 400
    window_s: float = 10.0
    seed: int = 0


# --------------------------------------------------------------------------- child side


def _grid(case: str, sizes: RealtimeSizes) -> tuple[np.ndarray, np.ndarray]:
    """(labels (X, Y, Z) int, affine) of a case."""
    if case == "demo":
        from painnet.data.simulate import make_grid, resolve_params

        grid = make_grid(resolve_params("demo"), sizes.seed)
        return grid.labels.astype(np.int16), grid.affine
    from benchmarks.stage_extract import brain_labels

    shape = tuple(sizes.paper_shape)
    affine = np.diag([2.7, 2.7, 2.7, 1.0])
    affine[:3, 3] = -2.7 * (np.array(shape) - 1) / 2
    return brain_labels(shape, sizes.paper_parcels, sizes.seed), affine


def _model(name: str, n_parcels: int, n_frames: int, seed: int):
    """(model, deep?) with random weights."""
    rng = np.random.default_rng(seed)
    if name == "edge_pcr":
        from painnet.models.classical import EdgePCR

        model = EdgePCR()
        w = rng.standard_normal((n_parcels, n_parcels)) * 1e-3
        model.weights_ = (w + w.T) / 2
        np.fill_diagonal(model.weights_, 0.0)
        model.intercept_ = 0.5
        model.n_parcels_ = n_parcels
        return model, False
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import painnet

    torch.manual_seed(seed)
    GlobalHydra.instance().clear()
    conf = str(Path(painnet.__file__).parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}", "paths.output_dir=."])
    node = OmegaConf.to_container(cfg.model, resolve=True)
    node.pop("name", None)
    task = instantiate(node, n_parcels=n_parcels, n_frames=n_frames)
    task.eval()
    return task, True


def _writer(folder: str, labels: np.ndarray, affine: np.ndarray, n: int, interval: float) -> None:
    """The scanner: one volume + sidecar every ``interval`` s (runs in its own process)."""
    import nibabel as nib

    rng = np.random.default_rng(1)
    brain = labels > 0
    arrivals = {}
    base = np.where(brain, 1000.0, 0.0).astype(np.float32)
    start = time.time()
    for t in range(n):
        wait = start + t * interval - time.time()
        if wait > 0:
            time.sleep(wait)
        data = base.copy()
        data[brain] += rng.standard_normal(int(brain.sum()), dtype=np.float32) * 20
        name = f"vol-{t + 1:05d}"
        row = {c: float(rng.normal(0, 0.05)) for c in CONFOUNDS}
        row["framewise_displacement"] = float(abs(rng.normal(0, 0.1)))
        side = Path(folder) / f"{name}_confounds.json"
        tmp = Path(folder) / f".{name}.json.tmp"
        tmp.write_text(json.dumps(row))
        os.replace(tmp, side)
        tmp_nii = Path(folder) / f".{name}.tmp.nii"
        nib.save(nib.Nifti1Image(data, affine), tmp_nii)
        arrivals[t] = time.time()  # the volume cannot be seen before this instant
        os.replace(tmp_nii, Path(folder) / f"{name}.nii")
    (Path(folder) / ".arrivals.json").write_text(json.dumps(arrivals))


def child_realtime(params: dict[str, Any]) -> dict[str, Any]:
    import multiprocessing as mp
    import tempfile

    import nibabel as nib
    import pandas as pd
    import torch

    from painnet.data.atlas import atlas_for_bold, load_atlas
    from painnet.data.clean import CleanConfig
    from painnet.data.windows import window_frames
    from painnet.realtime.model import ReferenceGrid, TrainedDecoder
    from painnet.realtime.session import SessionOptions, run_session

    torch.set_num_threads(1)
    case, model_name = params["case"], params["model"]
    sizes = RealtimeSizes(**{k: v for k, v in params.items() if k not in ("case", "model")})
    labels, affine = _grid(case, sizes)
    with tempfile.TemporaryDirectory(prefix="painnet-rt-bench-") as tmp:
        tmp = Path(tmp)
        ref = tmp / "reference.nii"
        nib.save(nib.Nifti1Image(np.zeros(labels.shape, np.float32), affine), ref)
        dseg = tmp / "atlas_dseg.nii.gz"
        nib.save(nib.Nifti1Image(labels.astype(np.int16), affine), dseg)
        atlas = atlas_for_bold(load_atlas({"kind": "dseg", "path": str(dseg), "name": case}), ref)
        length = window_frames(sizes.window_s, TR_S)
        model, deep = _model(model_name, atlas.n_parcels, length, sizes.seed)
        decoder = TrainedDecoder(
            run_dir=tmp,
            config=None,
            clean=CleanConfig(causal=True, drop_initial_s=0.0),
            atlas=atlas,
            grid=ReferenceGrid.from_image(ref),
            tr=TR_S,
            window_frames=length,
            model=model,
            deep=deep,
        )
        watch = tmp / "watch"
        watch.mkdir()
        total = sizes.n_volumes + length
        writer = mp.get_context("fork").Process(
            target=_writer, args=(str(watch), labels, affine, total, sizes.interval_s)
        )
        out = tmp / "estimates.tsv"
        options = SessionOptions(
            watch=watch, out=out, port=None, idle_s=10.0, max_volumes=total, late_s=TR_S
        )
        writer.start()
        result = run_session(tmp, options, decoder=decoder)
        writer.join(timeout=60)
        table = pd.read_csv(out, sep="\t", na_values=["n/a"], keep_default_na=False)
        ok = table[table.status == "ok"]
        arrivals = json.loads((watch / ".arrivals.json").read_text())
        # estimate time = mtime + the TSV's latency. The volume appeared after both its mtime
        # and the writer's time stamp taken just before the rename: the later of the two is
        # the tightest bound, so the latency below can only over-state the true one.
        mtimes = np.array([(watch / f).stat().st_mtime for f in ok.file])
        before = np.array([arrivals[str(v)] for v in ok.volume])
        estimated = mtimes + ok.latency_ms.to_numpy() / 1000.0
        exact = estimated - np.maximum(mtimes, before)
    return {
        "latency_s": exact.tolist(),
        "latency_mtime_s": (ok.latency_ms.to_numpy() / 1000.0).tolist(),
        "n_volumes": int(result.n_volumes),
        "n_estimates": int(result.n_estimates),
        "n_gaps": int(result.n_gaps),
        "n_parcels": int(atlas.n_parcels),
        "n_voxels_in_parcels": int((labels > 0).sum()),
        "shape": list(labels.shape),
        "window_frames": int(length),
    }


# --------------------------------------------------------------------------- parent side


def run_stage(sizes: RealtimeSizes, log=print) -> dict[str, Any]:
    t_start = time.perf_counter()
    measurements, targets, checks = [], [], {}
    for case in sizes.cases:
        for model in sizes.models:
            params = {**asdict(sizes), "case": case, "model": model}
            res = run_child("realtime", params)
            lat = sorted(res["latency_s"])
            if not lat:
                raise RuntimeError(f"realtime {case}/{model}: no estimates ({res})")
            p99 = float(np.percentile(lat, 99))
            median = statistics.median(lat)
            by_mtime = res["latency_mtime_s"]
            name = f"{case} {model}"
            grid = "x".join(map(str, res["shape"]))
            measurements.append(
                measurement(
                    name,
                    f"arrival -> estimate per volume, {grid} grid, {res['n_parcels']} parcels, "
                    f"{model}, one .nii per {sizes.interval_s} s",
                    lat,
                    p99_s=p99,
                    tsv_latency_median_s=statistics.median(by_mtime),
                    tsv_latency_p99_s=float(np.percentile(by_mtime, 99)),
                    n_volumes=res["n_volumes"],
                    n_gaps=res["n_gaps"],
                )
            )
            src = "issue 14"
            targets += [
                target(
                    f"{name} median", "median latency, s", median, MEDIAN_GOAL_S, "max", "s", src
                ),
                target(
                    f"{name} p99", "99th percentile latency, s", p99, P99_GOAL_S, "max", "s", src
                ),
            ]
            checks[name] = {k: res[k] for k in ("n_volumes", "n_estimates", "n_gaps", "n_parcels")}
            log(f"  {name}: median {median * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    return {
        "what": "real-time decoding: latency from a volume file's arrival to its estimate",
        "sizes": asdict(sizes),
        "method": "one child process per case; a writer process writes volumes at interval_s; "
        "latency = estimate time - max(file mtime, writer time stamp before the rename), over "
        "volumes with estimates",
        "measurements": measurements,
        "targets": targets,
        "checks": checks,
        "wall_s": time.perf_counter() - t_start,
    }
