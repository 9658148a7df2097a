"""Rows of ``benchmarks/decoders.md`` read off the ``model=stack`` jobs instead of trained again.

A stack job keeps each member's own held-out predictions (``members/<m>/predictions.csv``) and
every member's inner cross-validated predictions (``stack_inner_predictions.csv``). From them,
on the stack's own folds and frames:

- ``<member>@stack``: a member alone (e.g. the small ConvAttn trained from scratch);
- a stack variant: the combiner refitted on the same inner predictions, restricted to some
  members (e.g. the issue's baseline, edge_pcr + convattn) or with another ``run_level`` mode.

The tables are scored with painnet's own aggregate code (``evaluate_by``, ``compare_models``)
against the loop's other models, so the paired differences are on identical frames.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pandas as pd

from painnet.atomic import write_csv_atomic
from painnet.evaluation.report import evaluate_by
from painnet.evaluation.table import LABEL_DTYPES
from painnet.experiments.aggregate import collect_runs, pooled_predictions
from painnet.experiments.compare import compare_models
from painnet.experiments.stack import COMBINER_PICKLE, INNER_PREDICTIONS, MEMBER_PREDICTIONS

DERIVED_DIR = "aggregate_derived"


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=LABEL_DTYPES)


def stack_job_dirs(variant_dir: Path, stack_name: str = "stack") -> list[Path]:
    return sorted(p.parent for p in variant_dir.glob(f"{stack_name}-*/*/{COMBINER_PICKLE}"))


def _member_anchors(full, members: list[str]) -> list[str]:
    """The job's anchors that are among ``members`` (edge_pcr if none is: the study's model)."""
    return [a for a in full.anchors if a in members] or ["edge_pcr"]


def derived_tables(job_dirs: list[Path], subsets: dict[str, dict]) -> pd.DataFrame:
    """Pooled prediction tables of every member alone and of each variant of the stack:
    ``subsets`` maps a row label to ``{"members": [...], "run_level": ..., "anchor": ...,
    "within_scale": ..., "anchor_weights": ..., "within_weights": ...}``
    (any key may be left out: the job's own members / mode / those of its anchors that are
    among the members)."""
    parts = []
    for job in job_dirs:
        with open(job / COMBINER_PICKLE, "rb") as fh:
            full = pickle.load(fh)
        tables = {m: _read(job / "members" / m / MEMBER_PREDICTIONS) for m in full.members_}
        for m, table in tables.items():
            parts.append(table.assign(model=f"{m}@stack"))
        inner = _read(job / INNER_PREDICTIONS)
        for label, spec in subsets.items():
            members = spec.get("members", full.members_)
            run_level = spec.get("run_level", full.run_level)
            anchor = spec.get("anchor") or _member_anchors(full, members)
            combiner = type(full)(
                bin_size=full.bin_size,
                run_level=run_level,
                anchor=anchor,
                within_scale=spec.get("within_scale", full.within_scale),
                anchor_weights=spec.get("anchor_weights", full.anchor_weights),
                within_weights=spec.get("within_weights", full.within_weights),
                run_level_origin=spec.get("run_level_origin", full.run_level_origin),
                anchor_fallback=spec.get("anchor_fallback", full.anchor_fallback),
            )
            combiner.fit({m: inner[inner.model == m].drop(columns="model") for m in members})
            combined = combiner.combine({m: tables[m] for m in members})
            parts.append(combined.assign(model=label))
    return pd.concat(parts, ignore_index=True)


def write_derived(
    variant_dir: Path,
    subsets: dict[str, dict],
    reference: str = "edge_pcr",
    n_boot: int = 2000,
    seed: int = 0,
) -> bool:
    """Score the derived rows of ``variant_dir``'s stack jobs into ``aggregate_derived/``:
    ``within_subject.csv`` (per participant × model) and ``comparison.csv`` (each derived
    model vs ``reference``, paired on identical frames; none while the folder holds no loop of
    ``reference``). False when no stack job exists."""
    jobs = stack_job_dirs(variant_dir)
    if not jobs:
        return False
    derived = derived_tables(jobs, subsets)
    within = evaluate_by(derived, by=("subject", "model"), n_boot=n_boot, seed=seed, plots=False)
    runs = [r for r in collect_runs(variant_dir) if r.kind == "loso"]
    ref = pooled_predictions(runs)
    ref = ref[ref["model"] == reference]
    out = variant_dir / DERIVED_DIR
    out.mkdir(exist_ok=True)
    write_csv_atomic(out / "within_subject.csv", within)
    if ref.empty:  # no loop of the reference model in this folder (yet): nothing to pair with
        (out / "comparison.csv").unlink(missing_ok=True)
        return True
    comparisons = []
    for _, table in derived.groupby("model"):
        pair = pd.concat([table, ref], ignore_index=True)
        comparisons.append(compare_models(pair, bin_sizes=("1min",), n_boot=n_boot, seed=seed))
    write_csv_atomic(out / "comparison.csv", pd.concat(comparisons))
    return True
