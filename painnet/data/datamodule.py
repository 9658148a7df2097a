"""LightningDataModule: dataset → cached clean runs → split → window loaders.

``prepare_data`` (once per node) simulates the dataset if the config asks for a simulated one
and it is not on disk yet, then extracts and cleans every run into the cache. ``setup`` only
reads: it discovers the runs, loads them from the cache, pairs targets and builds the split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from painnet.config_checks import check_section, check_window
from painnet.data.atlas import Atlas, load_atlas
from painnet.data.bids import discover_runs
from painnet.data.cache import ArrayCache
from painnet.data.clean import CleanConfig
from painnet.data.preprocess import load_run, prepare_runs, qc_table, write_qc_table
from painnet.data.splits import Split, make_split, sessions_by_subject
from painnet.data.targets import RatingSpec
from painnet.data.types import RunData, RunFiles
from painnet.data.windows import WindowDataset, collate_batch, window_frames

log = logging.getLogger(__name__)


def _plain(value):
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


class PainDataModule(L.LightningDataModule):
    """Windows of one participant's (or several participants') sessions for one split.

    Args mirror ``conf/data/*.yaml``; ``split`` is the ``conf/split/*.yaml`` node.
    """

    def __init__(
        self,
        root: str,
        split: Mapping,
        atlas: Mapping | None = None,
        simulate: Mapping | None = None,
        subjects: Sequence[str] | None = None,
        sessions: Sequence[str] | None = None,
        task: str = "rating",
        space: str = "MNI152NLin2009cAsym",
        bold_kind: str = "nifti",
        derivatives: str = "derivatives/fmriprep",
        confounds_dir: str | None = None,
        strict: bool = True,
        clean: Mapping | None = None,
        lag_s: float = 6.0,
        rating_column: str = "pain",
        max_rating_gap_s: float = 1.0,
        rating_range: Sequence[float] = (0.0, 1.0),
        rating_rescale: Sequence[float] | None = None,
        rating_alignment: str = "interval_mean",
        window_s: float = 10.0,
        train_stride: int = 1,
        cache_dir: str = ".painnet_cache",
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        n_jobs: int = 1,
        pin_memory: bool = False,
        progress: bool = True,
    ):
        super().__init__()
        check_section("data", locals())  # every numeric value range-checked, errors name the key
        self.root = Path(root)
        self.split_config = _plain(split)
        self.atlas_spec = _plain(atlas)
        self.simulate_spec = _plain(simulate)
        self.discovery = {
            "subjects": _plain(subjects),
            "sessions": _plain(sessions),
            "task": task,
            "space": space,
            "bold_kind": bold_kind,
            "derivatives": derivatives,
            "confounds_dir": confounds_dir,
            "strict": strict,
            "require_confounds": bool(_plain(clean) is None or _needs_confounds(_plain(clean))),
        }
        self.clean = CleanConfig(**(_plain(clean) or {}))
        self.lag_s = float(lag_s)
        self.ratings = RatingSpec(
            column=rating_column,
            max_gap_s=float(max_rating_gap_s),
            valid_range=tuple(_plain(rating_range)),
            rescale=None if rating_rescale is None else tuple(_plain(rating_rescale)),
            alignment=rating_alignment,
        )
        self.discovery["ratings"] = self.ratings  # ratings are checked before any extraction
        self.window_s = float(window_s)
        self.train_stride = int(train_stride)
        self.cache = ArrayCache(cache_dir)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.n_jobs = int(n_jobs)
        self.pin_memory = bool(pin_memory)
        self.progress = bool(progress)

        self.run_files: list[RunFiles] = []
        self.runs: list[RunData] = []
        self.split: Split | None = None
        self._atlas: Atlas | None = None
        self._datasets: dict[str, WindowDataset] = {}

    # -- stages -----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.simulate_spec:
            from painnet.data.simulate import simulate_dataset

            spec = dict(self.simulate_spec)
            simulate_dataset(self.root, spec.pop("preset"), int(spec.pop("seed", 0)), **spec)
        files = self._discover()
        prepare_runs(files, self.atlas, self.clean, self.cache, self.n_jobs, self.progress)

    def setup(self, stage: str | None = None) -> None:
        if self.runs:
            return
        all_files = self._discover()
        sessions = sessions_by_subject([f.key.session_key for f in all_files])
        self.split = make_split(self.split_config, sessions)
        used = set(self.split.train + self.split.val + self.split.test)
        self.run_files = [f for f in all_files if f.key.session_key in used]
        self.runs = [
            load_run(f, self.atlas, self.clean, self.cache, self.lag_s, self.ratings)
            for f in self.run_files
        ]
        n_parcels = {r.n_parcels for r in self.runs}
        if len(n_parcels) != 1:
            raise ValueError(f"{self.root}: runs have different parcel counts {sorted(n_parcels)}")
        trs = {round(r.tr, 6) for r in self.runs}
        if len(trs) != 1:
            raise ValueError(
                f"{self.root}: runs have different TRs {sorted(trs)}; window lengths would differ"
            )
        check_window(self.window_s, self.runs)  # names data.window_s and the short run
        self._datasets = {}

    # -- properties -------------------------------------------------------------------------
    @property
    def atlas(self) -> Atlas | None:
        if self._atlas is None and self.atlas_spec:
            self._atlas = load_atlas(self.atlas_spec)
        return self._atlas

    @property
    def tr(self) -> float:
        return self.runs[0].tr

    @property
    def window_frames(self) -> int:
        return window_frames(self.window_s, self.tr)

    @property
    def n_parcels(self) -> int:
        return self.runs[0].n_parcels

    def runs_in(self, role: str) -> list[int]:
        """Indices (into ``self.runs``) of the runs whose session plays ``role``."""
        assert self.split is not None, "call setup() first"
        keys = set(getattr(self.split, role))
        return [i for i, r in enumerate(self.runs) if r.key.session_key in keys]

    # -- quality control --------------------------------------------------------------------
    def qc_table(self):
        """One row per run of the split (``painnet.data.preprocess.QC_COLUMNS``): frames, kept
        frames, and frames / values censored for non-finite voxels inside parcels. Read from
        the cleaned cache entries (nothing is extracted again)."""
        assert self.split is not None, "call setup() first"
        return qc_table(self.run_files, self.atlas, self.clean, self.cache)

    def write_qc_table(self, path: str | Path):
        """Write :meth:`qc_table` as a TSV (atomically) and return it; logs a warning naming
        the runs whose frames were censored for non-finite voxel values."""
        assert self.split is not None, "call setup() first"
        table = write_qc_table(path, self.run_files, self.atlas, self.clean, self.cache)
        hit = table[table["n_frames_non_finite"] > 0]
        if len(hit):
            log.warning(
                "%d of %d run(s) had frames censored for non-finite (NaN/inf) voxel values, "
                "%d frame(s) in all: %s (see %s)",
                len(hit),
                len(table),
                int(hit["n_frames_non_finite"].sum()),
                ", ".join(f"{r.run} ({r.n_frames_non_finite})" for r in hit.itertuples()),
                Path(path).name,
            )
        return table

    # -- loaders ----------------------------------------------------------------------------
    _split_label = "split"  # how errors name the split

    def _targets_only(self, role: str) -> bool:
        """Whether a role's windows end only on frames with a valid target."""
        return role != "predict"

    def dataset(self, role: str) -> WindowDataset:
        """Windows of a role: train/val/test (valid targets) or predict (every frame of test runs)."""
        if role not in self._datasets:
            source = "test" if role == "predict" else role
            idx = self.runs_in(source)
            if not idx:
                raise ValueError(f"{self._split_label} {self.split.name}: no {source} runs")
            self._datasets[role] = WindowDataset(
                [self.runs[i] for i in idx],
                self.window_frames,
                run_indices=idx,
                targets_only=self._targets_only(role),
                stride=self.train_stride if role == "train" else 1,
            )
        return self._datasets[role]

    def _loader(self, role: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(role),
            batch_size=self.batch_size if role == "train" else self.eval_batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)

    # -- helpers ----------------------------------------------------------------------------
    def _discover(self) -> list[RunFiles]:
        return discover_runs(self.root, **self.discovery)


def _needs_confounds(clean: Mapping) -> bool:
    """Whether the cleaning reads the fMRIPrep confounds table: any regressor taken from it
    (motion, WM/CSF means, aCompCor of either kind, global signal), FD censoring, or FD
    computed from its motion columns (``fd_source: motion``)."""
    cfg = CleanConfig(**clean)
    return bool(
        cfg.motion
        or cfg.wm_csf
        or cfg.n_acompcor
        or cfg.n_wm_compcor
        or cfg.n_csf_compcor
        or cfg.global_signal
        or cfg.fd_threshold is not None
        or cfg.fd_source == "motion"
    )
