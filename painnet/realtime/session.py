"""One real-time session: watch (or replay into) a folder, estimate every volume, write outputs.

Robustness: a volume that is missing, late, unreadable (after retrying for ``late_s``) or
whose confounds are absent gives a logged gap and a NaN estimate, and the stream continues;
the first volume on another voxel grid than the training data stops the session with an error
naming both grids; Ctrl-C stops it with every processed volume's row in the TSV.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from painnet.realtime.model import TrainedDecoder, load_trained
from painnet.realtime.outputs import LiveState, TsvWriter, UdpSender
from painnet.realtime.replay import Replay
from painnet.realtime.stream import CORRUPT, MISSING, Estimate, StreamDecoder
from painnet.realtime.volumes import ConfoundReader, GridError, VolumeError, VolumeReducer
from painnet.realtime.watch import Arrival, WatchFolder

log = logging.getLogger(__name__)


@dataclass
class SessionOptions:
    watch: Path | None = None  # folder to watch (replay: where volumes are written)
    replay: Path | None = None  # a stored 4-D run to feed into the folder
    replay_confounds: Path | None = None
    speed: float = 1.0  # replay pace: 1 = scanner speed (one volume per TR), 0 = no wait
    compress: bool = False  # replay writes .nii.gz instead of .nii
    tr: float | None = None
    reference: Path | None = None
    out: Path | None = None
    port: int | None = 8765  # None: no live page
    udp: str | None = None
    first_number: int = 1
    late_s: float | None = None  # default: one TR
    idle_s: float = 30.0
    poll_s: float = 0.002
    max_volumes: int | None = None
    linger: bool = False  # keep serving the page after the stream ends (until Ctrl-C)
    allow_standard: bool = False
    skip: frozenset[int] = field(default_factory=frozenset)  # replay: volumes not written


@dataclass
class SessionResult:
    tsv: Path
    n_volumes: int
    n_estimates: int
    n_gaps: int
    url: str | None
    interrupted: bool


def run_session(
    run_dir: str | Path,
    options: SessionOptions,
    stop: threading.Event | None = None,
    decoder: TrainedDecoder | None = None,
    on_ready: Callable[[str | None], None] | None = None,
) -> SessionResult:
    """Run until the stream ends, ``stop`` is set, or Ctrl-C.

    ``on_ready`` is called with the live page's URL (None without one) before the first volume.
    """
    stop = stop or threading.Event()
    decoder = decoder or load_trained(
        run_dir, options.tr, options.reference, allow_standard=options.allow_standard
    )
    late_s = decoder.tr if options.late_s is None else float(options.late_s)
    out = options.out or (
        Path(run_dir) / "realtime" / f"estimates-{datetime.now():%Y%m%d-%H%M%S}.tsv"
    )
    tmp_dir = None
    folder = options.watch
    replay = None
    if options.replay is not None:
        if folder is None:
            tmp_dir = tempfile.TemporaryDirectory(prefix="painnet-replay-")
            folder = Path(tmp_dir.name)
        folder.mkdir(parents=True, exist_ok=True)
        if any(folder.iterdir()):
            raise ValueError(f"{folder}: the replay folder must be empty (it holds old volumes?)")
        replay = Replay(
            options.replay,
            folder,
            decoder.tr,
            options.speed,
            options.replay_confounds,
            options.compress,
            stop,
            options.skip,
            options.max_volumes,
        )
    if folder is None:
        raise ValueError("give a folder to watch (--watch) or a run to replay (--replay)")
    watcher = WatchFolder(
        folder,
        options.first_number,
        late_s=late_s,
        idle_s=options.idle_s,
        poll_s=options.poll_s,
        max_volumes=options.max_volumes,
        stop=stop,
        finished=replay.done.is_set if replay else None,
    )
    reducer = VolumeReducer(decoder.atlas, decoder.grid)
    confounds = ConfoundReader(decoder.clean)
    stream = StreamDecoder(decoder, confounds.n_confounds)
    udp = UdpSender(options.udp) if options.udp else None  # checks HOST:PORT first
    tsv = TsvWriter(out)
    log.info("writing %s", tsv.path)
    state = LiveState(f"painnet real-time · {Path(run_dir).name}", decoder.tr)
    server = _start_server(state, options.port)
    counts = {"volumes": 0, "estimates": 0, "gaps": 0}
    read_any = False  # the first volume read is checked strictly (grid, confounds)
    interrupted = False
    if on_ready is not None:
        on_ready(server.url if server else None)
    if replay:
        replay.start()
    try:
        for arrival in watcher:
            est, latency, name = _process(
                arrival, stream, reducer, confounds, late_s, first=not read_any
            )
            read_any = read_any or est.status not in (MISSING, CORRUPT)
            tsv.write(est, latency, name)
            state.add(est)
            if udp:
                udp.send(est)
            counts["volumes"] += 1
            counts["estimates"] += not math.isnan(est.estimate)
            counts["gaps"] += est.status in (MISSING, CORRUPT)
        if replay and replay.error is not None:
            raise RuntimeError(f"replay of {options.replay} failed: {replay.error}")
        state.finished = True
        log.info(
            "stream ended: %d volumes, %d estimates, %d gaps; %s",
            counts["volumes"],
            counts["estimates"],
            counts["gaps"],
            tsv.path,
        )
        if options.linger and server is not None:
            log.info("still serving %s (Ctrl-C to quit)", server.url)
            while not stop.wait(0.5):
                pass
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: %d volumes written to %s", counts["volumes"], tsv.path)
    finally:
        stop.set()
        tsv.close()
        if udp:
            udp.close()
        if replay:
            replay.join(timeout=5)
        if server is not None:
            server.close()
        if tmp_dir is not None:
            tmp_dir.cleanup()
    return SessionResult(
        tsv.path,
        counts["volumes"],
        counts["estimates"],
        counts["gaps"],
        server.url if server else None,
        interrupted,
    )


def _start_server(state: LiveState, port: int | None):
    if port is None:
        return None
    from painnet.realtime.web import LiveServer

    server = LiveServer(state, port).start()
    log.info("live plot: %s", server.url)
    return server


def _process(
    arrival: Arrival,
    stream: StreamDecoder,
    reducer: VolumeReducer,
    confounds: ConfoundReader,
    late_s: float,
    first: bool,
) -> tuple[Estimate, float | None, str]:
    """Estimate of one arrival: (estimate, latency in ms from the file's mtime, file name).

    ``first``: no volume has been read yet; a wrong grid or absent confounds is then an error.
    """
    if arrival.path is None:
        log.warning("volume %d: missing (a later volume arrived first); NaN", arrival.volume)
        return stream.push(None, gap=MISSING), None, ""
    path = arrival.path
    deadline = time.time() + late_s
    while True:
        try:
            parcels, n_bad = reducer.read(path)
            row = confounds.read(path)
            if row is None:
                raise VolumeError(f"{path.name}: no confounds sidecar")
            break
        except GridError:
            if first:
                raise
            log.warning("volume %d: %s is on another grid; NaN", arrival.volume, path.name)
            return stream.push(None, gap=CORRUPT), None, path.name
        except VolumeError as err:
            if time.time() >= deadline:  # a writer may still be filling the file: retry a while
                if first and "sidecar" in str(err):
                    raise VolumeError(
                        f"{err}: the model was trained with confounds "
                        f"{confounds.columns or confounds.n_confounds} and/or FD censoring; "
                        "write <volume>_confounds.json per volume, or train with "
                        "data.clean.motion=0 data.clean.wm_csf=false data.clean.fd_threshold=null"
                    ) from err
                log.warning("volume %d: %s; NaN", arrival.volume, err)
                return stream.push(None, gap=CORRUPT), None, path.name
            time.sleep(0.005)
    values, fd = row
    if n_bad:
        log.warning(
            "volume %d: %d non-finite voxel values in parcels; censored", arrival.volume, n_bad
        )
    est = stream.push(parcels, values, fd, censor=n_bad > 0)
    try:
        latency = (time.time() - path.stat().st_mtime) * 1000.0
    except OSError:
        latency = None
    return est, latency, path.name
