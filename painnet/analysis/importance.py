"""Feature importance of trained decoders: which regions carry the decoded pain.

    python -m painnet.analysis.importance RUN_DIR [--n-perm 10000] [--n-perm-inputs 20]

RUN_DIR is a ``train.py`` output folder (one job) or an experiment folder: there, the
leave-one-session-out folds of each participant × model are pooled, each held-out session with
its own fold's model, as the study does (cocoanlab/DEIPP
``analysis/analysis_predict_rating_featimp.m:59``: one weight vector per held-out
session). Results go to ``RUN_DIR/importance/sub-<subject>_<model>/``:

- ``importance_<method>.tsv``: region, label, rank, importance, ci_low, ci_high, p (+ extras;
  on a simulated dataset also ``truth``: ``coupled`` / ``activation`` / empty, from
  ``derivatives/simulation/ground_truth.json``);
- ``importance_<method>.nii.gz`` (volumetric atlas) or ``.dscalar.nii`` (grayordinates), and
  ``importance_<method>.png``;
- ``summary.json``: pooled r, permutations, jobs, seed.

Methods:

``edge_terms`` (edge_pcr, the study's method, analysis_predict_rating_featimp.m:56-98)
    On the evaluation's 1-min bins with each fold's weights, region j's term is the summed
    contribution ``x·w`` of all edges touching j (an edge counts in full for both of its regions,
    see :mod:`painnet.analysis.terms`). That term alone is permuted hierarchically (sessions →
    runs → bins, :mod:`painnet.analysis.permutation`), ``n_perm`` times (the study: 10,000),
    and importance = mean(r_original − r_permuted). No refitting.
``input_permutation`` (deep models)
    Region j's input windows are permuted across bins on the same hierarchical scheme and the
    model predicts again (``n_perm_inputs`` shuffles; ``P × n_perm_inputs`` forward passes
    over the held-out frames: ``--frame-stride k`` lets every k-th frame of a bin stand for the
    bin, ``--device`` runs on a GPU).
``integrated_gradients`` (deep models)
    captum integrated gradients per region (zero baseline, summed over the window's frames);
    these terms add up to ``f(x) − f(0)`` and get the study's term test like ``edge_terms``.
    The TSV also has ``mean_abs_attribution`` per region.

``ci_low``/``ci_high`` are the 2.5th/97.5th percentiles of the drop over permutations (the
study reports only the mean); ``p`` is two-sided
(:func:`painnet.analysis.permutation.permutation_p`). On simulated data each method also gets
``importance_<method>_vs_truth.png``: the map, the simulator's pain parcels and the ranking.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from painnet.analysis import maps
from painnet.analysis.jobs import (
    build_job_datamodule,
    eval_protocol,
    find_job_dirs,
    job_config,
    job_predictions,
    load_decoder,
    model_label,
)
from painnet.analysis.permutation import (
    ImportanceResult,
    hierarchical_permutations,
    summarize_drops,
    term_permutation_drops,
)
from painnet.analysis.terms import bin_terms, edge_region_terms
from painnet.atomic import write_text_atomic

log = logging.getLogger(__name__)

OUT_DIR = "importance"
DEEP_METHODS = ("input_permutation", "integrated_gradients")
# Largest |recomputed − stored| prediction accepted for the edge model (float32 series).
EDGE_TOLERANCE = 1e-5


@dataclass
class FittedJob:
    """One fold, ready for the analysis (normally loaded from a job folder by :func:`load_job`).

    table: its frame-level prediction table; runs: its held-out runs by (subject, session, run);
    model: the fitted estimator (with ``weights_``/``intercept_`` for the edge model) or a torch
    module (windows ``[B, P, L]`` → ``[B]``); regions/labels: atlas label and name of every
    series column; window: window length in frames (deep models); data_root: the dataset (its
    simulator ground truth, if any); reference: a CIFTI file for grayordinate maps; protocol:
    the evaluation protocol whose bins the analysis uses (None = defaults).
    """

    directory: Path
    table: pd.DataFrame
    runs: dict
    model: object
    deep: bool
    regions: list[int]
    labels: list[str]
    atlas: object
    window: int
    data_root: Path
    reference: Path | None = None
    protocol: object = None


@dataclass
class GroupResult:
    """What the analysis of one participant × model produced."""

    subject: str
    model: str
    out_dir: Path
    results: dict[str, ImportanceResult] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


# --------------------------------------------------------------------------- loading


def load_job(job_dir: Path, data_cache: dict | None = None) -> FittedJob:
    """One job folder: its predictions, fitted model and held-out runs (rebuilt from its config).

    data_cache: datamodules by data config, shared by the folds of one participant (a LOSO
    fold's datamodule holds every session of the participant, so the next fold's held-out runs
    are already loaded).
    """
    cfg = job_config(job_dir)
    table = job_predictions(job_dir)
    wanted = {tuple(k) for k in table[["subject", "session", "run"]].drop_duplicates().values}
    key = _data_key(cfg)
    dm = data_cache.get(key) if data_cache is not None and key else None
    if dm is None or not wanted <= {_run_key(r) for r in dm.runs}:
        dm = build_job_datamodule(cfg)
        held_out = {_run_key(dm.runs[i]) for i in dm.runs_in("test")}
        missing = sorted(wanted - held_out)
        if missing:
            raise ValueError(
                f"{job_dir}/predictions.csv: runs {missing[:3]} are not held-out runs of the "
                f"job's rebuilt split {dm.split.name} (data or split changed since training?)"
            )
        if data_cache is not None and key:
            data_cache[key] = dm
    decoder = load_decoder(job_dir, cfg, dm)
    test = {_run_key(r): r for r in dm.runs if _run_key(r) in wanted}
    atlas = dm.atlas
    if atlas is None:
        raise ValueError(f"{job_dir}: the job's data has no atlas (data.atlas): no map possible")
    first = next(iter(test.values()))
    regions, labels = _regions(atlas, first.parcel_names, first.n_parcels, job_dir)
    reference = None
    if atlas.kind == maps.GRAYORDINATES and dm.run_files:
        reference = dm.run_files[0].bold
    return FittedJob(
        directory=job_dir,
        table=table,
        runs=test,
        model=decoder.model,
        deep=decoder.deep,
        regions=regions,
        labels=labels,
        atlas=atlas,
        window=dm.window_frames,
        data_root=Path(dm.root),
        reference=reference,
        protocol=eval_protocol(cfg),
    )


def _run_key(run) -> tuple[str, str, str]:
    return (run.key.subject, run.key.session, run.key.run)


def _data_key(cfg) -> str | None:
    """The job's resolved data config as text (None if it does not resolve)."""
    try:
        return OmegaConf.to_yaml(cfg.data, resolve=True)
    except Exception:  # an unresolvable interpolation: no sharing, each job builds its own
        return None


def _regions(atlas, names: Sequence[str], n_parcels: int, job_dir: Path):
    """Atlas label and name of every series column (columns follow the atlas' label order)."""
    if len(names) != n_parcels:
        raise ValueError(f"{job_dir}: runs carry {len(names)} parcel names for {n_parcels} columns")
    index = {name: i for i, name in enumerate(atlas.names)}
    if len(index) != len(atlas.names):
        raise ValueError(f"atlas {atlas.name!r}: parcel names are not unique")
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ValueError(f"{job_dir}: parcels {unknown[:5]} of the runs are not in the atlas")
    return [int(atlas.label_ids[index[n]]) for n in names], list(names)


def _edge_frame_terms(job: FittedJob) -> np.ndarray:
    """(rows of the job's table, P) edge region terms; checks they rebuild the predictions."""
    model = job.model
    if not (hasattr(model, "weights_") and hasattr(model, "intercept_")):
        raise ValueError(
            f"{job.directory}: edge-term importance needs a fitted edge model (weights_, "
            f"intercept_); got {type(model).__name__}"
        )
    table = job.table
    terms = np.zeros((len(table), len(job.regions)))
    for key, rows in table.groupby(["subject", "session", "run"], sort=False).indices.items():
        run = job.runs[tuple(key)]
        frames = table["frame"].to_numpy()[rows]
        terms[rows] = edge_region_terms(run.series[frames], model.weights_)
    rebuilt = terms.sum(1) / 2.0 + float(model.intercept_)
    stored = table["prediction"].to_numpy(dtype=np.float64)
    ok = np.isfinite(stored)
    err = np.max(np.abs(rebuilt[ok] - stored[ok]), initial=0.0)
    if err > EDGE_TOLERANCE * max(1.0, np.max(np.abs(stored[ok]), initial=0.0)):
        raise ValueError(
            f"{job.directory}: region terms rebuild the stored predictions only to {err:.2g}: "
            "the model or the data changed since training"
        )
    return terms


def _job_windows(job: FittedJob, rows: np.ndarray):
    """Input windows [len(rows), P, L] of the given table rows of one job."""
    import torch

    from painnet.analysis.deep import run_windows

    table = job.table.iloc[rows]
    parts, order = [], []
    for key, idx in table.groupby(["subject", "session", "run"], sort=False).indices.items():
        parts.append(run_windows(job.runs[tuple(key)], table["frame"].to_numpy()[idx], job.window))
        order.append(idx)
    x = torch.cat(parts)
    return x[torch.from_numpy(np.argsort(np.concatenate(order)))]


# --------------------------------------------------------------------------- analysis


def _pool(jobs: Sequence[FittedJob]) -> tuple[pd.DataFrame, np.ndarray]:
    """Concatenated prediction tables and the job index of every row."""
    tables, owner = [], []
    seen: dict[tuple, Path] = {}
    for k, job in enumerate(jobs):
        for key in job.table[["subject", "session"]].drop_duplicates().itertuples(index=False):
            if tuple(key) in seen:
                raise ValueError(
                    f"session {tuple(key)} is held out by both {seen[tuple(key)]} and "
                    f"{job.directory}: importance pools distinct held-out sessions (give a "
                    "within-subject experiment or one job folder)"
                )
            seen[tuple(key)] = job.directory
        tables.append(job.table)
        owner.append(np.full(len(job.table), k))
        if job.regions != jobs[0].regions:
            raise ValueError(f"{job.directory}: regions differ from {jobs[0].directory}")
    return pd.concat(tables, ignore_index=True), np.concatenate(owner)


def analyse_jobs(
    jobs: Sequence[FittedJob],
    n_perm: int = 10_000,
    n_perm_inputs: int = 20,
    ig_steps: int = 32,
    seed: int = 0,
    bin_size: str = "1min",
    frame_stride: int = 1,
    device: str = "auto",
) -> tuple[dict[str, ImportanceResult], dict[str, dict]]:
    """Importance results per method for jobs of one participant × model (pooled folds).

    frame_stride / device apply to deep models only: every ``frame_stride``-th usable frame of
    a bin stands for the bin (each permutation re-predicts every frame kept), on ``device``
    (``auto``: CUDA when available). A stride > 1 changes the bin means and so the starting r
    (``r_original`` in summary.json): on one demo fold of a weak ConvAttn, stride 10 gave
    -0.04 where all frames give 0.20. Prefer a GPU to a large stride.
    """
    table, owner = _pool(jobs)
    protocol = jobs[0].protocol
    if any(job.protocol != protocol for job in jobs):
        raise ValueError("the folds were evaluated with different eval.protocol settings")
    deep = {bool(job.deep) for job in jobs}
    if len(deep) != 1:
        raise ValueError("a group mixes deep and classical jobs")
    rng = np.random.default_rng(seed)
    if deep.pop():
        return _analyse_deep(
            jobs,
            table,
            owner,
            bin_terms(table, np.zeros((len(table), 0)), bin_size, protocol=protocol),
            rng,
            n_perm=n_perm,
            n_perm_inputs=n_perm_inputs,
            ig_steps=ig_steps,
            frame_stride=frame_stride,
            device=device,
        )
    terms = np.zeros((len(table), len(jobs[0].regions)))
    for k, job in enumerate(jobs):
        terms[owner == k] = _edge_frame_terms(job)
    binned = bin_terms(table, terms, bin_size, protocol=protocol)
    src = hierarchical_permutations(binned.session_of_bin, binned.run_of_bin, n_perm, rng)
    r0, drops = term_permutation_drops(
        binned.bins["prediction"].to_numpy(), binned.terms, binned.bins["rating"].to_numpy(), src
    )
    return {"edge_terms": summarize_drops(drops, r0)}, {
        "edge_terms": {"mean_term": binned.terms.mean(0)}
    }


def _torch_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _analyse_deep(
    jobs, table, owner, binned, rng, *, n_perm, n_perm_inputs, ig_steps, frame_stride, device
):
    import torch

    from painnet.analysis.deep import (
        input_permutation_drops,
        integrated_gradients,
        predict_windows,
    )

    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
    dev = _torch_device(device)
    n_regions, n_bins = len(jobs[0].regions), len(binned.bins)
    # every frame_stride-th usable frame of each bin (always its first)
    first = np.r_[0, np.flatnonzero(np.diff(binned.frame_bin)) + 1]
    position = np.arange(binned.frame_bin.size) - np.repeat(first, np.bincount(binned.frame_bin))
    keep = position % frame_stride == 0
    rows, frame_bin = binned.frame_rows[keep], binned.frame_bin[keep]
    counts = np.bincount(frame_bin, minlength=n_bins).astype(np.float64)
    windows = torch.zeros((rows.size, n_regions, jobs[0].window))
    job_of_frame = owner[rows]
    for k, job in enumerate(jobs):
        sel = np.flatnonzero(job_of_frame == k)
        local = rows[sel] - np.flatnonzero(owner == k)[0]
        windows[torch.from_numpy(sel)] = _job_windows(job, local)
    windows = windows.to(dev)
    models = [job.model.to(dev) for job in jobs]
    members = [
        torch.from_numpy(np.flatnonzero(job_of_frame == k)).to(dev) for k in range(len(jobs))
    ]

    def predict(x: torch.Tensor) -> np.ndarray:
        out = np.empty(x.shape[0])
        for model, sel in zip(models, members):
            if sel.numel():
                out[sel.cpu().numpy()] = predict_windows(model, x[sel])
        return out

    predicted = predict(windows)
    stored = table["prediction"].to_numpy(dtype=np.float64)[rows]
    err = float(np.max(np.abs(predicted - stored), initial=0.0))
    if err > 1e-3:
        log.warning("deep model re-predicts the stored predictions only to %.2g", err)
    rating = binned.bins["rating"].to_numpy()
    results, extras = {}, {}
    if n_perm_inputs > 0:
        src = hierarchical_permutations(
            binned.session_of_bin, binned.run_of_bin, n_perm_inputs, rng
        )
        r0, drops = input_permutation_drops(predict, windows, frame_bin, rating, src)
        results["input_permutation"] = summarize_drops(drops, r0)
        extras["input_permutation"] = {}
    if ig_steps > 0:
        attr = np.zeros((rows.size, n_regions))
        deltas = np.zeros(rows.size)
        for model, sel in zip(models, members):
            if sel.numel():
                idx = sel.cpu().numpy()
                attr[idx], deltas[idx] = integrated_gradients(model, windows[sel], n_steps=ig_steps)
        log.info("integrated gradients: mean |convergence delta| %.3g", np.abs(deltas).mean())
        terms = np.zeros((n_bins, n_regions))
        np.add.at(terms, frame_bin, attr)
        total = np.bincount(frame_bin, predicted, n_bins) / counts
        src = hierarchical_permutations(binned.session_of_bin, binned.run_of_bin, n_perm, rng)
        r0, drops = term_permutation_drops(total, terms / counts[:, None], rating, src)
        results["integrated_gradients"] = summarize_drops(drops, r0)
        extras["integrated_gradients"] = {"mean_abs_attribution": np.abs(attr).mean(0)}
    return results, extras


# --------------------------------------------------------------------------- outputs


def simulated_truth(data_root: Path, subject: str) -> dict[int, str]:
    """Atlas label → ``coupled`` / ``activation`` for a simulated dataset ({} otherwise)."""
    path = Path(data_root) / "derivatives" / "simulation" / "ground_truth.json"
    if not path.is_file():
        return {}
    truth = json.loads(path.read_text()).get("subjects", {}).get(subject)
    if truth is None:
        return {}
    out = {int(p): "activation" for p in truth.get("activation_parcels", [])}
    out.update({int(p): "coupled" for p in truth.get("coupled_parcels", [])})
    return out


def write_outputs(
    job: FittedJob,
    subject: str,
    model: str,
    results: dict[str, ImportanceResult],
    extras: dict[str, dict],
    out_dir: Path,
    plots: bool = True,
) -> dict[str, pd.DataFrame]:
    """TSV, map and figure per method; returns the TSV tables."""
    truth = simulated_truth(job.data_root, subject)
    tables = {}
    for method, res in results.items():
        columns = {
            "importance": res.importance,
            "ci_low": res.ci_low,
            "ci_high": res.ci_high,
            "p": res.p,
            **extras.get(method, {}),
        }
        if truth:
            columns["truth"] = np.array([truth.get(r, "") for r in job.regions], dtype=object)
        table = maps.importance_table(job.regions, job.labels, columns)
        maps.write_tsv(table, out_dir / f"importance_{method}.tsv")
        img = maps.importance_image(
            job.atlas, job.regions, res.importance, job.reference, name=f"importance_{method}"
        )
        suffix = ".nii.gz" if job.atlas.kind == maps.VOLUME else ".dscalar.nii"
        maps.write_image(img, out_dir / f"importance_{method}{suffix}")
        if plots and not _plottable(job.atlas):
            log.warning("no figure: surface plots need an fsLR 91k atlas, not %s", job.atlas.name)
        elif plots:
            title = f"sub-{subject} {model}: {method} (r = {res.r_original:.2f})"
            maps.plot_importance(
                job.atlas,
                job.regions,
                res.importance,
                out_dir / f"importance_{method}.png",
                title=title,
                image=img if job.atlas.kind == maps.VOLUME else None,
            )
        if plots and truth and job.atlas.kind == maps.VOLUME:
            _plot_against_truth(job, subject, model, method, res, table, out_dir)
        tables[method] = table
    return tables


def _plot_against_truth(job, subject, model, method, res, table, out_dir: Path) -> Path:
    """The map above the simulator's pain parcels (co-fluctuation +1, activation −1)."""
    code = {"coupled": 1.0, "activation": -1.0}
    return maps.plot_against_truth(
        job.atlas,
        table,
        [code.get(t, 0.0) for t in table["truth"].fillna("")],
        out_dir / f"importance_{method}_vs_truth.png",
        title=f"sub-{subject} {model} {method}: pooled 1-min r = {res.r_original:.2f}",
    )


def _plottable(atlas) -> bool:
    return atlas.kind == maps.VOLUME or atlas.labels.size == maps.N_GRAYORDINATES_91K


def _is_loso(job_dir: Path) -> bool:
    """A leave-one-session-out fold (by split.json's ``kind``, else the split config)."""
    path = job_dir / "split.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    if "kind" in record:
        return record["kind"] == "loso"
    split = job_config(job_dir).get("split") or {}
    return split.get("kind") == "loso" or str(split.get("_target_", "")).endswith(
        "LeaveOneSessionOut"
    )


def group_jobs(run_dir: Path) -> dict[tuple[str, str], list[Path]]:
    """Job folders by (held-out participant, model); in an experiment, its LOSO folds only."""
    dirs = find_job_dirs(run_dir)
    if len(dirs) > 1 or dirs[0] != run_dir:
        loso = [d for d in dirs if _is_loso(d)]
        if not loso:
            raise ValueError(
                f"{run_dir}: no leave-one-session-out job folder; importance pools the held-out "
                "sessions of LOSO folds (run it on one job folder otherwise)"
            )
        dirs = loso
    groups: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for d in dirs:
        table = job_predictions(d)
        subjects = sorted(table["subject"].unique())
        if len(subjects) != 1:
            raise ValueError(f"{d}/predictions.csv: held-out runs of several participants")
        groups[(subjects[0], model_label(table, d))].append(d)
    return dict(sorted(groups.items()))


def run_importance(
    run_dir: str | Path,
    n_perm: int = 10_000,
    n_perm_inputs: int = 20,
    ig_steps: int = 32,
    seed: int = 0,
    plots: bool = True,
    out_dir: str | Path | None = None,
    bin_size: str = "1min",
    frame_stride: int = 1,
    device: str = "auto",
) -> list[GroupResult]:
    """The whole analysis of a job or experiment folder; see the module docstring."""
    if n_perm < 1 or n_perm_inputs < 0 or ig_steps < 0:
        raise ValueError(
            f"n_perm must be >= 1 (got {n_perm}), n_perm_inputs and ig_steps >= 0 "
            f"(got {n_perm_inputs}, {ig_steps})"
        )
    run_dir = Path(run_dir)
    base = Path(out_dir) if out_dir is not None else run_dir / OUT_DIR
    outputs = []
    for (subject, model), dirs in group_jobs(run_dir).items():
        start = time.perf_counter()
        cache: dict = {}
        jobs = [load_job(d, cache) for d in dirs]
        loaded = time.perf_counter()
        results, extras = analyse_jobs(
            jobs, n_perm, n_perm_inputs, ig_steps, seed, bin_size, frame_stride, device
        )
        analysed = time.perf_counter()
        target = base / f"sub-{subject}_{model}"
        tables = write_outputs(jobs[0], subject, model, results, extras, target, plots)
        end = time.perf_counter()
        summary = {
            "subject": subject,
            "model": model,
            "bin_size": bin_size,
            "seed": seed,
            "frame_stride": frame_stride,
            "jobs": [str(d) for d in dirs],
            "methods": {
                m: {"r_original": r.r_original, "n_perm": r.n_perm} for m, r in results.items()
            },
            "seconds": {
                "load": round(loaded - start, 1),
                "analysis": round(analysed - loaded, 1),
                "outputs": round(end - analysed, 1),
            },
        }
        _write_json(target / "summary.json", summary)
        log.info("importance of sub-%s %s (%d folds) -> %s", subject, model, len(dirs), target)
        outputs.append(GroupResult(subject, model, target, results, tables))
    return outputs


def _write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2), mkdir=True)


@dataclass
class ImportanceStep:
    """Experiment step: ``{_target_: painnet.analysis.importance.ImportanceStep, n_perm: ...}``.

    Called with the experiment folder once its jobs have finished; writes
    ``<experiment>/importance/``.
    """

    n_perm: int = 10_000
    n_perm_inputs: int = 20
    ig_steps: int = 32
    seed: int = 0
    plots: bool = True
    bin_size: str = "1min"
    frame_stride: int = 1
    device: str = "auto"

    def __call__(self, experiment_dir: str | Path) -> list[GroupResult]:
        return run_importance(
            experiment_dir,
            n_perm=self.n_perm,
            n_perm_inputs=self.n_perm_inputs,
            ig_steps=self.ig_steps,
            seed=self.seed,
            plots=self.plots,
            bin_size=self.bin_size,
            frame_stride=self.frame_stride,
            device=self.device,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m painnet.analysis.importance",
        description="Region importance maps of a train.py job folder or an experiment folder.",
    )
    parser.add_argument("run_dir", type=Path, help="job folder or experiment folder")
    parser.add_argument("--n-perm", type=int, default=10_000, help="term permutations (10000)")
    parser.add_argument(
        "--n-perm-inputs", type=int, default=20, help="deep input permutations (20; 0 = skip)"
    )
    parser.add_argument("--ig-steps", type=int, default=32, help="IG steps (32; 0 = skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bin-size", default="1min")
    parser.add_argument(
        "--frame-stride", type=int, default=1, help="deep: every k-th frame of a bin (1)"
    )
    parser.add_argument("--device", default="auto", help="deep: torch device (auto: CUDA if any)")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/importance")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        outputs = run_importance(
            args.run_dir,
            n_perm=args.n_perm,
            n_perm_inputs=args.n_perm_inputs,
            ig_steps=args.ig_steps,
            seed=args.seed,
            plots=not args.no_plots,
            out_dir=args.out,
            bin_size=args.bin_size,
            frame_stride=args.frame_stride,
            device=args.device,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for group in outputs:
        for method, table in group.tables.items():
            print(f"\nsub-{group.subject} {group.model} · {method} → {group.out_dir}")
            print(table.head(10).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
