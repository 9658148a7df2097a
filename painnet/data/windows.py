"""Causal windows over cleaned runs, served as whole batches.

A window ending at frame ``f`` holds the last ``L`` frames ``f−L+1 … f`` of all parcels, and its
target is ``run.target[f]`` (already the rating of frame ``f − lag``). Windows never reach into the
dropped start of a run; censored frames inside a window hold 0.0 (the z-scored mean).

All runs are concatenated into one (ΣT, P) tensor, so a batch is gathered with one indexing
operation (``__getitems__``), with no per-sample Python work.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from painnet.data.types import RunData


def window_frames(window_s: float, tr: float) -> int:
    """Number of frames in a window of ``window_s`` seconds (at least 1)."""
    return max(1, int(round(window_s / tr)))


def window_ends(
    run: RunData, length: int, targets_only: bool = True, stride: int = 1
) -> np.ndarray:
    """End frames of the windows of one run.

    targets_only: only frames with a valid target (training/validation/testing); otherwise every
    frame with a full window (prediction of the whole run).
    """
    first = run.first_kept + length - 1
    ends = np.arange(first, run.n_frames)
    if targets_only:
        ends = ends[run.valid_target[ends]]
    return ends[::stride] if stride > 1 else ends


class WindowDataset(Dataset):
    """Windows of several runs. Items and batches are dicts (see ``__getitems__``)."""

    def __init__(
        self,
        runs: Sequence[RunData],
        length: int,
        run_indices: Sequence[int] | None = None,
        targets_only: bool = True,
        stride: int = 1,
    ):
        if not runs:
            raise ValueError("WindowDataset needs at least one run")
        n_parcels = {r.n_parcels for r in runs}
        if len(n_parcels) != 1:
            raise ValueError(f"runs have different parcel counts: {sorted(n_parcels)}")
        self.length = int(length)
        self.run_indices = np.asarray(
            run_indices if run_indices is not None else range(len(runs)), dtype=np.int64
        )
        offsets = np.concatenate([[0], np.cumsum([r.n_frames for r in runs])])
        self.series = torch.from_numpy(np.concatenate([r.series for r in runs]).astype(np.float32))
        self.target = torch.from_numpy(np.concatenate([r.target for r in runs]).astype(np.float32))

        ends, owners = [], []
        for i, run in enumerate(runs):
            e = window_ends(run, self.length, targets_only, stride)
            ends.append(e)
            owners.append(np.full(e.size, i))
        self.local_end = torch.from_numpy(np.concatenate(ends).astype(np.int64))
        owner = np.concatenate(owners).astype(np.int64)
        self.global_end = self.local_end + torch.from_numpy(offsets[owner])
        self.owner_run = torch.from_numpy(self.run_indices[owner])
        self._steps = torch.arange(-self.length + 1, 1)

    @property
    def n_parcels(self) -> int:
        return int(self.series.shape[1])

    def __len__(self) -> int:
        return int(self.global_end.numel())

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        ends = self.global_end[idx]
        frames = ends[:, None] + self._steps  # (B, L)
        x = self.series[frames].transpose(1, 2).contiguous()  # (B, P, L)
        return {
            "x": x,
            "y": self.target[ends],
            "run_index": self.owner_run[idx],
            "frame": self.local_end[idx],
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index])
        return {k: v[0] for k, v in batch.items()}


def collate_batch(batch):
    """Collate for ``WindowDataset``: batches arrive already assembled by ``__getitems__``."""
    if isinstance(batch, dict):
        return batch
    return {k: torch.stack([item[k] for item in batch]) for k in batch[0]}
