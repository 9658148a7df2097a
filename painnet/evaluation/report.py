"""Score a frame-level prediction table at every bin size; write tables and plots.

``evaluate_predictions`` is the one entry point every model goes through (deep or classical):
bins -> point metrics -> hierarchical bootstrap -> flat dict (+ optional files).
Plots are drawn on ``matplotlib.figure.Figure`` objects rendered by the Agg backend, never
through pyplot, so no global figure registry is touched and nothing stays open.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table
from sklearn.metrics import roc_curve

from painnet.evaluation.bins import bin_validated, usable_frames, validate_table
from painnet.evaluation.bootstrap import hierarchical_bootstrap
from painnet.evaluation.metrics import compute_metrics
from painnet.evaluation.protocol import EvalProtocol, as_protocol
from painnet.evaluation.table import (
    BIN_SIZE_NAMES,
    BIN_SIZES,
    RUN_KEYS,
    SESSION_KEYS,
    json_safe,
)

POINT_METRICS = ("r", "auc", "within_run_r", "within_session_r", "r2", "mae", "n_bins")
CI_METRICS = ("r", "auc", "within_run_r", "within_session_r")
CI_FIELDS = ("ci_low", "ci_high", "p")
# metrics.csv column -> flat key template ({s} = bin size)
CSV_KEYS = {
    "r": "r_{s}",
    "r_ci_low": "r_{s}_ci_low",
    "r_ci_high": "r_{s}_ci_high",
    "r_p": "r_{s}_p",
    "auc": "auc_{s}",
    "auc_ci_low": "auc_{s}_ci_low",
    "auc_ci_high": "auc_{s}_ci_high",
    "auc_p": "auc_{s}_p",
    "within_run_r": "within_run_r_{s}",
    "within_run_r_ci_low": "within_run_r_{s}_ci_low",
    "within_run_r_ci_high": "within_run_r_{s}_ci_high",
    "within_run_r_p": "within_run_r_{s}_p",
    "within_session_r": "within_session_r_{s}",
    "within_session_r_ci_low": "within_session_r_{s}_ci_low",
    "within_session_r_ci_high": "within_session_r_{s}_ci_high",
    "within_session_r_p": "within_session_r_{s}_p",
    "r2": "r2_{s}",
    "mae": "mae_{s}",
    "n_bins": "n_bins_{s}",
}


# --------------------------------------------------------------------------- evaluation


def evaluate_predictions(
    table: pd.DataFrame,
    out_dir: str | Path | None = None,
    n_boot: int = 10_000,
    seed: int = 0,
    plots: bool = True,
    bin_sizes: Sequence[str] = BIN_SIZE_NAMES,
    protocol: EvalProtocol | dict | str | None = None,
) -> dict[str, float | int]:
    """Metrics of one model's prediction table at each bin size, as one flat dict.

    ``protocol`` (config ``eval.protocol``; default painnet's rules, ``"lee2026"`` the study's):
    bin rule and count, session value, median ties, AUC labels, one-class draws, p and CI
    rules, see :class:`painnet.evaluation.protocol.EvalProtocol`. Within-run and
    within-session r also get ``_ci_low, _ci_high, _p`` keys.

    Keys per bin size ``s``: ``r_s, auc_s, within_run_r_s, within_session_r_s, r2_s, mae_s,
    n_bins_s, r_s_ci_low, r_s_ci_high, r_s_p, auc_s_ci_low, auc_s_ci_high, auc_s_p``; plus
    ``n_sessions, n_runs, n_frames`` (counted over usable frames: finite rating and
    prediction). Undefined values are NaN (written as null in JSON). ``n_boot=0`` skips the
    bootstrap (CI and p keys NaN). With ``out_dir``: metrics.json, metrics.csv,
    binned_<s>.csv and (if ``plots``) timecourse/scatter/roc PNGs.
    """
    unknown = [s for s in bin_sizes if s not in BIN_SIZES]
    if unknown:
        raise ValueError(f"unknown bin size(s) {unknown}; choose from {list(BIN_SIZES)}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    table = validate_table(table)
    frames = usable_frames(table)
    if frames.empty:
        raise ValueError("prediction table: no frame has both a finite rating and prediction")

    metrics: dict[str, float | int] = {
        "n_sessions": int(frames.groupby(SESSION_KEYS).ngroups),
        "n_runs": int(frames.groupby(RUN_KEYS).ngroups),
        "n_frames": int(len(frames)),
    }
    protocol = as_protocol(protocol)
    binned = {s: bin_validated(table, s, protocol) for s in bin_sizes}
    for size, bins in binned.items():
        metrics.update(_metrics_for_bin_size(bins, size, n_boot, seed, protocol))

    if out_dir is not None:
        write_outputs(metrics, binned, Path(out_dir))
        if plots:
            write_plots(table, binned, metrics, Path(out_dir))
    return metrics


def _metrics_for_bin_size(
    binned: pd.DataFrame, size: str, n_boot: int, seed: int, protocol: EvalProtocol | None = None
) -> dict:
    """Flat point metrics + bootstrap CI/p of one bin size, keys suffixed with ``_<size>``."""
    point = compute_metrics(binned, protocol)
    out: dict[str, float | int] = {f"{name}_{size}": point[name] for name in POINT_METRICS}
    boot = None
    if n_boot > 0:
        boot = hierarchical_bootstrap(binned, n_boot=n_boot, seed=seed, protocol=protocol)
    for name in CI_METRICS:
        for field in CI_FIELDS:
            out[f"{name}_{size}_{field}"] = boot[name][field] if boot else float("nan")
    return out


def bin_sizes_in(metrics: dict) -> list[str]:
    """Bin sizes present in a flat metrics dict, in ``BIN_SIZES`` order."""
    return [s for s in BIN_SIZES if f"r_{s}" in metrics]


def metrics_frame(metrics: dict) -> pd.DataFrame:
    """Flat metrics -> one row per bin size (index ``bin_size``), columns ``CSV_KEYS``."""
    rows = {
        size: {col: _as_float(metrics.get(key.format(s=size))) for col, key in CSV_KEYS.items()}
        for size in bin_sizes_in(metrics)
    }
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(CSV_KEYS))
    frame["n_bins"] = frame["n_bins"].astype("Int64")  # a count: no trailing ".0" in the CSV
    frame.index.name = "bin_size"
    return frame


def evaluate_by(
    table: pd.DataFrame, by: Sequence[str] = ("subject", "model"), **kwargs
) -> pd.DataFrame:
    """``evaluate_predictions`` on each group of ``table`` (e.g. per participant and model).

    ``model`` is optional in the table contract, so it is skipped when absent; any other
    missing ``by`` column is an error. ``kwargs`` go to ``evaluate_predictions``; with
    ``out_dir`` each group writes into ``out_dir/<col>-<value>_...``. Returns one row per
    group: the ``by`` columns then the flat metrics.
    """
    keys = [c for c in by if c in table.columns or c != "model"]
    missing = [c for c in keys if c not in table.columns]
    if missing:
        raise ValueError(f"evaluate_by: column(s) {missing} not in the prediction table")
    if not keys:
        return pd.DataFrame([evaluate_predictions(table, **kwargs)])
    out_dir = kwargs.pop("out_dir", None)
    rows = []
    for values, group in table.groupby(keys, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        label = dict(zip(keys, values, strict=True))
        group_dir = None
        if out_dir is not None:
            group_dir = Path(out_dir) / "_".join(f"{k}-{_safe(v)}" for k, v in label.items())
        rows.append({**label, **evaluate_predictions(group, out_dir=group_dir, **kwargs)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- files


def write_outputs(metrics: dict, binned: dict[str, pd.DataFrame], out_dir: Path) -> None:
    """Write metrics.json (flat), metrics.csv (row per bin size) and binned_<s>.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.json", "w") as fh:
        json.dump(json_safe(metrics), fh, indent=2, allow_nan=False)
    metrics_frame(metrics).to_csv(out_dir / "metrics.csv")
    for size, bins in binned.items():
        bins.to_csv(out_dir / f"binned_{size}.csv", index=False)


def write_plots(
    table: pd.DataFrame, binned: dict[str, pd.DataFrame], metrics: dict, out_dir: Path
) -> list[Path]:
    """Time courses per held-out session, and scatter + ROC per bin size. Returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    minute_bins = binned.get("1min")
    if minute_bins is None:
        minute_bins = bin_validated(validate_table(table), "1min")
    paths = plot_timecourses(table, minute_bins, out_dir)
    for size, bins in binned.items():
        paths.append(plot_scatter(bins, size, metrics.get(f"r_{size}"), out_dir))
        paths.append(plot_roc(bins, size, metrics.get(f"auc_{size}"), out_dir))
    return paths


# --------------------------------------------------------------------------- plots


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # attach an Agg canvas explicitly: no pyplot, nothing left open
    fig.savefig(path, dpi=100)
    return path


def plot_timecourses(table: pd.DataFrame, minute_bins: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One PNG per session: rated vs predicted pain over time, runs side by side.

    Thin lines: frame level (gaps where the rating is NaN); markers: 1-minute bin means.
    Files: ``timecourse_sub-<subject>_ses-<session>.png``.
    """
    paths = []
    table = table.sort_values(RUN_KEYS + ["frame"])
    for (subject, session), frames in table.groupby(SESSION_KEYS, sort=True):
        runs = list(frames.groupby("run", sort=True))
        fig = Figure(figsize=(4.5 * len(runs), 3.2), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(runs), sharey=True, squeeze=False)[0])
        for ax, (run, run_frames) in zip(axes, runs, strict=True):
            bins = minute_bins[
                (minute_bins["subject"] == subject)
                & (minute_bins["session"] == session)
                & (minute_bins["run"] == run)
            ]
            _draw_run_timecourse(ax, run_frames, bins, f"run {run}")
        axes[0].set_ylabel("pain")
        axes[0].legend(loc="upper left", fontsize="small")
        fig.suptitle(f"sub-{subject} ses-{session} (held out)")
        name = f"timecourse_sub-{_safe(subject)}_ses-{_safe(session)}.png"
        paths.append(_save(fig, out_dir / name))
    return paths


def _draw_run_timecourse(ax, frames: pd.DataFrame, bins: pd.DataFrame, title: str) -> None:
    t = frames["time_s"].to_numpy()
    ax.plot(t, frames["rating"].to_numpy(), color="tab:red", lw=0.6, alpha=0.5)
    ax.plot(t, frames["prediction"].to_numpy(), color="tab:blue", lw=0.6, alpha=0.5)
    ax.plot(bins["time_s"], bins["rating"], "o-", color="tab:red", ms=4, label="rated")
    ax.plot(bins["time_s"], bins["prediction"], "s-", color="tab:blue", ms=4, label="predicted")
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel("time (s)")


def plot_scatter(binned: pd.DataFrame, bin_size: str, r: float | None, out_dir: Path) -> Path:
    """Prediction vs rating of every bin (coloured by session), with the pooled r."""
    fig = Figure(figsize=(4.2, 4.0), layout="constrained")
    ax = fig.subplots()
    if not binned.empty:
        session_id = binned.groupby(SESSION_KEYS, sort=False).ngroup().to_numpy()
        ax.scatter(
            binned["rating"], binned["prediction"], c=session_id, cmap="viridis", s=12, alpha=0.8
        )
    ax.set_xlabel("rated pain (bin mean)")
    ax.set_ylabel("predicted pain (bin mean)")
    ax.set_title(f"{bin_size} bins: r = {_fmt(r)} (n = {len(binned)})")
    return _save(fig, out_dir / f"scatter_{bin_size}.png")


def plot_roc(binned: pd.DataFrame, bin_size: str, auc: float | None, out_dir: Path) -> Path:
    """ROC of the prediction for bins rated above vs below the median (AUC in the legend)."""
    fig = Figure(figsize=(4.0, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="chance")
    rating = binned["rating"].to_numpy(dtype=float)
    if rating.size:
        median = np.median(rating)
        keep = rating != median
        above = rating[keep] > median
        if 0 < above.sum() < above.size:
            fpr, tpr, _ = roc_curve(above, binned["prediction"].to_numpy(dtype=float)[keep])
            ax.plot(fpr, tpr, color="tab:blue", label=f"AUC = {_fmt(auc)}")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{bin_size} bins: above vs below median")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, out_dir / f"roc_{bin_size}.png")


# --------------------------------------------------------------------------- console


def format_metrics_table(metrics: dict, title: str | None = "painnet evaluation") -> Table:
    """Rich table: one row per bin size; r [95% CI], p, AUC [95% CI], p, within-run r, R², MAE."""
    table = Table(title=title)
    for header in ("bins", "n", "r [95% CI]", "p", "AUC [95% CI]", "p (AUC)"):
        table.add_column(header, justify="right")
    for header in ("within-run r", "R²", "MAE"):
        table.add_column(header, justify="right")
    frame = metrics_frame(metrics)
    for size, row in frame.iterrows():
        n = row["n_bins"]
        table.add_row(
            str(size),
            "–" if not np.isfinite(n) else str(int(n)),
            f"{_fmt(row['r'])} [{_fmt(row['r_ci_low'])}, {_fmt(row['r_ci_high'])}]",
            _fmt_p(row["r_p"]),
            f"{_fmt(row['auc'])} [{_fmt(row['auc_ci_low'])}, {_fmt(row['auc_ci_high'])}]",
            _fmt_p(row["auc_p"]),
            _fmt(row["within_run_r"]),
            _fmt(row["r2"]),
            _fmt(row["mae"], digits=3),
        )
    return table


def print_metrics(metrics: dict, console: Console | None = None, title: str | None = None) -> None:
    """Print ``format_metrics_table(metrics)`` and the frame/run/session counts."""
    # Logs and pipes report an 80-column terminal; the table needs more to stay readable.
    console = console or Console(width=max(Console().width, 120))
    console.print(format_metrics_table(metrics, title=title or "painnet evaluation"))
    counts = ", ".join(
        f"{k} = {metrics[k]}" for k in ("n_sessions", "n_runs", "n_frames") if k in metrics
    )
    if counts:
        console.print(counts)


# --------------------------------------------------------------------------- helpers


def _as_float(value) -> float:
    return float("nan") if value is None else float(value)


def _fmt(value, digits: int = 2) -> str:
    value = _as_float(value)
    return "–" if not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt_p(p) -> str:
    p = _as_float(p)
    if not math.isfinite(p):
        return "–"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def _safe(label: object) -> str:
    """A label usable in a file name (letters, digits, dot, dash, underscore)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(label))


def flat_metric_keys(bin_sizes: Iterable[str] = tuple(BIN_SIZES)) -> list[str]:
    """Every flat metric key ``evaluate_predictions`` returns for ``bin_sizes``."""
    keys = ["n_sessions", "n_runs", "n_frames"]
    for size in bin_sizes:
        keys += [f"{name}_{size}" for name in POINT_METRICS]
        keys += [f"{name}_{size}_{field}" for name in CI_METRICS for field in CI_FIELDS]
    return keys
