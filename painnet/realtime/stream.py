"""Frame by frame: causal cleaning → causal window → estimate.

:class:`StreamDecoder` is the whole per-volume computation of real-time decoding, free of files
and clocks, so it can be checked against the offline prediction table frame for frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from painnet.data.causal import CausalCleaner
from painnet.realtime.model import TrainedDecoder

# Status of a frame in the estimates table.
OK = "ok"  # an estimate
DROPPED = "dropped"  # before data.clean.drop_initial_s
CENSORED = "censored"  # framewise displacement above the threshold
WARMUP = "warmup"  # kept, but the causal window is not full yet
MISSING = "missing"  # the volume (or its confounds) never arrived in time
CORRUPT = "corrupt"  # the volume could not be read


@dataclass(frozen=True)
class Estimate:
    volume: int  # frame index, 0 = first stored volume (as in the prediction tables)
    time_s: float  # onset of the volume relative to the first one
    estimate: float  # NaN when there is none
    censored: bool  # the frame is not kept (dropped, censored, missing or corrupt)
    status: str


class StreamDecoder:
    """Causal cleaning, a ring buffer of the last L cleaned frames, and the model."""

    def __init__(self, decoder: TrainedDecoder, n_confounds: int):
        self.decoder = decoder
        self.length = decoder.window_frames
        self.cleaner = CausalCleaner(decoder.clean, decoder.tr, decoder.n_parcels, n_confounds)
        self._ring = np.zeros((self.length, decoder.n_parcels), dtype=np.float32)
        self._ring_kept = np.zeros(self.length, dtype=bool)
        self._first_kept: int | None = None

    @property
    def next_volume(self) -> int:
        return self.cleaner.frame

    def push(
        self,
        parcels: np.ndarray | None,
        confounds: np.ndarray | None = None,
        fd: float = 0.0,
        gap: str = MISSING,
        censor: bool = False,
    ) -> Estimate:
        """Process the next volume (``parcels`` None: a gap of kind ``gap``; ``censor``: a
        volume censored for another reason than motion, e.g. non-finite voxels)."""
        t = self.cleaner.frame
        retained = self.cleaner.is_kept(t, float("-inf"))
        cleaned, kept = self.cleaner.step(None if censor else parcels, confounds, fd)
        slot = t % self.length
        self._ring[slot] = cleaned
        self._ring_kept[slot] = kept
        if kept and self._first_kept is None:
            self._first_kept = t
        if parcels is None:
            status = gap
        elif not retained:
            status = DROPPED
        elif not kept:
            status = CENSORED
        else:
            status = OK
        estimate = float("nan")
        full = self._first_kept is not None and t >= self._first_kept + self.length - 1
        if parcels is not None and retained:
            if full:
                order = (np.arange(t + 1, t + 1 + self.length)) % self.length
                estimate = self.decoder.predict_window(self._ring[order], self._ring_kept[order])
            elif kept:
                status = WARMUP
        return Estimate(t, t * self.decoder.tr, estimate, not kept, status)
