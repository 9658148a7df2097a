"""Stage 5: evaluation of a paper-sized prediction table.

Table: 51 sessions (23 + 28, two participants) × 3 runs × 1,239 kept frames (600 s runs at
TR 0.46 s minus the first 30 s) = 189,567 rows; prediction = 0.5 × rating + noise.

- ``bin 1min``: ``bin_predictions(table, "1min")`` (1,530 bins);
- ``bootstrap 1min``: ``hierarchical_bootstrap(binned, n_boot=10000, seed=0)`` on those bins
  (painnet's protocol: per-draw median labels, so a row-wise weighted median per draw);
- ``bootstrap 1min (lee2026)``: the same with ``protocol=EvalProtocol.lee2026()`` on the study's
  bins (observed labels fixed, one-class draws redrawn, the study's p and CI);
- ``evaluate_predictions``: every bin size (1 min, 2 min, run, session), point metrics plus a
  10,000-draw bootstrap each, ``out_dir=None, plots=False``.

In one child process: one warm-up call each, then best and median of ``repeats``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.common import PeakMemory, measurement, run_child, target, time_calls

# Our own goals (the brief sets none): the training-size analysis needs a bootstrap p-value for
# every (training size, repeat) — 26 × 100 = 2,600 per participant — so 1 s each keeps it
# under an hour on one core; a full evaluation per fold/run stays interactive.
BOOT_GOAL_S = 1.0
EVAL_GOAL_S = 5.0


@dataclass(frozen=True)
class EvalSizes:
    sessions_per_subject: tuple[int, ...] = (23, 28)
    n_runs: int = 3
    n_frames: int = 1304
    drop_frames: int = 65
    n_boot: int = 10_000
    repeats: int = 3


def child_evaluation(params: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.synthetic import prediction_table
    from painnet.evaluation.bins import bin_predictions
    from painnet.evaluation.bootstrap import hierarchical_bootstrap
    from painnet.evaluation.protocol import EvalProtocol
    from painnet.evaluation.report import evaluate_predictions

    sizes = EvalSizes(**{**params, "sessions_per_subject": tuple(params["sessions_per_subject"])})
    table = prediction_table(
        sizes.sessions_per_subject, sizes.n_runs, sizes.n_frames, sizes.drop_frames, seed=0
    )
    binned = bin_predictions(table, "1min")
    study = EvalProtocol.lee2026()
    binned_study = bin_predictions(table, "1min", study)
    n_boot = sizes.n_boot
    out: dict[str, Any] = {"n_rows": len(table), "n_bins_1min": len(binned)}

    def binning():
        return bin_predictions(table, "1min")

    def bootstrap():
        return hierarchical_bootstrap(binned, n_boot=n_boot, seed=0)

    def bootstrap_study():
        return hierarchical_bootstrap(binned_study, n_boot=n_boot, seed=0, protocol=study)

    def evaluate():
        return evaluate_predictions(table, out_dir=None, n_boot=n_boot, plots=False)

    steps = (
        ("bin", binning),
        ("bootstrap", bootstrap),
        ("bootstrap_study", bootstrap_study),
        ("evaluate", evaluate),
    )
    for name, fn in steps:
        with PeakMemory() as mem:
            result = fn()  # warm-up, also the memory run
        out[name] = {"times": time_calls(fn, sizes.repeats), **mem.as_dict()}
        if name == "bootstrap":
            out["bootstrap_r_ci"] = [result["r"]["ci_low"], result["r"]["ci_high"]]
        if name == "evaluate":
            out["r_1min"] = float(result["r_1min"])
    return out


def run_stage(sizes: EvalSizes, log=print) -> dict[str, Any]:
    t_start = time.perf_counter()
    res = run_child("evaluation", asdict(sizes))
    what = {
        "bin": 'bin_predictions(table, "1min")',
        "bootstrap": f"hierarchical_bootstrap(1-min bins, n_boot={sizes.n_boot})",
        "bootstrap_study": f"same, protocol=EvalProtocol.lee2026(), n_boot={sizes.n_boot}",
        "evaluate": f"evaluate_predictions(table, n_boot={sizes.n_boot}, plots=False), 4 bin sizes",
    }
    names = {
        "bin": "bin 1min",
        "bootstrap": "bootstrap 1min",
        "bootstrap_study": "bootstrap 1min (lee2026)",
        "evaluate": "evaluate_predictions",
    }
    measurements = [
        measurement(names[k], what[k], res[k]["times"], peak_mem_mb=res[k]["peak_mem_mb"])
        for k in ("bin", "bootstrap", "bootstrap_study", "evaluate")
    ]
    own = "benchmarks (training-size analysis: 2,600 bootstraps per participant)"
    targets = []
    if sizes.n_boot == 10_000:
        targets = [
            target(
                "bootstrap 10k draws",
                "hierarchical_bootstrap of 1-min bins, best s",
                min(res["bootstrap"]["times"]),
                BOOT_GOAL_S,
                "max",
                "s",
                own,
            ),
            target(
                "bootstrap 10k draws (lee2026)",
                "hierarchical_bootstrap, the study's protocol, best s",
                min(res["bootstrap_study"]["times"]),
                BOOT_GOAL_S,
                "max",
                "s",
                own,
            ),
            target(
                "evaluate_predictions",
                "4 bin sizes x 10k draws, best s",
                min(res["evaluate"]["times"]),
                EVAL_GOAL_S,
                "max",
                "s",
                own,
            ),
        ]
    log(
        f"  bootstrap {min(res['bootstrap']['times']):.2f} s, "
        f"lee2026 {min(res['bootstrap_study']['times']):.2f} s, "
        f"evaluate {min(res['evaluate']['times']):.2f} s"
    )
    return {
        "what": "binning, hierarchical bootstrap and full evaluation of a study-sized table",
        "sizes": {**asdict(sizes), "rows": res["n_rows"], "bins_1min": res["n_bins_1min"]},
        "method": f"one child process; 1 warm call each, then best and median of {sizes.repeats}",
        "measurements": measurements,
        "targets": targets,
        "checks": {"r_1min": res["r_1min"], "bootstrap_r_ci": res["bootstrap_r_ci"]},
        "wall_s": time.perf_counter() - t_start,
    }
