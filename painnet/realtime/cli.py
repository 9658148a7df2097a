"""Command line of real-time decoding.

    python -m painnet.realtime RUN_DIR --watch DIR
    python -m painnet.realtime RUN_DIR --replay BOLD.nii.gz --tr 0.46 [--fast | --speed 2]

RUN_DIR is a ``train.py`` output folder of a model trained with ``data.clean.causal=true``.
Exit status: 0 when the stream ended, 130 after Ctrl-C or SIGTERM (the TSV is complete
either way), 2 for bad input (wrong grid, missing run folder, ...).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from painnet.realtime.session import SessionOptions, run_session

log = logging.getLogger("painnet.realtime")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="painnet-realtime",
        description="Estimate pain from each fMRI volume as it is written, with a trained model.",
    )
    p.add_argument("run_dir", type=Path, help="train.py output folder (causally cleaned model)")
    p.add_argument("--watch", type=Path, help="folder where one NIfTI per volume lands")
    p.add_argument("--replay", type=Path, help="a stored 4-D run to replay into the folder")
    p.add_argument("--confounds", type=Path, help="replay: confounds TSV (default: by BIDS name)")
    p.add_argument("--tr", type=float, help="repetition time in s (default: the training runs')")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, default=1.0, help="replay pace (1 = scanner speed)")
    pace.add_argument("--fast", action="store_true", help="replay as fast as possible")
    p.add_argument("--compress", action="store_true", help="replay writes .nii.gz volumes")
    p.add_argument("--reference", type=Path, help="a NIfTI on the training grid (default: found)")
    p.add_argument("--out", type=Path, help="estimates TSV (default RUN_DIR/realtime/...)")
    p.add_argument("--port", type=int, default=8765, help="live page port on 127.0.0.1 (0: any)")
    p.add_argument("--no-web", action="store_true", help="do not serve the live page")
    p.add_argument("--udp", help="send one JSON datagram per estimate to HOST:PORT")
    p.add_argument("--first-number", type=int, default=1, help="number of the first volume file")
    p.add_argument("--late-s", type=float, help="wait for a late volume (default: one TR)")
    p.add_argument("--idle-s", type=float, default=30.0, help="end after this long with no volume")
    p.add_argument("--volumes", type=int, help="stop after this many volumes")
    p.add_argument("--linger", action="store_true", help="keep serving the page after the end")
    p.add_argument(
        "--allow-standard-cleaning",
        action="store_true",
        help="accept a model trained with data.clean.causal=false (its inputs will differ)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.watch is None and args.replay is None:
        p.error("give --watch DIR or --replay BOLD")
    if args.replay is not None and args.tr is None:
        p.error("--replay needs --tr (the run's repetition time)")
    if args.speed < 0:
        p.error("--speed must be >= 0")
    return args


def options_from(args: argparse.Namespace) -> SessionOptions:
    return SessionOptions(
        watch=args.watch,
        replay=args.replay,
        replay_confounds=args.confounds,
        speed=0.0 if args.fast else args.speed,
        compress=args.compress,
        tr=args.tr,
        reference=args.reference,
        out=args.out,
        port=None if args.no_web else args.port,
        udp=args.udp,
        first_number=args.first_number,
        late_s=args.late_s,
        idle_s=args.idle_s,
        max_volumes=args.volumes,
        linger=args.linger,
        allow_standard=args.allow_standard_cleaning,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    # Ctrl-C works even where the shell started us with SIGINT ignored (a background job), and
    # a plain `kill` (SIGTERM) takes the same way out: the TSV is complete either way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        import torch

        torch.set_num_threads(1)  # one small model, one volume at a time: no thread contention
        result = run_session(args.run_dir, options_from(args))
    except KeyboardInterrupt:  # during loading: nothing was written yet
        return 130
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    except OSError as err:  # e.g. the live page's port is taken
        log.error("%s (for the live page: --port 0 picks a free port, --no-web serves none)", err)
        return 2
    print(f"{result.n_volumes} volumes, {result.n_estimates} estimates, {result.n_gaps} gaps")
    print(result.tsv)
    return 130 if result.interrupted else 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
