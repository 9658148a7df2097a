"""Real-time decoding: a trained painnet decoder estimates pain from each volume as it lands.

    painnet-realtime RUN_DIR --watch DIR                  # volumes written by the scanner
    painnet-realtime RUN_DIR --replay BOLD.nii.gz --tr 0.46 [--fast]   # a stored run

Per volume: parcel means (:mod:`.volumes`) → causal cleaning and window (:mod:`.stream`, the
same :class:`painnet.data.causal.CausalCleaner` that ``data.clean.causal=true`` training uses)
→ the model of the run folder (:mod:`.model`) → a TSV row, the live page and optionally a UDP
message (:mod:`.outputs`, :mod:`.web`). :mod:`.session` ties them together.
"""

from painnet.realtime.model import TrainedDecoder, load_trained
from painnet.realtime.session import SessionOptions, SessionResult, run_session
from painnet.realtime.stream import Estimate, StreamDecoder

__all__ = [
    "Estimate",
    "SessionOptions",
    "SessionResult",
    "StreamDecoder",
    "TrainedDecoder",
    "load_trained",
    "run_session",
]
