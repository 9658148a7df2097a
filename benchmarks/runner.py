"""The benchmark runner: ``python -m benchmarks [--quick] [--stages ...] [--out DIR]``.

Runs the chosen stages one after the other (each measures in child processes), checks the
targets, prints two tables (measurements, targets) and writes ``<out>/latest.json`` plus a
time-stamped copy. Exit status 1 if a stage failed (its error is in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from benchmarks import (
    stage_edge,
    stage_evaluation,
    stage_extract,
    stage_lab,
    stage_realtime,
    stage_train,
    stage_windows,
)
from benchmarks.common import REPO_ROOT, target
from benchmarks.synthetic import RunSizes

STAGES = ("extract", "windows", "train", "edge", "bootstrap", "lab", "realtime")
# a full run measures these unless --stages says otherwise ("lab", a whole participant, takes
# most of an hour on 2 cores: on request); --quick runs every stage
DEFAULT_FULL_STAGES = ("extract", "windows", "train", "edge", "bootstrap", "realtime")
PACKAGES = ("torch", "numpy", "nilearn", "nibabel", "scipy", "scikit-learn", "lightning", "pandas")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
WINDOWS_OVER_TRAINING = 10.0  # brief: loader windows/s >= 10 x training samples/s


@dataclass
class Plan:
    """Sizes of every stage for one mode (full or quick)."""

    extract: stage_extract.ExtractSizes = field(default_factory=stage_extract.ExtractSizes)
    windows: stage_windows.WindowSizes = field(default_factory=stage_windows.WindowSizes)
    train: stage_train.TrainSizes = field(default_factory=stage_train.TrainSizes)
    loso: stage_train.LosoSizes = field(default_factory=stage_train.LosoSizes)
    edge: stage_edge.EdgeSizes = field(default_factory=stage_edge.EdgeSizes)
    evaluation: stage_evaluation.EvalSizes = field(default_factory=stage_evaluation.EvalSizes)
    lab: stage_lab.LabSizes = field(default_factory=stage_lab.LabSizes)
    realtime: stage_realtime.RealtimeSizes = field(default_factory=stage_realtime.RealtimeSizes)


def quick_plan() -> Plan:
    """Tiny sizes: the whole runner in well under a minute (checks that it works, not speed)."""
    small = RunSizes(n_sessions=3, n_runs=2, n_frames=200, n_parcels=24, drop_frames=20)
    return Plan(
        extract=stage_extract.ExtractSizes(
            shape=(16, 16, 12), n_frames=24, n_parcels=12, repeats=2, nilearn_repeats=1
        ),
        windows=stage_windows.WindowSizes(runs=small, batch_size=16, repeats=2),
        train=stage_train.TrainSizes(
            n_parcels=24, batch_size=16, eval_batch_size=32, warmup_steps=1, steps=2, gpu_steps=5
        ),
        loso=stage_train.LosoSizes(
            runs=RunSizes(n_sessions=3, n_runs=1, n_frames=120, n_parcels=24, drop_frames=20),
            epochs=1,
            folds=1,
            batch_size=32,
            eval_batch_size=64,
        ),
        edge=stage_edge.EdgeSizes(
            runs=RunSizes(n_sessions=4, n_runs=2, n_frames=300, n_parcels=20, drop_frames=20),
            coupled_parcels=5,
        ),
        evaluation=stage_evaluation.EvalSizes(
            sessions_per_subject=(3, 3),
            n_runs=2,
            n_frames=400,
            drop_frames=20,
            n_boot=200,
            repeats=2,
        ),
        lab=stage_lab.quick_sizes(),
        realtime=stage_realtime.RealtimeSizes(
            models=("edge_pcr",), n_volumes=10, interval_s=0.05, paper_shape=(24, 24, 16)
        ),
    )


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, load, package versions and GPU (``nvidia-smi``) of this machine."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gb": _ram_gb(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": gpu_name(),
        "thread_env": {var: os.environ.get(var) for var in THREAD_VARS},
        "versions": {},
    }
    for name in PACKAGES:
        try:
            info["versions"][name] = version(name)
        except PackageNotFoundError:
            info["versions"][name] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def gpu_name() -> str | None:
    """The first GPU ``nvidia-smi`` names, or None (no driver, no GPU)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None


# --------------------------------------------------------------------------- running


def run_stages(args: argparse.Namespace, plan: Plan, workdir: Path, log=print) -> dict[str, Any]:
    """Run each chosen stage; a failing stage is recorded as ``{"error": ...}``."""
    results: dict[str, Any] = {}
    for name in args.stages:
        log(f"[stage] {name}")
        try:
            results[name] = _run_one(name, args, plan, workdir, log)
        except Exception as err:  # record and go on: one broken stage must not hide the others
            log(f"  FAILED: {err}")
            results[name] = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(),
            }
    _cross_stage_targets(results)
    return results


def _run_one(name: str, args, plan: Plan, workdir: Path, log) -> dict[str, Any]:
    if name == "extract":
        return stage_extract.run_stage(plan.extract, workdir / "extract", log)
    if name == "windows":
        return stage_windows.run_stage(plan.windows, log)
    if name == "train":
        return stage_train.run_stage(plan.train, plan.loso, args.measure_loso, log)
    if name == "edge":
        return stage_edge.run_stage(plan.edge, log)
    if name == "bootstrap":
        return stage_evaluation.run_stage(plan.evaluation, log)
    if name == "lab":
        return stage_lab.run_stage(plan.lab, workdir / "lab", log)
    if name == "realtime":
        return stage_realtime.run_stage(plan.realtime, log)
    raise ValueError(f"unknown stage {name!r}; expected some of {STAGES}")


def _cross_stage_targets(results: dict[str, Any]) -> None:
    """Windows/s of stage 2 against the training samples/s of stage 3 (GPU if measured)."""
    windows = results.get("windows")
    if not windows or "error" in windows:
        return
    loader = next(m for m in windows["measurements"] if m["name"] == "DataLoader pass")
    train = results.get("train") or {}
    steps = [m for m in train.get("measurements", []) if m["name"].startswith("train step")]
    gpu = [m for m in steps if "GPU bf16" in m["name"]]
    step = (gpu or steps or [None])[0]
    ratio_needed = WINDOWS_OVER_TRAINING
    windows["targets"].append(
        target(
            "windows vs training",
            "loader windows/s / training samples/s"
            + (f" ({step['name'].removeprefix('train step ')}, best)" if step else " (not run)"),
            loader["rate"] / step["rate"] if step else None,
            ratio_needed,
            "min",
            "x",
            "project brief",
        )
    )


# --------------------------------------------------------------------------- output


def print_tables(report: dict[str, Any], console=None) -> None:
    """Rich tables: one row per measurement, one per target."""
    from rich.console import Console
    from rich.table import Table

    # A pipe or file gets 150 columns, so rows are not wrapped at rich's default of 80.
    console = console or (Console() if sys.stdout.isatty() else Console(width=150))
    meas = Table(title="painnet benchmarks: measurements", show_lines=False)
    for col, justify in (
        ("stage", "left"),
        ("measurement", "left"),
        ("best s", "right"),
        ("median s", "right"),
        ("n", "right"),
        ("peak MiB", "right"),
        ("rate (best)", "right"),
    ):
        meas.add_column(col, justify=justify)
    tgt = Table(title="targets")
    for col, justify in (
        ("stage", "left"),
        ("target", "left"),
        ("measured", "right"),
        ("goal", "right"),
        ("ratio", "right"),
        ("result", "left"),
    ):
        tgt.add_column(col, justify=justify)
    for stage, res in report["stages"].items():
        if "error" in res:
            meas.add_row(stage, f"[red]ERROR {res['error'][:80]}[/red]", "", "", "", "", "")
            continue
        for m in res["measurements"]:
            meas.add_row(
                stage,
                m["name"],
                _fmt(m["best_s"]),
                _fmt(m["median_s"]),
                str(m["n_repeats"]),
                _fmt(m.get("peak_mem_mb"), 1),
                _rate(m),
            )
        for t in res["targets"]:
            tgt.add_row(
                stage,
                t["name"],
                _fmt(t["measured"]),
                f"{'<=' if t['kind'] == 'max' else '>='} {_fmt(t['goal'])} {t['unit']}",
                _fmt(t["ratio"]),
                _verdict(t["passed"]),
            )
    console.print(meas)
    console.print(tgt)
    est = (report["stages"].get("train") or {}).get("loso_estimate_cpu")
    if est:
        console.print(
            f"CPU deep LOSO estimate: {est['folds']} folds x {est['epochs']} epochs = "
            f"{est['total_h']:.1f} h ({est['epoch_s']:.0f} s per epoch) -- an estimate "
            "from the measured step rate, not a measurement"
        )


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    value = float(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{max(digits - 1, 1)}f}"


def _rate(m: dict) -> str:
    return f"{m['rate']:,.0f} {m['rate_unit']}" if m.get("rate") else ""


def _verdict(passed: bool | None) -> str:
    return {True: "[green]pass[/green]", False: "[red]miss[/red]"}.get(passed, "n/a")


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, default=str)
    stamp = report["date_utc"].replace(":", "").replace("-", "")[:15]
    (out_dir / f"run-{stamp}.json").write_text(text)
    latest = out_dir / "latest.json"
    latest.write_text(text)
    return latest


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Speed and memory of every painnet stage."
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (<1 min)")
    parser.add_argument(
        "--stages",
        default=None,
        help=f"comma-separated subset of {','.join(STAGES)} (default: all but lab; --quick: all)",
    )
    parser.add_argument(
        "--out",
        default=str(REPO_ROOT / "benchmarks" / "results"),
        help="folder for latest.json (default benchmarks/results, git-ignored)",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="scratch folder for the synthetic NIfTI files (default: a temp dir)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads of torch/BLAS/OpenMP in every child (sets OMP_NUM_THREADS etc.; "
        "default: the libraries' own choice)",
    )
    parser.add_argument(
        "--measure-loso",
        choices=("auto", "yes", "no"),
        default=None,
        help="measure the deep LOSO run: auto = only on a CUDA GPU "
        "(default; quick mode: yes, tiny, on CPU)",
    )
    parser.add_argument(
        "--loso-epochs",
        type=int,
        default=None,
        help="epochs per fold of the measured deep LOSO run (default 1)",
    )
    parser.add_argument(
        "--loso-folds",
        type=int,
        default=None,
        help="folds of the measured deep LOSO run (default: all 28)",
    )
    parser.add_argument(
        "--lab-sessions",
        type=int,
        default=None,
        help="sessions (of 3 runs) of the lab stage's participant (default: 28, the paper's; "
        "fewer measure part of it and extrapolate to 28, marked as an estimate)",
    )
    args = parser.parse_args(argv)
    if args.stages is None:
        args.stages = ",".join(STAGES if args.quick else DEFAULT_FULL_STAGES)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        parser.error(f"--stages: unknown {unknown}; choose from {','.join(STAGES)}")
    args.stages = stages
    if args.measure_loso is None:
        args.measure_loso = "yes" if args.quick else "auto"
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = quick_plan() if args.quick else Plan()
    if getattr(args, "lab_sessions", None) is not None:
        if args.lab_sessions < 1:
            raise SystemExit(f"--lab-sessions must be >= 1, got {args.lab_sessions}")
        plan.lab = dataclasses.replace(plan.lab, n_sessions=args.lab_sessions)
    if args.loso_epochs is not None or args.loso_folds is not None:
        loso = plan.loso
        plan.loso = stage_train.LosoSizes(
            runs=loso.runs,
            epochs=args.loso_epochs if args.loso_epochs is not None else loso.epochs,
            folds=args.loso_folds if args.loso_folds is not None else loso.folds,
            batch_size=loso.batch_size,
            eval_batch_size=loso.eval_batch_size,
        )
    return plan


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    plan = make_plan(args)
    if args.threads is not None:  # children inherit the environment; torch reads OMP_NUM_THREADS
        for var in THREAD_VARS:
            os.environ[var] = str(args.threads)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python -m benchmarks" + (" " + shlex.join(argv) if argv else ""),
        "date_utc": started.isoformat(timespec="seconds"),
        "date_local": datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "machine": machine_info(),
    }
    own_workdir = args.workdir is None
    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="painnet-bench-"))
    )
    try:
        report["stages"] = run_stages(args, plan, workdir)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["load_average_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    )
    report["total_wall_s"] = time.perf_counter() - t0
    path = write_report(report, Path(args.out))
    print_tables(report)
    print(f"total {report['total_wall_s']:.0f} s; wrote {path}")
    failed = [name for name, res in report["stages"].items() if "error" in res]
    if failed:
        print(f"failed stages: {failed}", file=sys.stderr)
    return 1 if failed else 0
