"""``painnet-evaluate`` / ``python -m painnet.evaluate``: predict and score a trained model's
held-out sessions again (``evaluate.py`` at the repository root is the same entry point).

    painnet-evaluate run_dir=outputs/train/2026-11-25/10-00-00
"""

from __future__ import annotations

import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from painnet.experiments.reevaluate import run_evaluate

# The user-local search path (./conf) is optional: no warning when a folder has none.
warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main, path=conf")


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    metrics = run_evaluate(cfg, HydraConfig.get().runtime.output_dir)
    return float(metrics.get("r_1min") or float("nan"))


if __name__ == "__main__":
    main()
