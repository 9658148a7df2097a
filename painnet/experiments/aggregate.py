"""Experiment-level tables and plots from the job folders of a finished loop or sweep.

    python -m painnet.experiments.aggregate multirun/within_subject/2026-11-25/10-00-00
    python -m painnet.experiments.aggregate outputs/data_size/... --n-boot 10000 --wandb

A job folder is any folder below the given one holding the completion marker ``DONE.json``
(with predictions.csv, split.json and job.yaml) -- what ``run_single`` writes, in a loop or a
Hydra multirun alike. Jobs are keyed by model variant id (name + config hash) and split, so two
variants of one model are two rows, never one silently chosen; a model name shared by several
variants is shown with its hash (``convattn-3fa2c1``). Pretraining jobs are left out. Held-out predictions are concatenated and evaluated once per
group, as the reference study does:

- leave-one-session-out jobs (``within_subject``, ``finetune``): one row per participant ×
  model over all folds (``within_subject.csv``), and paired model differences on identical
  frames (``comparison.csv``, ``comparison.png``);
- ``cross_subject``: one row per training participant × tested participant × model;
- ``data_size``: one row per participant × model × mode × n × repeat, the folds of a repeat
  pooled (``data_size_repeats.csv``), then the learning curve, the smallest significant n and
  the slope (see :mod:`painnet.experiments.learning_curve`).

Everything is written under ``<dir>/aggregate/`` (CSV + JSON always; PNGs with ``plots``) and,
when a W&B logger is configured, logged to one W&B run of job type ``aggregate``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from painnet.evaluation.report import evaluate_by
from painnet.evaluation.table import LABEL_DTYPES, json_value
from painnet.experiments.compare import compare_models, plot_comparison
from painnet.experiments.jobdir import DONE, RESOLVED_CONFIG
from painnet.experiments.learning_curve import (
    learning_curve,
    plot_learning_curves,
    size_summary,
)

log = logging.getLogger(__name__)

AGGREGATE_DIR = "aggregate"
REQUIRED_FILES = (DONE, "predictions.csv", "split.json", RESOLVED_CONFIG)


@dataclass(frozen=True)
class RunRecord:
    """One finished job folder: what was trained on what, and its flat held-out metrics."""

    directory: Path
    config: dict
    split: dict
    metrics: dict
    model: str  # variant name (model.name + arm/ensemble suffix)
    model_id: str = ""  # variant id: name + hash
    kind: str = "unknown"  # split kind: loso, cross_subject, data_size
    role: str = "result"  # "pretrain" jobs are not aggregated
    label: str = ""  # what tables show: the name, or the id when a name has several variants

    def predictions(self) -> pd.DataFrame:
        table = pd.read_csv(self.directory / "predictions.csv", dtype=LABEL_DTYPES)
        table["model"] = self.label or self.model
        return table


# --------------------------------------------------------------------------- collecting


def read_run(directory: Path) -> RunRecord:
    """The record of a job folder; FileNotFoundError names what is missing."""
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: not a finished job folder, missing {missing}")
    config = OmegaConf.to_container(OmegaConf.load(directory / RESOLVED_CONFIG), resolve=False)
    done = json.loads((directory / DONE).read_text())
    return RunRecord(
        directory=directory,
        config=config,
        split=json.loads((directory / "split.json").read_text()),
        metrics=done.get("metrics") or {},
        model=str(done["model"]),
        # the variant as planned: a study's injected values (DataSize inherit) do not split it
        model_id=str(
            (config.get("job") or {}).get("variant") or done.get("model_id") or done["model"]
        ),
        kind=str(done.get("split_kind", "unknown")),
        role=str(done.get("role", "result")),
    )


def collect_runs(root: str | Path) -> list[RunRecord]:
    """Every finished job folder below ``root`` (unfinished ones are reported and skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such experiment folder")
    runs, unfinished = [], []
    for predictions in sorted(root.rglob("predictions.csv")):
        directory = predictions.parent
        if AGGREGATE_DIR in directory.relative_to(root).parts or ".staging" in directory.parts:
            continue
        if not (directory / DONE).is_file():
            unfinished.append(directory)
            continue
        run = read_run(directory)
        if run.role != "pretrain":
            runs.append(run)
    if unfinished:
        log.warning("%d unfinished job(s) left out: %s", len(unfinished), unfinished[:5])
    return _labelled(_drop_duplicates(runs))


def _labelled(runs: list[RunRecord]) -> list[RunRecord]:
    """Each run's table label: its name, or its variant id when the name has several."""
    ids_per_name = Counter(name for name, _ in {(r.model, r.model_id) for r in runs})
    for run in runs:
        label = run.model if ids_per_name[run.model] == 1 else run.model_id
        object.__setattr__(run, "label", label)
    return runs


def _drop_duplicates(runs: list[RunRecord]) -> list[RunRecord]:
    """Keep one run per (model variant, split): a job run twice (e.g. copied into two sweep
    folders) counts once."""
    latest: dict[tuple, RunRecord] = {}
    for run in runs:
        key = (run.model_id, run.split.get("name"))
        old = latest.get(key)
        mtime = (run.directory / DONE).stat().st_mtime
        if old is None or mtime > (old.directory / DONE).stat().st_mtime:
            if old is not None:
                log.warning("%s ran twice; using %s", key, run.directory)
            latest[key] = run
    return sorted(latest.values(), key=lambda r: str(r.directory))


def runs_frame(runs: list[RunRecord]) -> pd.DataFrame:
    """One row per job: folder, split descriptors, model and its own (single-fold) metrics."""
    rows = []
    for run in runs:
        split = run.config.get("split", {})
        rows.append(
            {
                "directory": str(run.directory),
                "kind": run.kind,
                "split": run.split.get("name"),
                "model": run.label or run.model,
                "model_id": run.model_id,
                "subject": _subject_of(run),
                "fold": split.get("fold"),
                "n_train": split.get("n_train"),
                "repeat": split.get("repeat"),
                "mode": split.get("mode"),
                "n_train_sessions": len(run.split.get("train", [])),
                "n_test_sessions": len(run.split.get("test", [])),
                **{k: run.metrics.get(k) for k in ("r_1min", "auc_1min", "r_session")},
            }
        )
    return pd.DataFrame(rows)


def _subject_of(run: RunRecord) -> str:
    """The participant a job belongs to: the LOSO subject, or the cross-subject training one."""
    split = run.config.get("split", {})
    if run.kind == "cross_subject":
        return "+".join(str(s) for s in split.get("train_subjects") or [])
    if split.get("subject") is not None:
        return str(split["subject"])
    return str(run.split["test"][0][0])


def pooled_predictions(runs: list[RunRecord], **columns) -> pd.DataFrame:
    """Concatenated prediction tables; ``columns`` name extra per-run columns (callables)."""
    parts = []
    for run in runs:
        table = run.predictions()
        for name, value_of in columns.items():
            table[name] = value_of(run)
        parts.append(table)
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------- tables


def within_subject_table(runs: list[RunRecord], out_dir: Path | None, **eval_kw) -> pd.DataFrame:
    """LOSO folds pooled per participant × model: one evaluation of all held-out sessions."""
    table = pooled_predictions(runs)
    result = evaluate_by(table, by=("subject", "model"), out_dir=out_dir, **eval_kw)
    folds = table.groupby(["subject", "model"])["split"].nunique().rename("n_folds")
    result = result.merge(folds.reset_index(), on=["subject", "model"])
    return _front(result, ["subject", "model", "n_folds"])


def cross_subject_table(runs: list[RunRecord], out_dir: Path | None, **eval_kw) -> pd.DataFrame:
    """Each training participant's model on every session of each other participant."""
    table = pooled_predictions(runs, train_subject=_subject_of)
    result = evaluate_by(
        table, by=("train_subject", "subject", "model"), out_dir=out_dir, **eval_kw
    )
    return result.rename(columns={"subject": "test_subject"})


def data_size_repeats(runs: list[RunRecord], **eval_kw) -> pd.DataFrame:
    """One evaluation per participant × model × mode × n × repeat, its outer folds pooled.

    A repeat is significant when its pooled r has bootstrap p < 0.05 and r > 0 (the study's
    criterion); pooling the folds of a repeat gives each repeat one p-value over all sessions.
    """

    def split_value(key):
        return lambda run: run.config["split"][key]

    table = pooled_predictions(
        runs,
        mode=split_value("mode"),
        n_train=split_value("n_train"),
        repeat=split_value("repeat"),
    )
    by = ("subject", "model", "mode", "n_train", "repeat")
    result = evaluate_by(table, by=by, out_dir=None, **{**eval_kw, "plots": False})
    folds = table.groupby(list(by))["split"].nunique().rename("n_folds").reset_index()
    return _front(result.merge(folds, on=list(by)), [*by, "n_folds"])


def _front(frame: pd.DataFrame, first: list[str]) -> pd.DataFrame:
    return frame[first + [c for c in frame.columns if c not in first]]


# --------------------------------------------------------------------------- driver


def aggregate(
    root: str | Path,
    n_boot: int = 10_000,
    seed: int = 0,
    plots: bool = True,
    logger_cfg: Mapping | None = None,
    protocol=None,
) -> dict[str, pd.DataFrame]:
    """Collect the finished jobs under ``root``; write (and return) the experiment tables.

    Returns the tables by name (those that apply): ``runs``, ``within_subject``,
    ``comparison``, ``cross_subject``, ``data_size_repeats``, ``data_size_curve``,
    ``data_size_summary``. Files go to ``root/aggregate/<name>.csv`` (+ ``.json``).
    """
    root = Path(root)
    runs = collect_runs(root)
    if not runs:
        raise FileNotFoundError(f"{root}: no finished job folder (metrics.json + predictions.csv)")
    out = root / AGGREGATE_DIR
    out.mkdir(exist_ok=True)
    eval_kw = {"n_boot": int(n_boot), "seed": int(seed), "plots": bool(plots)}
    if protocol is not None:  # eval.protocol: the binning and bootstrap rules (e.g. lee2026)
        eval_kw["protocol"] = protocol
    by_kind: dict[str, list[RunRecord]] = {}
    for run in runs:
        by_kind.setdefault(run.kind, []).append(run)

    tables = {"runs": runs_frame(runs)}
    if "loso" in by_kind:
        tables["within_subject"] = within_subject_table(
            by_kind["loso"], out / "within_subject", **eval_kw
        )
        comparison = compare_models(pooled_predictions(by_kind["loso"]), n_boot=n_boot, seed=seed)
        if not comparison.empty:
            tables["comparison"] = comparison
        if plots:
            plot_comparison(tables["within_subject"], out / "comparison.png")
    if "cross_subject" in by_kind:
        tables["cross_subject"] = cross_subject_table(
            by_kind["cross_subject"], out / "cross_subject", **eval_kw
        )
    if "data_size" in by_kind:
        repeats = data_size_repeats(by_kind["data_size"], **eval_kw)
        tables["data_size_repeats"] = repeats
        tables["data_size_curve"] = learning_curve(repeats)
        tables["data_size_summary"] = size_summary(repeats)
        if plots:
            plot_learning_curves(repeats, tables["data_size_curve"], out)
    for name, table in tables.items():
        write_table(table, out / name)
    _print_tables(tables)
    if logger_cfg and logger_cfg.get("wandb"):
        log_to_wandb(tables, out, logger_cfg["wandb"], experiment=root.name)
    return tables


def write_table(table: pd.DataFrame, stem: Path) -> None:
    """``stem.csv`` and ``stem.json`` (records; NaN as null)."""
    table.to_csv(stem.with_suffix(".csv"), index=False)
    records = [
        {k: json_value(v) for k, v in row.items()} for row in table.to_dict(orient="records")
    ]
    stem.with_suffix(".json").write_text(json.dumps(records, indent=1))


def _print_tables(tables: Mapping[str, pd.DataFrame]) -> None:
    from rich.console import Console

    from painnet.experiments.compare import summary_table

    console = Console(width=160)
    for name in ("within_subject", "cross_subject", "comparison", "data_size_summary"):
        if name in tables:
            console.print(summary_table(tables[name], title=name))


def log_to_wandb(
    tables: Mapping[str, pd.DataFrame], out: Path, wandb_cfg: Mapping, experiment: str
) -> None:
    """One W&B run (job type ``aggregate``) holding every table and plot of the experiment."""
    import wandb

    cfg = dict(wandb_cfg)
    run = wandb.init(
        project=cfg.get("project", "painnet"),
        group=str(cfg.get("group") or experiment).split("_sub-")[0],
        job_type="aggregate",
        tags=list(cfg.get("tags") or []),
        dir=str(out),
        mode="offline" if cfg.get("offline", True) else "online",
        name=f"aggregate-{experiment}",
    )
    try:
        for name, table in tables.items():
            run.log({f"aggregate/{name}": wandb.Table(dataframe=table.astype(object))})
        for png in sorted(out.glob("*.png")):
            run.log({f"aggregate_plots/{png.stem}": wandb.Image(str(png))})
    finally:
        run.finish()


# --------------------------------------------------------------------------- Hydra / CLI


class AggregateCallback(Callback):
    """Hydra callback: aggregate a multirun's sweep folder once every job has ended.

    Configured by the experiment configs as ``hydra.callbacks.aggregate``.
    """

    def __init__(self, n_boot: int = 10_000, seed: int = 0, plots: bool = True, enabled=True):
        self.kw = {"n_boot": int(n_boot), "seed": int(seed), "plots": bool(plots)}
        self.enabled = bool(enabled)

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.enabled:
            return
        try:
            aggregate(config.hydra.sweep.dir, **self.kw, logger_cfg=config.get("logger"))
        except FileNotFoundError as err:  # e.g. every job failed: nothing to aggregate
            log.error("aggregation skipped: %s", err)
            return
        if config.get("study"):
            from painnet.experiments.runner import make_study, run_after_steps

            run_after_steps(make_study(config), Path(config.hydra.sweep.dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m painnet.experiments.aggregate",
        description="Experiment tables and plots from a finished multirun or experiment folder.",
    )
    parser.add_argument("root", help="sweep/experiment folder holding the job folders")
    parser.add_argument("--n-boot", type=int, default=10_000, help="bootstrap draws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--wandb", action="store_true", help="also log to W&B (offline unless --online)"
    )
    parser.add_argument("--online", action="store_true")
    parser.add_argument("--project", default="painnet")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logger_cfg = None
    if args.wandb:
        logger_cfg = {"wandb": {"project": args.project, "offline": not args.online}}
    aggregate(args.root, args.n_boot, args.seed, not args.no_plots, logger_cfg)


if __name__ == "__main__":
    main()
