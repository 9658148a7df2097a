"""The trained decoder of a ``train.py`` run folder, as a per-window predictor.

A run folder holds the resolved config (``job.yaml`` or ``.hydra/config.yaml``) and either
``checkpoints/best.ckpt`` (a deep model, a LightningModule) or ``model.pkl`` (a classical model
with ``predict_run``). :func:`load_trained` rebuilds everything real-time decoding needs from it:
the atlas on the training BOLD grid, the cleaning settings, the TR, the window length and the
model, and :meth:`TrainedDecoder.predict_window` applies the model to one causal window with the
same rule the offline prediction table uses (deep models predict every frame with a full
window; classical models give NaN on frames that are not kept).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from omegaconf import DictConfig, OmegaConf

from painnet.data.atlas import Atlas, atlas_for_bold, load_atlas
from painnet.data.clean import CleanConfig
from painnet.data.types import RunData, RunKey
from painnet.data.windows import window_frames

log = logging.getLogger(__name__)

_STREAM_KEY = RunKey(subject="realtime", session="realtime", task="realtime", run="1")


@dataclass(frozen=True)
class ReferenceGrid:
    """The voxel grid volumes must be on: that of the training BOLD runs."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    source: str

    @classmethod
    def from_image(cls, path: str | Path) -> ReferenceGrid:
        path = Path(path)
        try:
            img = nib.load(path)
        except Exception as err:  # nibabel raises many types for unreadable files
            raise ValueError(f"{path}: cannot read the reference grid: {err}") from err
        if len(img.shape) not in (3, 4):
            raise ValueError(f"{path}: reference must be a 3-D or 4-D NIfTI, got {img.shape}")
        return cls(tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine), str(path))

    def matches(self, shape: tuple[int, ...], affine: np.ndarray) -> bool:
        return tuple(shape[:3]) == self.shape and np.allclose(affine, self.affine, atol=1e-3)


@dataclass
class TrainedDecoder:
    """Everything the stream needs from a training run."""

    run_dir: Path
    config: DictConfig
    clean: CleanConfig
    atlas: Atlas  # on the reference grid
    grid: ReferenceGrid
    tr: float
    window_frames: int
    model: Any
    deep: bool

    @property
    def n_parcels(self) -> int:
        return self.atlas.n_parcels

    def predict_window(self, window: np.ndarray, kept: np.ndarray) -> float:
        """Estimate for the last frame of ``window`` (L, P) float32; ``kept`` (L,) bool.

        The caller has checked that the window is full (its first frame is at or after the
        run's first kept frame), as the offline table does.
        """
        members = self.model if isinstance(self.model, list) else [self.model]
        if len(members) > 1:  # an ensemble predicts the mean of its members
            return float(np.mean([self._predict_one(m, window, kept) for m in members]))
        return self._predict_one(members[0], window, kept)

    def _predict_one(self, model: Any, window: np.ndarray, kept: np.ndarray) -> float:
        if self.deep:
            import torch

            x = torch.from_numpy(np.ascontiguousarray(window.T))[None]
            with torch.inference_mode():
                return float(model(x).reshape(-1)[0])
        # A classical model predicts whole runs: give it the window as a run of L frames. Its
        # first frame is marked kept so the model's own "full window" rule (first kept frame +
        # L − 1) agrees with the stream's; the series holds 0.0 there if it was censored.
        flags = kept.copy()
        flags[0] = flags[0] or len(flags) > 1
        run = RunData(
            key=_STREAM_KEY,
            tr=self.tr,
            series=window,
            kept=flags,
            target=np.full(len(flags), np.nan, dtype=np.float32),
            time_s=np.arange(len(flags)) * self.tr,
        )
        return float(model.predict_run(run)[-1])


def training_config(run_dir: Path) -> DictConfig:
    """The run's resolved config: ``job.yaml``, else Hydra's ``.hydra/config.yaml``."""
    config_file = run_dir / "job.yaml"
    if not config_file.is_file():
        config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir}: not a train.py run folder (no saved config)")
    cfg = OmegaConf.load(config_file)
    # The saved config refers to Hydra's runtime output folder: point it at the run folder.
    return OmegaConf.merge(cfg, {"paths": {"output_dir": str(run_dir)}})


def load_trained(
    run_dir: str | Path,
    tr: float | None = None,
    reference: str | Path | None = None,
    allow_standard: bool = False,
) -> TrainedDecoder:
    """Load the model and settings of a ``train.py`` run folder for real-time decoding.

    tr / reference: the TR and a NIfTI on the training grid; by default both come from the
    first run of the training dataset (``data.root`` of the saved config). ``allow_standard``
    accepts a model trained on standard (non-causal) cleaning, whose inputs then differ from
    what it was trained on.
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    cfg = training_config(run_dir)
    data = cfg.data
    clean = CleanConfig(**OmegaConf.to_container(data.clean, resolve=True))
    if not clean.causal:
        message = (
            f"{run_dir}: the model was trained with data.clean.causal=false; real-time decoding"
            " cleans causally, so train it with data.clean.causal=true"
        )
        if not allow_standard:
            raise ValueError(message + " (or pass --allow-standard-cleaning)")
        log.warning("%s; going on as asked", message)
        clean = CleanConfig(**{**clean.as_dict(), "causal": True})
    if data.get("bold_kind", "nifti") != "nifti" or not data.get("atlas"):
        raise ValueError(
            f"{run_dir}: real-time decoding reads NIfTI volumes with a volume atlas; this run"
            f" used data.bold_kind={data.get('bold_kind')!r}"
        )
    ref_path, data_tr = _training_reference(cfg, run_dir, need_tr=tr is None, reference=reference)
    if tr is None:
        tr = data_tr
    elif data_tr is not None and abs(float(tr) - data_tr) > 1e-3:
        raise ValueError(
            f"TR {tr} s differs from the training runs' TR {data_tr} s: the model's "
            f"{data.window_s}-s window and the cleaning depend on it"
        )
    tr = float(tr)
    grid = ReferenceGrid.from_image(ref_path)
    atlas = atlas_for_bold(load_atlas(OmegaConf.to_container(data.atlas, resolve=True)), ref_path)
    length = window_frames(float(data.window_s), tr)
    model, deep = _load_model(cfg, run_dir, atlas.n_parcels, length)
    return TrainedDecoder(run_dir, cfg, clean, atlas, grid, tr, length, model, deep)


def _training_reference(
    cfg: DictConfig, run_dir: Path, need_tr: bool, reference: str | Path | None
) -> tuple[Path, float | None]:
    """(a NIfTI on the training grid, the training TR or None when not needed/known)."""
    if reference is not None and not need_tr:
        return Path(reference), None
    from painnet.data.bids import discover_runs

    data = cfg.data
    root = Path(str(data.root))
    try:
        runs = discover_runs(
            root,
            subjects=_plain(data.get("subjects")),
            sessions=_plain(data.get("sessions")),
            task=data.get("task", "rating"),
            space=data.get("space", "MNI152NLin2009cAsym"),
            bold_kind="nifti",
            derivatives=data.get("derivatives", "derivatives/fmriprep"),
            confounds_dir=data.get("confounds_dir"),
            require_confounds=False,
            strict=False,
            validate=False,
        )
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(
            f"{run_dir}: cannot read the training dataset {root} for the TR and voxel grid "
            f"({err}); pass --tr and --reference <a NIfTI on the training grid>"
        ) from err
    if not runs:
        raise ValueError(f"{root}: no training runs found; pass --tr and --reference")
    return Path(reference) if reference is not None else runs[0].bold, float(runs[0].tr)


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _load_model(cfg: DictConfig, run_dir: Path, n_parcels: int, length: int) -> tuple[Any, bool]:
    """(model or list of ensemble members, deep?) through the decoder protocol's loader."""
    import lightning as L

    from painnet.experiments.decoder import load_decoder

    model = load_decoder(run_dir, cfg=cfg).model
    if isinstance(model, dict):  # a stack: {member: model}
        raise ValueError(
            f"{run_dir}: model={cfg.model.get('name')} is a stack; its weights split every "
            "member's prediction into a run mean and a within-run part, which needs the whole "
            "run, so it cannot decode in real time. Train a single model for real time (e.g. "
            "model=edge_pcr or model=convattn with data.clean.causal=true)"
        )
    members = model if isinstance(model, list) else [model]
    deep = isinstance(members[0], L.LightningModule)
    for member in members:
        if deep:
            member.eval()
            found = (member.hparams.get("n_parcels"), member.hparams.get("n_frames"))
        else:
            found = (getattr(member, "n_parcels_", None), getattr(member, "window_frames_", None))
        wrong = [
            f"{what} {got} (stream: {want})"
            for what, got, want in zip(("parcels", "window frames"), found, (n_parcels, length))
            if got is not None and int(got) != want
        ]
        if wrong:
            raise ValueError(f"{run_dir}: the model was trained on {', '.join(wrong)}")
    return model, deep
