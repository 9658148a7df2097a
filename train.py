"""Train one pain decoder on one split and evaluate it on the held-out sessions.

    python train.py                                   # ConvAttn on the simulated demo dataset
    python train.py data=demo model=edge_pcr          # the reference study's model, same split
    python train.py data=bids data.root=/data/ds006815 split.subject=01 split.fold=3
    python train.py --multirun split.fold=range(8)    # every leave-one-session-out fold
    python train.py experiment=within_subject study.models=[ridge,convattn]   # whole experiments

Outputs land in the Hydra run folder: predictions.csv, metrics.json, metrics.csv, plots,
checkpoints/best.ckpt (deep models) or model.pkl (classical models), CSV and W&B logs.
Experiments (``experiment=within_subject|cross_subject|data_size|finetune``) run many splits
and aggregate them; see painnet/experiments/runner.py.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from painnet.experiments.runner import configure_threads, run_from_hydra
from painnet.experiments.single import run_single


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    configure_threads(cfg)
    if cfg.get("study"):
        metrics = run_from_hydra(cfg)
    else:
        metrics = run_single(cfg, HydraConfig.get().runtime.output_dir)
    # The returned value is what sweepers (e.g. Optuna) optimise.
    return float(metrics.get("r_1min") or float("nan"))


if __name__ == "__main__":
    main()
