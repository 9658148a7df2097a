"""Models compared on identical held-out frames: paired bootstrap differences and a plot.

Every pair of models of a participant (e.g. convattn vs edge_pcr, or fine-tuned vs scratch) is
scored on the frames both predicted (their usable frames intersected), so a difference never
comes from different test data. The pair is ordered so that fine-tuned arms come first and the
difference reads ``model_a − model_b``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table

from painnet.evaluation import paired_bootstrap_difference
from painnet.evaluation.table import BIN_SIZE_NAMES as BIN_SIZES
from painnet.evaluation.table import FRAME_KEYS, usable_mask

log = logging.getLogger(__name__)


def common_frames(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``a`` and ``b`` restricted to the frames both scored (finite rating and prediction)."""

    def usable_keys(t: pd.DataFrame) -> pd.DataFrame:
        return t.loc[usable_mask(t), FRAME_KEYS]

    shared = usable_keys(a).merge(usable_keys(b), on=FRAME_KEYS)
    return a.merge(shared, on=FRAME_KEYS), b.merge(shared, on=FRAME_KEYS)


def model_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
    """Every pair once, fine-tuned arms (``*_ft-*``) as ``model_a``, else alphabetical."""
    ordered = sorted(models, key=lambda m: ("_ft-" not in m, m))
    return list(itertools.combinations(ordered, 2))


def compare_models(
    table: pd.DataFrame,
    bin_sizes: Sequence[str] = BIN_SIZES,
    n_boot: int = 10_000,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired differences of every model pair per participant and bin size.

    ``table``: prediction tables of several models (``model`` column). Returns one row per
    subject × pair × bin size: ``subject, model_a, model_b, n_sessions, n_frames`` then the
    fields of :func:`painnet.evaluation.paired_bootstrap_difference` (``r_a, r_b, diff,
    ci_low, ci_high, p, auc_a, auc_b, auc_diff, auc_ci_low, auc_ci_high, auc_p``...).
    """
    rows = []
    for subject, own in table.groupby("subject", sort=True):
        for model_a, model_b in model_pairs(own["model"].unique()):
            a, b = common_frames(own[own.model == model_a], own[own.model == model_b])
            if a.empty:
                log.warning("sub-%s: %s and %s share no test frame", subject, model_a, model_b)
                continue
            label = {
                "subject": subject,
                "model_a": model_a,
                "model_b": model_b,
                "n_sessions": int(a.groupby(["subject", "session"]).ngroups),
                "n_frames": len(a),
            }
            for size in bin_sizes:
                diff = paired_bootstrap_difference(a, b, size, n_boot=max(n_boot, 1), seed=seed)
                rows.append({**label, **diff})
    return pd.DataFrame(rows)


def plot_comparison(within: pd.DataFrame, path: Path, bin_sizes: Sequence[str] = BIN_SIZES):
    """Pooled r with its 95% bootstrap CI per bin size: one panel per participant, one marker
    series per model. ``within``: the within-subject table (subject, model, r_<s>, CIs)."""
    subjects = sorted(within["subject"].unique())
    models = sorted(within["model"].unique())
    fig = Figure(figsize=(4.2 * len(subjects), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(subjects), sharey=True, squeeze=False)[0])
    x = np.arange(len(bin_sizes))
    width = 0.8 / max(len(models), 1)
    for ax, subject in zip(axes, subjects, strict=True):
        rows = within[within.subject == subject].set_index("model")
        for i, model in enumerate(models):
            if model not in rows.index:
                continue
            row = rows.loc[model]
            r = np.array([_num(row.get(f"r_{s}")) for s in bin_sizes])
            low = np.array([_num(row.get(f"r_{s}_ci_low")) for s in bin_sizes])
            high = np.array([_num(row.get(f"r_{s}_ci_high")) for s in bin_sizes])
            err = np.vstack([np.clip(r - low, 0, None), np.clip(high - r, 0, None)])
            xs = x - 0.4 + width * (i + 0.5)
            ax.errorbar(xs, r, yerr=np.nan_to_num(err), fmt="o", capsize=3, label=model)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, list(bin_sizes))
        ax.set_title(f"sub-{subject}")
        ax.set_xlabel("bin size")
    axes[0].set_ylabel("pooled r (95% CI)")
    axes[-1].legend(fontsize="small", loc="best")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


# Columns shown in the console summaries, in this order, when a table has them.
SHOWN = [
    "subject",
    "train_subject",
    "test_subject",
    "model",
    "model_a",
    "model_b",
    "mode",
    "bin_size",
    "n_folds",
    "n_sessions",
    "r_1min",
    "r_1min_p",
    "auc_1min",
    "r_2min",
    "r_run",
    "r_session",
    "auc_session",
    "r_a",
    "r_b",
    "diff",
    "ci_low",
    "ci_high",
    "p",
    "n_values",
    "min_n_significant",
    "slope",
    "slope_p",
]


def summary_table(frame: pd.DataFrame, title: str, max_rows: int = 40) -> Table:
    """A rich table of the ``SHOWN`` columns of an experiment table (numbers to 2-3 digits)."""
    columns = [c for c in SHOWN if c in frame.columns]
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for _, row in frame.head(max_rows).iterrows():
        table.add_row(*(_cell(row[c], c) for c in columns))
    return table


def _cell(value, column: str) -> str:
    if isinstance(value, float | np.floating):
        if not math.isfinite(value):
            return "–"
        if column.endswith("p") and value < 1e-3:
            return f"{value:.1e}"
        return f"{value:.3f}"
    return str(value)
