"""Stage 4: the classical edge model (EdgePCR), a whole leave-one-session-out run.

One paper-sized participant: 400 parcels, 28 sessions × 3 runs × 1,304 frames of synthetic
cleaned runs in which 30 parcels share a signal whose amplitude follows the rating (so their
edges co-fluctuate with pain and the model has something to find). The LOSO run is what a
runner does with painnet's API: ``EdgePCR.prepare(all runs)`` once (decile samples + Gram
matrix), then for each of the 28 outer folds ``fit(samples, sessions=training + validation
sessions of loso_split)`` — with its inner leave-one-session-out CV over the number of PCs —
and ``predict_run`` on the three held-out runs.

Run in a child process: peak memory is the resident memory added after the runs were built
(the runs themselves, 84 × 1304 × 400 float32 = 175 MB, are reported apart). One repeat (the
run takes minutes); the pooled frame-level r of held-out predictions is reported as a sanity
check that the model found the planted signal.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from benchmarks.common import PeakMemory, measurement, run_child, target
from benchmarks.synthetic import RunSizes

# Our own goals (the brief sets none for this stage): a participant's whole classical analysis
# on a 2-core laptop in a coffee break, in memory that leaves an 8 GB laptop usable.
WALL_GOAL_S = 600.0
MEM_GOAL_MB = 1024.0


@dataclass(frozen=True)
class EdgeSizes:
    runs: RunSizes = RunSizes()
    coupled_parcels: int = 30
    coupling_gain: float = 1.2
    folds: int | None = None  # None: all sessions


def child_edge(params: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.synthetic import make_runs, sessions_of
    from painnet.data.splits import loso_split
    from painnet.models.classical import EdgePCR

    sizes = EdgeSizes(
        runs=RunSizes(**params["runs"]), **{k: v for k, v in params.items() if k != "runs"}
    )
    runs = make_runs(sizes.runs, 0, sizes.coupled_parcels, sizes.coupling_gain)
    sessions = sessions_of(runs)
    subject = next(iter(sessions))
    n_folds = len(sessions[subject]) if sizes.folds is None else int(sizes.folds)
    fold_times, preds, truth, n_components = [], [], [], []
    with PeakMemory() as mem:
        t_all = time.perf_counter()
        model = EdgePCR()
        samples = model.prepare(runs)
        prepare_s = time.perf_counter() - t_all
        for fold in range(n_folds):
            t0 = time.perf_counter()
            split = loso_split(sessions, subject, fold, n_val=1, seed=0)
            model.fit(samples, sessions=split.fit_sessions)
            for run in runs:
                if run.key.session_key in split.test:
                    pred = model.predict_run(run)
                    ok = run.valid_target
                    preds.append(pred[ok])
                    truth.append(run.target[ok])
            fold_times.append(time.perf_counter() - t0)
            n_components.append(int(model.n_components_))
        total_s = time.perf_counter() - t_all
    pooled_r = float(np.corrcoef(np.concatenate(preds), np.concatenate(truth))[0, 1])
    return {
        "total_s": total_s,
        "prepare_s": prepare_s,
        "fold_times": fold_times,
        "n_folds": n_folds,
        "n_samples": int(samples.rating.size),
        "n_edges": int(samples.features.shape[1]),
        "features_mb": samples.features.nbytes / 2**20,
        "runs_mb": sum(r.series.nbytes for r in runs) / 2**20,
        "pooled_r": pooled_r,
        "n_components_median": float(statistics.median(n_components)),
        **mem.as_dict(),
    }


def run_stage(sizes: EdgeSizes, log=print) -> dict[str, Any]:
    t_start = time.perf_counter()
    res = run_child(
        "edge",
        {"runs": asdict(sizes.runs), **{k: v for k, v in asdict(sizes).items() if k != "runs"}},
        timeout_s=3600,
    )
    whole = measurement(
        "LOSO edge PCR",
        f"prepare once + {res['n_folds']} outer folds (fit with inner LOSO CV, predict held-out)",
        [res["total_s"]],
        peak_mem_mb=res["peak_mem_mb"],
    )
    prepare = measurement(
        "prepare (deciles + Gram)", "EdgePCR.prepare(all runs)", [res["prepare_s"]]
    )
    folds = measurement(
        "one outer fold",
        "fit(samples, sessions) + predict_run of 3 held-out runs",
        res["fold_times"],
    )
    log(
        f"  LOSO edge: {res['total_s']:.1f} s (prepare {res['prepare_s']:.1f} s), "
        f"peak +{res['peak_mem_mb']:.0f} MiB, pooled r {res['pooled_r']:.2f}"
    )
    own = "benchmarks (2-core laptop: a coffee break, leaves an 8 GB laptop usable)"
    targets = []
    if sizes.folds is None:
        targets = [
            target(
                "edge LOSO wall",
                "whole LOSO run, seconds",
                res["total_s"],
                WALL_GOAL_S,
                "max",
                "s",
                own,
            ),
            target(
                "edge LOSO memory",
                "peak added RSS, MiB",
                res["peak_mem_mb"],
                MEM_GOAL_MB,
                "max",
                "MiB",
                own,
            ),
        ]
    return {
        "what": "classical edge-PCR-LASSO: whole leave-one-session-out run of one participant",
        "sizes": {
            **sizes.runs.as_dict(),
            "folds": res["n_folds"],
            "coupled_parcels": sizes.coupled_parcels,
            "decile_samples": res["n_samples"],
            "edges": res["n_edges"],
            "features_mb": res["features_mb"],
            "runs_mb": res["runs_mb"],
        },
        "method": "one repeat in a child process; peak = RSS added after the runs were built",
        "measurements": [whole, prepare, folds],
        "targets": targets,
        "checks": {"pooled_r": res["pooled_r"], "n_components_median": res["n_components_median"]},
        "wall_s": time.perf_counter() - t_start,
    }
