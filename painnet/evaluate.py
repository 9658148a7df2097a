"""``painnet-evaluate`` / ``python -m painnet.evaluate``: predict and score a trained model's
held-out sessions again (``evaluate.py`` at the repository root is the same entry point).

    painnet-evaluate run_dir=outputs/train/2026-11-25/10-00-00
    painnet-evaluate ckpt_path=<run>/checkpoints/best.ckpt data=demo split=loso split.fold=3
    painnet-evaluate run_dir=<finished job folder of an experiment> trainer=gpu
"""

from __future__ import annotations

import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from painnet.config_checks import check_config
from painnet.distributed import release_process_group
from painnet.experiments.reevaluate import run_evaluate

# The user-local search path (./conf) is optional: no warning when a folder has none.
warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main, path=conf")


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    check_config(cfg)
    metrics = run_evaluate(cfg, HydraConfig.get().runtime.output_dir)
    release_process_group()  # a DDP run must not exit with its group alive (gloo aborts)
    value = metrics.get("r_1min")
    return float("nan") if value is None else float(value)


if __name__ == "__main__":
    main()
