"""Hyperparameter search with Optuna on the inner validation sessions (never the test session).

    painnet-search hparams_search=convattn_optuna data=paper split.subject=01 split.fold=0
    python -m painnet.search hparams_search=convattn_optuna search.n_trials=50   # resumes

Each trial samples the parameters of ``search.params`` into the composed config, trains the
model on the split's training sessions and scores it on the split's **validation** sessions:
the objective is ``search.monitor`` (``val/r_1min``, the pooled r of 1-min bins of the
validation predictions), its best value over epochs -- the epoch checkpointing would keep. The
test session is never loaded into a loader: trials call ``trainer.fit`` only.

- Storage: an SQLite file (``search.storage``, default ``<search.dir>/optuna.db``). Running the
  same command again continues the study up to ``search.n_trials`` finished trials; trials of a
  killed process are marked failed after their heartbeat stops and retried once.
- Pruning: every epoch's value is reported to the trial; ``search.pruner`` (median pruner by
  default) stops trials that fall behind the others at the same epoch.
- Output: ``<search.dir>/trial_<n>/`` (config, checkpoints), ``<search.dir>/best.yaml`` (best
  parameters and value, rewritten atomically after every search).

Why not hydra-optuna-sweeper: its newest release (1.3.0) pins ``optuna<3.0`` (optuna 2.10 does
not support SQLAlchemy 2, which our stack installs), and the sweeper only sees a job's final
return value, so it cannot prune a trial between epochs. Optuna's own API does both.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import hydra
import lightning as L
import optuna
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict

from painnet.atomic import atomic_path

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main, path=conf")

KINDS = ("float", "int", "categorical")
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


class OptunaPruning(Callback):
    """Report ``monitor`` to an Optuna trial after every validation; prune when told to.

    Keeps the best value seen (``best``), which is the trial's objective.
    """

    def __init__(self, trial: optuna.trial.Trial, monitor: str, direction: str = "maximize"):
        self.trial = trial
        self.monitor = monitor
        self.maximize = direction == "maximize"
        self.best: float | None = None
        self.history: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise KeyError(
                f"search.monitor={self.monitor!r} was not logged during validation; "
                f"logged: {sorted(metrics)}"
            )
        value = float(metrics[self.monitor])
        self.history.append(value)
        step = len(self.history) - 1
        if math.isfinite(value):
            better = self.best is None or (
                value > self.best if self.maximize else value < self.best
            )
            if better:
                self.best = value
            self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.monitor}={value:.4f} at epoch {step}")


# --------------------------------------------------------------------------- search space


def suggest(trial: optuna.trial.Trial, name: str, spec: Mapping) -> object:
    """One parameter from its spec: ``{type: float|int, low, high, log?, step?}`` or
    ``{type: categorical, choices: [...]}``."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in KINDS:
        raise ValueError(f"search.params.{name}.type must be one of {KINDS}, got {kind!r}")
    try:
        if kind == "categorical":
            return trial.suggest_categorical(name, list(spec["choices"]))
        low, high = spec.pop("low"), spec.pop("high")
        if kind == "float":
            return trial.suggest_float(name, float(low), float(high), **spec)
        return trial.suggest_int(name, int(low), int(high), **spec)
    except KeyError as err:
        raise ValueError(f"search.params.{name}: missing {err.args[0]!r} for type {kind}") from err
    except TypeError as err:
        raise ValueError(f"search.params.{name}: {err}") from err


def apply_params(cfg: DictConfig, params: Mapping[str, object]) -> DictConfig:
    """A copy of ``cfg`` with each dotted key set; unknown keys are an error."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key, value in params.items():
        if OmegaConf.select(out, key, default="<absent>") == "<absent>":
            raise KeyError(f"search.params: {key!r} is not a key of the composed config")
        OmegaConf.update(out, key, value, merge=False)
    return out


def check_search_config(cfg: DictConfig) -> None:
    """Clear errors for a search that cannot run (before any training)."""
    search = cfg.get("search")
    if not search:
        raise ValueError("no `search` config: use hparams_search=<model>_optuna")
    if not search.get("params"):
        raise ValueError("search.params is empty: nothing to search")
    if search.direction not in ("maximize", "minimize"):
        raise ValueError(f"search.direction must be maximize or minimize, got {search.direction}")
    if int(search.n_trials) < 1:
        raise ValueError(f"search.n_trials must be >= 1, got {search.n_trials}")
    if not str(search.monitor).startswith("val/"):
        raise ValueError(
            f"search.monitor={search.monitor!r}: the objective must be a validation metric "
            "(val/...), never a test-session one"
        )
    if not issubclass(get_class(cfg.model._target_), L.LightningModule):
        raise ValueError(
            f"painnet-search trains Lightning models; model._target_={cfg.model._target_} is "
            "not one (classical models choose their hyperparameter by inner CV already)"
        )
    for key in search.params:
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            raise KeyError(f"search.params: {key!r} is not a key of the composed config")


# --------------------------------------------------------------------------- one trial


def train_trial(cfg: DictConfig, trial: optuna.trial.Trial, trial_dir: Path) -> float:
    """Fit on the split's training sessions; the best ``search.monitor`` on its validation."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(trial_dir)
    OmegaConf.save(cfg, trial_dir / "trial.yaml", resolve=True)
    L.seed_everything(int(cfg.seed), workers=True)
    dm = instantiate(cfg.data, split=cfg.split, _recursive_=False)
    dm.prepare_data()
    dm.setup("fit")
    model = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    with open_dict(model):
        model.pop("name", None)  # painnet's own label of the model config, not an argument
    task = instantiate(model, n_parcels=dm.n_parcels, n_frames=dm.window_frames)
    pruning = OptunaPruning(trial, str(cfg.search.monitor), str(cfg.search.direction))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    trainer = instantiate(
        cfg.trainer,
        callbacks=[*callbacks, pruning],
        logger=False,
        default_root_dir=str(trial_dir),
    )
    trainer.fit(task, datamodule=dm)
    if pruning.best is None:
        raise RuntimeError(
            f"trial {trial.number}: {cfg.search.monitor} was never finite "
            f"(values {pruning.history})"
        )
    trial.set_user_attr("history", pruning.history)
    return pruning.best


# --------------------------------------------------------------------------- the study


def storage_of(search: DictConfig) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats, so trials of a killed process become FAIL and are retried."""
    url = str(search.storage)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(
        url,
        heartbeat_interval=int(search.get("heartbeat_s", 60)),
        grace_period=int(search.get("heartbeat_s", 60)) * 3,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=1
        ),
    )


def run_search(cfg: DictConfig) -> optuna.Study:
    """Create or load the study and run trials until ``search.n_trials`` have finished."""
    check_search_config(cfg)
    search = cfg.search
    directory = Path(str(search.dir))
    directory.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=str(search.study_name),
        storage=storage_of(search),
        direction=str(search.direction),
        sampler=instantiate(search.sampler) if search.get("sampler") else None,
        pruner=instantiate(search.pruner) if search.get("pruner") else None,
        load_if_exists=True,
    )
    done = sum(t.state in COUNTED for t in study.trials)
    remaining = int(search.n_trials) - done
    log.info("study %s: %d trial(s) finished, %d to run", study.study_name, done, remaining)

    def objective(trial: optuna.trial.Trial) -> float:
        params = {name: suggest(trial, name, spec) for name, spec in search.params.items()}
        trial_cfg = apply_params(cfg, params)
        return train_trial(trial_cfg, trial, directory / f"trial_{trial.number:04d}")

    if remaining > 0:
        timeout = search.get("timeout_s")
        study.optimize(objective, n_trials=remaining, timeout=timeout, gc_after_trial=True)
    write_best(study, directory / "best.yaml")
    return study


def write_best(study: optuna.Study, path: Path) -> None:
    """best.yaml: the best trial's number, value and parameters (atomic replace)."""
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not finished:
        log.warning("study %s: no completed trial yet", study.study_name)
        return
    best = study.best_trial
    content = {
        "study": study.study_name,
        "trial": best.number,
        "value": float(best.value),
        "params": dict(best.params),
        "n_complete": len(finished),
        "n_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
    }
    with atomic_path(path) as tmp:
        OmegaConf.save(OmegaConf.create(content), tmp)
    log.info("best trial %d: %s = %.4f, %s", best.number, "value", best.value, best.params)


@hydra.main(version_base="1.3", config_path="conf", config_name="search")
def main(cfg: DictConfig) -> float:
    threads = cfg.get("torch_threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    study = run_search(cfg)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return float(study.best_value) if complete else float("nan")


if __name__ == "__main__":
    main()
