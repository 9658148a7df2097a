"""``painnet-train`` / ``python -m painnet.train``: train a decoder, or run an experiment.

    painnet-train                                    # ConvAttn on the simulated demo dataset
    painnet-train data=demo model=edge_pcr           # the reference study's model, same split
    painnet-train data=bids data.root=/data/ds006815 split.subject=01 split.fold=3
    painnet-train experiment=within_subject 'study.models=[ridge,convattn]'

The configs ship inside the package (``painnet/conf``), so this works from any folder after a
plain ``pip install``. Per-user settings go in ``./conf/local/default.yaml`` of the folder you
run from (searched first; see ``painnet/conf/hydra/default.yaml``). ``train.py`` at the
repository root is the same entry point.
"""

from __future__ import annotations

import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from painnet.config_checks import check_config
from painnet.distributed import release_process_group
from painnet.experiments.runner import configure_threads, run_from_hydra
from painnet.experiments.single import run_single

# The user-local search path (./conf) is optional: no warning when a folder has none.
warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main, path=conf")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the value sweepers (e.g. Optuna) optimise: one named metric, ``test/r_1min`` of
    the run (experiments: ``study.objective`` of ``study.objective_model``), never a mean over
    models."""
    check_config(cfg)
    configure_threads(cfg)
    if cfg.get("study"):
        value = run_from_hydra(cfg)
    else:
        metrics = run_single(cfg, HydraConfig.get().runtime.output_dir)
        r_1min = metrics.get("r_1min")
        value = float("nan") if r_1min is None else float(r_1min)
    release_process_group()  # a DDP run must not exit with its group alive (gloo aborts)
    return value


if __name__ == "__main__":
    main()
