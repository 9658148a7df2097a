"""Evaluation shared by every model: frame-level prediction table -> bins -> metrics.

Typical use::

    from painnet.evaluation import evaluate_predictions, print_metrics
    metrics = evaluate_predictions(table, out_dir="outputs/eval")
    print_metrics(metrics)
"""

from painnet.evaluation.bins import BIN_SIZES, bin_predictions, validate_table
from painnet.evaluation.bootstrap import hierarchical_bootstrap
from painnet.evaluation.compare import paired_bootstrap_difference
from painnet.evaluation.metrics import compute_metrics
from painnet.evaluation.report import (
    evaluate_by,
    evaluate_predictions,
    flat_metric_keys,
    format_metrics_table,
    metrics_frame,
    print_metrics,
)

__all__ = [
    "BIN_SIZES",
    "bin_predictions",
    "compute_metrics",
    "evaluate_by",
    "evaluate_predictions",
    "flat_metric_keys",
    "format_metrics_table",
    "hierarchical_bootstrap",
    "metrics_frame",
    "paired_bootstrap_difference",
    "print_metrics",
    "validate_table",
]
