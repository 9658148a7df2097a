"""Shared fixtures: real Hydra configs composed from painnet/conf/, one simulated tiny dataset per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

CONF_DIR = str(Path(__file__).resolve().parents[1] / "painnet" / "conf")

os.environ.setdefault("WANDB_MODE", "disabled")
# Tiny models: one intra-op thread is faster than two and immune to a busy machine's contention.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_SILENT", "true")


# One epoch on data=tiny, no logger, few bootstrap draws: for tests of plumbing, not learning.
FAST_TINY = (
    "data=tiny",
    "logger=none",
    "eval.n_boot=20",
    "eval.plots=false",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Where simulated datasets live for the whole test session (simulated once, reused)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(data_dir, cache_dir, tmp_path):
    """Compose ``conf/<config_name>.yaml`` with overrides, paths pointed at test folders."""

    def _compose(*overrides: str, config_name: str = "train", output_dir: Path | None = None):
        GlobalHydra.instance().clear()
        out = output_dir or tmp_path / "out"
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(
                config_name=config_name,
                overrides=[
                    f"paths.data_dir={data_dir}",
                    f"paths.cache_dir={cache_dir}",
                    f"paths.output_dir={out}",
                    *overrides,
                ],
            )

    return _compose


@pytest.fixture(scope="session")
def tiny_root(data_dir) -> Path:
    """The simulated tiny dataset (the same folder `data=tiny` points at)."""
    from painnet.data.simulate import simulate_dataset

    return simulate_dataset(data_dir / "sim-tiny-seed0", "tiny", 0)
