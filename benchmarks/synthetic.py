"""Synthetic inputs of the reference study's sizes (no files, no simulator: only arrays).

Paper sizes: one participant = 28 sessions × 3 runs × 1,304 frames (600 s at TR 0.46 s),
400 parcels; the first 65 frames (30 s) of a run are dropped; the prediction table of both
participants = 51 sessions (23 + 28) × 3 runs × 1,239 kept frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from painnet.data.types import RunData, RunKey

TR_S = 0.46


@dataclass(frozen=True)
class RunSizes:
    """Size of one participant's synthetic dataset."""

    n_sessions: int = 28
    n_runs: int = 3
    n_frames: int = 1304
    n_parcels: int = 400
    drop_frames: int = 65  # 30 s at TR 0.46 s

    @property
    def total_runs(self) -> int:
        return self.n_sessions * self.n_runs

    def as_dict(self) -> dict[str, int]:
        return {
            "sessions": self.n_sessions,
            "runs_per_session": self.n_runs,
            "frames_per_run": self.n_frames,
            "parcels": self.n_parcels,
            "dropped_frames_per_run": self.drop_frames,
        }


def smooth_rating(rng: np.random.Generator, n_frames: int, smooth: int = 60) -> np.ndarray:
    """A slowly varying rating in [0, 1], (n_frames,) float64 (a smoothed random walk)."""
    walk = np.cumsum(rng.standard_normal(n_frames + smooth))
    kernel = np.ones(smooth) / smooth
    smooth_walk = np.convolve(walk, kernel, mode="valid")[:n_frames]
    span = np.ptp(smooth_walk)
    return (smooth_walk - smooth_walk.min()) / (span if span > 0 else 1.0)


def _zscore_kept(series: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Z-score columns over kept frames; 0.0 on the others (the RunData convention)."""
    mu = series[kept].mean(0)
    sd = series[kept].std(0)
    out = (series - mu) / np.where(sd > 0, sd, 1.0)
    out[~kept] = 0.0
    return out.astype(np.float32)


def make_runs(
    sizes: RunSizes,
    seed: int = 0,
    coupled_parcels: int = 0,
    coupling_gain: float = 1.0,
    subject: str = "01",
) -> list[RunData]:
    """Cleaned runs of one participant: ``sizes.total_runs`` RunData records.

    series (n_frames, n_parcels) float32 is white noise, z-scored over kept frames; with
    ``coupled_parcels > 0`` the first that many parcels share a common signal whose amplitude
    follows the rating, so the edges between them co-fluctuate with pain (something for the
    edge model to find). target = the rating on kept frames, NaN on the dropped start.
    """
    rng = np.random.default_rng(seed)
    kept = np.arange(sizes.n_frames) >= sizes.drop_frames
    runs = []
    for s in range(sizes.n_sessions):
        for r in range(sizes.n_runs):
            rating = smooth_rating(rng, sizes.n_frames)
            noise = rng.standard_normal((sizes.n_frames, sizes.n_parcels), dtype=np.float32)
            if coupled_parcels:
                shared = rng.standard_normal(sizes.n_frames) * np.sqrt(rating) * coupling_gain
                noise[:, :coupled_parcels] += shared[:, None].astype(np.float32)
            runs.append(
                RunData(
                    key=RunKey(subject, f"{s + 1:02d}", "rating", str(r + 1)),
                    tr=TR_S,
                    series=_zscore_kept(noise, kept),
                    kept=kept.copy(),
                    target=np.where(kept, rating, np.nan).astype(np.float32),
                    time_s=np.arange(sizes.n_frames) * TR_S,
                    parcel_names=[f"p{i:03d}" for i in range(sizes.n_parcels)],
                )
            )
    return runs


def sessions_of(runs: list[RunData]) -> dict[str, list[str]]:
    """``{subject: sorted sessions}`` of a list of runs (the input of the split functions)."""
    out: dict[str, set[str]] = {}
    for run in runs:
        out.setdefault(run.key.subject, set()).add(run.key.session)
    return {k: sorted(v) for k, v in out.items()}


def prediction_table(
    sessions_per_subject: tuple[int, ...] = (23, 28),
    n_runs: int = 3,
    n_frames: int = 1304,
    drop_frames: int = 65,
    seed: int = 0,
):
    """A frame-level prediction table (pandas) like a whole study's held-out predictions.

    One row per kept frame of every run; prediction = 0.5 × rating + noise, so metrics are
    finite and the bootstrap does real work.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    frames = np.arange(drop_frames, n_frames)
    parts = []
    for sub_i, n_sessions in enumerate(sessions_per_subject):
        for s in range(n_sessions):
            for r in range(n_runs):
                rating = smooth_rating(rng, n_frames)[frames]
                parts.append(
                    pd.DataFrame(
                        {
                            "subject": f"{sub_i + 1:02d}",
                            "session": f"{s + 1:02d}",
                            "run": str(r + 1),
                            "frame": frames,
                            "time_s": frames * TR_S,
                            "rating": rating,
                            "prediction": 0.5 * rating + 0.3 * rng.standard_normal(frames.size),
                            "fold": s,
                            "run_duration_s": n_frames * TR_S,
                            "model": "synthetic",
                        }
                    )
                )
    return pd.concat(parts, ignore_index=True)
