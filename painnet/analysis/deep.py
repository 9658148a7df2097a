"""Region importance of deep decoders: hierarchical input permutation and integrated gradients.

A deep decoder is any ``torch.nn.Module`` mapping causal windows ``[B, P, L]`` (P regions, L
frames) to predictions ``[B]``. Two measures, both on the evaluation's 1-min bins:

* **Input permutation** (the study's hierarchical scheme, applied to the inputs, not to a
  linear term): for region j and one hierarchical shuffle of the bins (sessions → runs → bins,
  :func:`painnet.analysis.permutation.hierarchical_permutations`), every frame of a bin gets
  region j's window from the frame at the same relative position of the bin it is mapped to;
  the model predicts again, frames are averaged into bins and the pooled r is recomputed.
  Importance = mean(r_original − r_permuted). No refitting. Cost: ``P × n_perm`` forward passes
  over all held-out frames, so the default number of shuffles is small.
* **Integrated gradients** (captum, zero baseline = the z-scored mean): each frame's attribution
  is summed over the window's frames into one value per region. By completeness the region
  values add up to ``f(x) − f(0)``, so they decompose the prediction like the edge model's
  ``x·w`` terms, and the study's term test (permute a region's term across bins) applies to
  them unchanged (:func:`painnet.analysis.permutation.term_permutation_drops`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from painnet.analysis.permutation import pearson_r, snap_ties
from painnet.data.types import RunData

log = logging.getLogger(__name__)


def run_windows(run: RunData, frames: np.ndarray, length: int) -> torch.Tensor:
    """Causal windows ``[N, P, L]`` (float32) ending at ``frames`` of one run."""
    frames = np.asarray(frames, dtype=np.int64)
    if frames.size and (frames.min() < length - 1 or frames.max() >= run.n_frames):
        raise ValueError(
            f"run {run.key.bids_prefix()}: frames {frames.min()}..{frames.max()} have no full "
            f"{length}-frame window in a run of {run.n_frames} frames"
        )
    steps = np.arange(-length + 1, 1)
    series = torch.from_numpy(np.asarray(run.series, dtype=np.float32))
    idx = torch.from_numpy(frames[:, None] + steps)  # (N, L)
    return series[idx].transpose(1, 2).contiguous()


@torch.no_grad()
def predict_windows(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Model predictions ``(N,)`` float64 for windows ``[N, P, L]`` (in batches)."""
    out = [model(x[i : i + batch_size]).reshape(-1) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)


def source_frames(frame_bin: np.ndarray, n_bins: int, src_bins: np.ndarray) -> np.ndarray:
    """Frame each frame takes its input from when bin ``b`` receives bin ``src_bins[b]``.

    frame_bin: (N,) bin of each frame (frames of a bin contiguous, in order). The k-th of the
    n_b frames of bin b takes frame ``floor(k · n_s / n_b)`` of source bin s (same relative
    position; bins of unequal length are stretched).
    """
    counts = np.bincount(frame_bin, minlength=n_bins)
    first = np.r_[0, np.cumsum(counts)[:-1]]
    position = np.arange(frame_bin.size) - first[frame_bin]
    source_bin = src_bins[frame_bin]
    offset = (position * counts[source_bin]) // counts[frame_bin]
    return first[source_bin] + offset


def input_permutation_drops(
    predict: Callable[[torch.Tensor], np.ndarray],
    windows: torch.Tensor,
    frame_bin: np.ndarray,
    rating_bins: np.ndarray,
    src: np.ndarray,
) -> tuple[float, np.ndarray]:
    """Drops ``r_original − r_permuted`` ``(P, n_perm)`` of bin-level pooled r.

    predict: windows ``[N, P, L]`` → predictions (N,) (each frame by its own fold's model);
    windows: those of the usable frames in bin order; frame_bin: (N,) their bins; rating_bins:
    (n_bins,) the bins' mean ratings; src: (n_perm, n_bins) bin permutations.
    """
    n_bins = rating_bins.size
    counts = np.bincount(frame_bin, minlength=n_bins).astype(np.float64)

    def binned_r(pred: np.ndarray) -> float:
        return pearson_r(np.bincount(frame_bin, pred, n_bins) / counts, rating_bins)

    r_original = binned_r(predict(windows))
    n_regions = windows.shape[1]
    drops = np.empty((n_regions, src.shape[0]))
    for k, perm in enumerate(src):
        frames = torch.from_numpy(source_frames(frame_bin, n_bins, perm)).to(windows.device)
        for j in range(n_regions):
            x = windows.clone()
            x[:, j, :] = windows[frames, j, :]
            drops[j, k] = r_original - binned_r(predict(x))
    return r_original, snap_ties(drops)


def integrated_gradients(
    model: torch.nn.Module,
    windows: torch.Tensor,
    n_steps: int = 32,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-region integrated gradients ``(N, P)`` of windows ``[N, P, L]``, zero baseline.

    Returns ``(attributions summed over the window's frames, convergence delta (N,))``; the
    delta is ``Σ attributions − (f(x) − f(0))`` (captum), a check of the path integral.
    """
    from captum.attr import IntegratedGradients

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x).reshape(-1)

    ig = IntegratedGradients(forward)
    parts, deltas = [], []
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size].clone().requires_grad_(True)
        attr, delta = ig.attribute(
            x,
            baselines=torch.zeros_like(x),
            n_steps=n_steps,
            internal_batch_size=batch_size,
            return_convergence_delta=True,
        )
        parts.append(attr.detach().sum(-1).double().cpu().numpy())
        deltas.append(delta.detach().double().cpu().numpy())
    return np.concatenate(parts), np.concatenate(deltas)
