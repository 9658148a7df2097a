"""Predict and score the held-out sessions of a trained model.

    python evaluate.py run_dir=outputs/train/2026-11-25/10-00-00
    python evaluate.py ckpt_path=outputs/train/.../checkpoints/best.ckpt eval.n_boot=2000
    python evaluate.py run_dir=... '+overrides={data: {root: /data/new_sessions}}'

Writes predictions.csv, metrics.json, metrics.csv and the plots into its own Hydra run folder.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from painnet.experiments.reevaluate import run_evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    metrics = run_evaluate(cfg, HydraConfig.get().runtime.output_dir)
    return float(metrics.get("r_1min") or float("nan"))


if __name__ == "__main__":
    main()
