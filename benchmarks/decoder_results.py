"""The numbers behind ``benchmarks/decoders.md``, kept in the repository.

A loop's job folders (predictions, checkpoints) stay on the machine that ran it; what the report
shows of them -- per variant, participant and model the pooled metrics and the paired
difference from edge_pcr, per variant and model the loop's time -- is kept here, in two tidy
CSV files under ``benchmarks/decoders_results/``. A run of some models on some variants then
updates only its own rows, on any machine, and the report is rendered from the whole table.

Rows of different runs may sit side by side only if they were scored on identical frames. The
reference model (edge_pcr, fast and deterministic) is the check: a run that brings new rows for
a variant already in the table must bring that variant's edge_pcr too, and its numbers must
equal the stored ones (to the rounding of the stored values), or nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from painnet.atomic import write_csv_atomic
from painnet.experiments.jobdir import RunLock

RESULTS_DIR = Path(__file__).resolve().parent / "decoders_results"
METRICS = (
    "r_1min",
    "auc_1min",
    "r_2min",
    "auc_2min",
    "within_run_r_1min",
    "r_run",
    "r_session",
)
# Δr(1 min) of a model minus the reference, and the paired hierarchical bootstrap p
PAIRED = ("delta_r_1min", "p")
METRIC_COLUMNS = ("variant", "subject", "model", *METRICS, *PAIRED)
TIMING_COLUMNS = ("variant", "model", "subjects", "wall_s", "cpu_s", "jobs", "where")
# ``subjects`` of a timing row: the participants its loop ran (``+``-joined labels), or ALL.
# A loop too long for one sitting runs as shards of participants (--subjects), each timed alone.
ALL = "all"
# a column added later: rows kept before it existed get this value
LATER_COLUMNS = {"subjects": ALL}
# Stored values may be rounded to 2 decimals (rows carried over from a rendered report), so the
# reference check allows half a unit of the second decimal.
SAME_FRAMES_TOLERANCE = 0.005 + 1e-9


class ResultsMismatch(ValueError):
    """A run's reference rows differ from the stored ones: its frames are not the table's."""


def _read(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=list(columns))
    table = pd.read_csv(
        path,
        dtype={"variant": str, "subject": str, "subjects": str, "model": str, "where": str},
    )
    for column, value in LATER_COLUMNS.items():
        if column in columns and column not in table.columns:
            table[column] = value
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (expected {list(columns)})")
    return table[list(columns)]


def load_metrics(results: Path = RESULTS_DIR) -> pd.DataFrame:
    return _read(results / "metrics.csv", METRIC_COLUMNS)


def load_timings(results: Path = RESULTS_DIR) -> pd.DataFrame:
    return _read(results / "timings.csv", TIMING_COLUMNS)


def metric_rows(
    variant: str, metrics: pd.DataFrame, comparison: pd.DataFrame | None, reference: str
) -> pd.DataFrame:
    """One row per participant and model of a variant's aggregate tables, with the model's
    Δr(1 min) and p against ``reference`` (NaN for the reference itself or where unpaired)."""
    rows = []
    for _, row in metrics.iterrows():
        delta, p = paired_difference(comparison, row["subject"], row["model"], reference)
        rows.append(
            {
                "variant": variant,
                "subject": str(row["subject"]),
                "model": row["model"],
                **{m: float(row[m]) if m in row else float("nan") for m in METRICS},
                "delta_r_1min": delta,
                "p": p,
            }
        )
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS))


def paired_difference(
    comparison: pd.DataFrame | None, subject, model: str, reference: str
) -> tuple[float, float]:
    """Δr(1 min) of ``model`` minus ``reference`` and its p, from an aggregate's comparison."""
    nan = float("nan")
    if comparison is None or model == reference:
        return nan, nan
    rows = comparison[comparison["subject"].astype(str) == str(subject)]
    if "bin_size" in rows:
        rows = rows[rows["bin_size"] == "1min"]
    if "metric" in rows:
        rows = rows[rows["metric"] == "r"]
    for _, row in rows.iterrows():
        a, b = str(row.get("model_a")), str(row.get("model_b"))
        if {a, b} == {model, reference}:
            sign = 1.0 if a == model else -1.0
            return sign * float(row["diff"]), float(row.get("p", nan))
    return nan, nan


def check_same_frames(stored: pd.DataFrame, new: pd.DataFrame, reference: str) -> None:
    """Refuse new rows of a variant already stored unless its reference rows reproduce."""
    for variant, rows in new.groupby("variant"):
        old = stored[stored["variant"] == variant]
        if old.empty:
            continue
        old_ref = old[old["model"] == reference].set_index("subject")
        new_ref = rows[rows["model"] == reference].set_index("subject")
        if new_ref.empty:
            raise ResultsMismatch(
                f"variant {variant}: the run has no {reference} loop, so its rows cannot be "
                f"shown to share the stored rows' frames; run it with --models {reference} "
                "and the others"
            )
        for subject, ref in new_ref.iterrows():
            if subject not in old_ref.index:
                continue
            for metric in METRICS:
                a, b = float(old_ref.at[subject, metric]), float(ref[metric])
                # both undefined is a match; one undefined and not the other is not
                differs = (a != a) != (b != b) or abs(a - b) > SAME_FRAMES_TOLERANCE
                if differs:
                    raise ResultsMismatch(
                        f"variant {variant}, participant {subject}: {reference} {metric} is "
                        f"{b:.4f} in this run and {a:.4f} in the stored results, so the two "
                        "were not scored on the same frames (other data, folds or code); "
                        "rerun every model of the variant, or remove its rows from "
                        "metrics.csv first"
                    )


def upsert(stored: pd.DataFrame, new: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``stored`` with every row that ``new`` has a key for replaced by ``new``'s."""
    if new.empty:
        return stored
    if stored.empty:
        return new.reset_index(drop=True)
    key = pd.MultiIndex.from_frame(stored[keys].astype(str))
    replaced = key.isin(pd.MultiIndex.from_frame(new[keys].astype(str)))
    return pd.concat([stored[~replaced], new], ignore_index=True)


def covers_the_same_participants(a: str, b: str) -> bool:
    """Whether two timing rows' ``subjects`` share a participant (ALL shares every one)."""
    return ALL in (a, b) or bool(set(a.split("+")) & set(b.split("+")))


def upsert_timings(stored: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``stored`` with every loop time that a new one re-measures replaced: same variant and
    model, and a participant in common (a whole loop replaces its shards, a shard the whole
    loop it re-ran part of, whose time no longer belongs to the rows shown)."""
    if new.empty:
        return stored
    if stored.empty:
        return new.reset_index(drop=True)
    replaced = [
        any(
            covers_the_same_participants(str(old["subjects"]), str(n["subjects"]))
            for _, n in new[
                (new["variant"] == old["variant"]) & (new["model"] == old["model"])
            ].iterrows()
        )
        for _, old in stored.iterrows()
    ]
    return pd.concat([stored[~pd.Series(replaced, index=stored.index)], new], ignore_index=True)


def update(
    new_metrics: pd.DataFrame,
    new_timings: pd.DataFrame,
    reference: str,
    results: Path = RESULTS_DIR,
    superseded: Callable[[pd.DataFrame], pd.Series] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge a run's rows into the stored results (checked first, written atomically; runs
    of other variants that end at the same time wait for each other, so none loses rows).
    ``superseded``: a mask of the stored rows this run replaces as a set even where it brings
    no row of the same name (rows read off a job whose list of rows has changed)."""
    lock = RunLock(results).acquire(wait_s=120)
    try:
        metrics, timings = load_metrics(results), load_timings(results)
        check_same_frames(metrics, new_metrics, reference)
        if superseded is not None and not metrics.empty:
            metrics = metrics[~superseded(metrics).to_numpy(dtype=bool)]
        metrics = upsert(metrics, new_metrics, ["variant", "subject", "model"])
        timings = upsert_timings(timings, new_timings)
        metrics = metrics.sort_values(["variant", "subject", "model"], ignore_index=True)
        timings = timings.sort_values(["variant", "model", "subjects"], ignore_index=True)
        write_csv_atomic(results / "metrics.csv", metrics, float_format="%.6g")
        write_csv_atomic(results / "timings.csv", timings, float_format="%.6g")
    finally:
        lock.release()
    return metrics, timings
