"""Paired comparison of two models scored on the same held-out frames.

Both models' bins are resampled with the *same* hierarchical draws, so the bootstrap
distribution of ``metric_a - metric_b`` keeps the pairing (shared sessions, runs and ratings)
and is much tighter than comparing two independent CIs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from painnet.evaluation.bins import bin_predictions, usable_frames, validate_table
from painnet.evaluation.bootstrap import bootstrap_draws, sort_bins, summarize_draws
from painnet.evaluation.metrics import median_split_auc, pearson_r
from painnet.evaluation.table import FRAME_KEYS


def check_same_frames(table_a: pd.DataFrame, table_b: pd.DataFrame) -> None:
    """Raise ValueError unless both tables score the same usable frames with the same ratings.

    Usable = finite rating and prediction; keys = subject, session, run, frame.
    """
    a = usable_frames(validate_table(table_a, "table_a"))
    b = usable_frames(validate_table(table_b, "table_b"))
    keys_a = pd.MultiIndex.from_frame(a[FRAME_KEYS])
    keys_b = pd.MultiIndex.from_frame(b[FRAME_KEYS])
    if not keys_a.equals(keys_b):
        only_a = len(keys_a.difference(keys_b))
        only_b = len(keys_b.difference(keys_a))
        raise ValueError(
            "paired comparison needs identical usable frames (subject, session, run, frame): "
            f"{only_a} frame(s) only in table_a, {only_b} only in table_b"
        )
    if not np.allclose(a["rating"].to_numpy(), b["rating"].to_numpy(), rtol=0, atol=1e-9):
        raise ValueError("paired comparison: table_a and table_b disagree on the ratings")


def paired_bootstrap_difference(
    table_a: pd.DataFrame,
    table_b: pd.DataFrame,
    bin_size: str = "1min",
    n_boot: int = 10_000,
    seed: int = 0,
    level: str = "auto",
) -> dict[str, float | int | str]:
    """Difference of pooled r and AUC between model A and model B (A - B) at ``bin_size``.

    Returns ``r_a, r_b, diff, ci_low, ci_high, p, se`` for r and ``auc_a, auc_b, auc_diff,
    auc_ci_low, auc_ci_high, auc_p, auc_se`` for AUC (95% percentile CI of the paired draws;
    p two-sided against a difference of 0), plus ``bin_size, n_bins, n_boot, level``.
    """
    check_same_frames(table_a, table_b)
    bins_a = sort_bins(bin_predictions(table_a, bin_size))
    bins_b = sort_bins(bin_predictions(table_b, bin_size))
    (draws_a, draws_b), level = bootstrap_draws([bins_a, bins_b], n_boot, seed, level)

    out: dict[str, float | int | str] = {}
    for name, point, prefix in (("r", pearson_r, ""), ("auc", median_split_auc, "auc_")):
        value_a = point(bins_a["rating"].to_numpy(), bins_a["prediction"].to_numpy())
        value_b = point(bins_b["rating"].to_numpy(), bins_b["prediction"].to_numpy())
        summary = summarize_draws(draws_a[name] - draws_b[name], null=0.0, n_boot=n_boot)
        out[f"{name}_a"] = value_a
        out[f"{name}_b"] = value_b
        out[f"{prefix}diff"] = value_a - value_b
        for field, value in summary.items():
            out[f"{prefix}{field}"] = value
    out.update(bin_size=bin_size, n_bins=int(len(bins_a)), n_boot=int(n_boot), level=level)
    return out
