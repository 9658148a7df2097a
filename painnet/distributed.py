"""Multi-process (DDP) support: one prediction table from all ranks, and a guarded strategy.

**Predictions.** Under DDP every rank predicts its own share of the held-out windows. Lightning
gives ``predict`` a non-padding sampler (``UnrepeatedDistributedSamplerWrapper``), but train and
validation use ``DistributedSampler``, which pads by repeating samples; and
``trainer.predict`` returns only the local rank's outputs. :func:`gather_predictions` collects
every rank's ``predict_step`` rows, drops repeated ``(run_index, frame)`` keys (so a padding
sampler could never count a frame twice), checks the result against the predict dataset (no
frame missing, none extra) and returns the same single-batch list on every rank. Only rank 0
should then write outputs (``trainer.is_global_zero``).

**The Hydra-multirun + DDP pitfall.** Lightning starts ranks 1..N-1 of a DDP run on one node by
running the *command line* again (``_SubprocessScriptLauncher``; it adds ``hydra.run.dir`` so
the children share rank 0's folder). Under ``-m`` that command line is the whole sweep: every
child would launch the sweep again, so a 10-job sweep on 2 devices starts 10 more sweeps whose
jobs wait forever for peers. painnet avoids it in three ways:

- sweeps use one device per job (``trainer=gpu``, ``hydra/launcher=slurm_gpu`` gives each job
  its own GPU) and spread jobs over GPUs with the launcher, never with DDP;
- ``trainer=ddp`` uses :class:`GuardedDDPStrategy`, which refuses to re-launch the command line
  inside a Hydra multirun (a clear error instead of a process storm);
- DDP inside a sweep job is possible only when processes are created outside Lightning: through
  SLURM (``hydra/launcher=slurm_gpu``: ``tasks_per_node == trainer.devices``, so srun starts one
  process per GPU and Lightning's SLURM environment only connects them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

log = logging.getLogger(__name__)

FIELDS = ("run_index", "frame", "prediction", "y")
KEY = ("run_index", "frame")


def merge_batches(batches: Iterable[Mapping]) -> dict[str, np.ndarray]:
    """``predict_step`` outputs (dicts of tensors or arrays) concatenated into one dict."""
    batches = [b for b in (batches or []) if b is not None]
    out = {}
    for name in FIELDS:
        parts = [np.asarray(_numpy(b[name])) for b in batches if name in b]
        if parts and len(parts) != len(batches):
            raise ValueError(f"gather_predictions: some predict batches lack {name!r}")
        if name in KEY:
            out[name] = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        elif parts:
            out[name] = np.concatenate(parts).astype(np.float64)
    if "prediction" not in out:
        out["prediction"] = np.zeros(0, np.float64)
    return out


def _numpy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy() if value.is_floating_point() else value.cpu()
    return value


def deduplicate(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows sorted by (run_index, frame), each key once (the first occurrence kept).

    Repeated keys must carry the same prediction (a padded sample is the same window); a
    mismatch means two ranks disagree about the model and is an error, not something to average.
    """
    run, frame = rows["run_index"], rows["frame"]
    order = np.lexsort((frame, run))
    sorted_rows = {k: np.asarray(v)[order] for k, v in rows.items()}
    keys = np.stack([sorted_rows["run_index"], sorted_rows["frame"]], axis=1)
    first = np.ones(len(keys), dtype=bool)
    first[1:] = np.any(keys[1:] != keys[:-1], axis=1)
    if not first.all():
        group = np.cumsum(first) - 1
        kept = sorted_rows["prediction"][first][group]
        spread = np.abs(sorted_rows["prediction"] - kept)
        if np.nanmax(spread, initial=0.0) > 1e-4:
            raise RuntimeError(
                "gather_predictions: the same (run_index, frame) was predicted differently on "
                f"two ranks (max difference {np.nanmax(spread):.3g}); are the ranks' models "
                "in sync?"
            )
        log.info("gather_predictions: dropped %d repeated window(s)", int((~first).sum()))
    return {k: v[first] for k, v in sorted_rows.items()}


def expected_keys(dataset) -> set[tuple[int, int]]:
    """(run_index, frame) of every window of a ``WindowDataset`` (the predict set)."""
    return set(
        zip(dataset.owner_run.numpy().tolist(), dataset.local_end.numpy().tolist(), strict=True)
    )


def check_complete(rows: Mapping[str, np.ndarray], expected: set[tuple[int, int]]) -> None:
    """RuntimeError unless ``rows`` hold exactly the ``expected`` keys."""
    got = set(zip(rows["run_index"].tolist(), rows["frame"].tolist(), strict=True))
    missing, extra = expected - got, got - expected
    if missing or extra:
        raise RuntimeError(
            f"gather_predictions: {len(missing)} window(s) missing and {len(extra)} unexpected "
            f"in the gathered predictions (e.g. missing {sorted(missing)[:3]}, "
            f"extra {sorted(extra)[:3]}); (run_index, frame) pairs"
        )


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def gather_predictions(batches: Sequence[Mapping] | None, dataset=None) -> list[dict]:
    """Every rank's predict rows as one batch, identical on all ranks.

    ``batches``: this rank's ``trainer.predict`` output. ``dataset``: the predict
    ``WindowDataset``; when given, the gathered rows must cover its windows exactly. Returns
    ``[batch]`` (a list of one dict of arrays), the shape ``table_from_batches`` reads, so the
    call site stays ``table_from_batches(runs, gather_predictions(batches, ds), ...)``.
    Single-process runs go through the same merge, deduplication and check.
    """
    local = merge_batches(batches or [])
    if world_size() > 1:
        parts: list = [None] * world_size()
        torch.distributed.all_gather_object(parts, local)
        keys = set().union(*(p.keys() for p in parts))
        local = {k: np.concatenate([p[k] for p in parts if k in p]) for k in keys}
    rows = deduplicate(local)
    if dataset is not None:
        check_complete(rows, expected_keys(dataset))
    return [rows]


RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


def release_process_group() -> None:
    """Destroy the default process group, if this process joined one.

    Lightning leaves the group alive after ``fit``/``predict``; if the interpreter then exits
    with it, gloo's worker threads can be torn down while joinable and the process aborts
    (``terminate called without an active exception``, exit -6) after all work was written.
    Called once on success only: after an error other ranks may still be inside a collective,
    and destroying the group then could wait on them forever.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_main_process(environ: Mapping[str, str] | None = None) -> bool:
    """False in the processes of ranks 1..N-1, which must not write a job's outputs.

    Read from the environment before any Trainer exists: Lightning's launcher gives its child
    processes ``LOCAL_RANK``/``NODE_RANK``, torchrun ``RANK``, SLURM ``SLURM_PROCID``. A plain
    single process (or rank 0) has none of them, or 0.
    """
    environ = os.environ if environ is None else environ
    return all(int(environ.get(name) or 0) == 0 for name in RANK_VARIABLES)


def rank_label(environ: Mapping[str, str] | None = None) -> str:
    """This process's rank as read from the environment (``"0"`` for the main process), unique
    across nodes: ``RANK``/``SLURM_PROCID`` when set, else ``LOCAL_RANK`` (with ``NODE_RANK``
    as a prefix on nodes other than 0). Names the scratch folder of a non-zero rank."""
    environ = os.environ if environ is None else environ
    for name in ("RANK", "SLURM_PROCID"):
        if environ.get(name):
            return str(int(environ[name]))
    local, node = int(environ.get("LOCAL_RANK") or 0), int(environ.get("NODE_RANK") or 0)
    return f"{node}-{local}" if node else str(local)


def in_hydra_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class GuardedDDPStrategy(DDPStrategy):
    """Lightning's DDP, refusing to re-run the command line inside a Hydra multirun.

    Identical to ``strategy="ddp"`` for single runs and for processes created outside Lightning
    (SLURM/torchrun); see the module docstring for the pitfall it prevents.
    """

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        relaunches = isinstance(self._launcher, _SubprocessScriptLauncher) and not (
            self.cluster_environment.creates_processes_externally
        )
        if relaunches and in_hydra_multirun():
            raise RuntimeError(
                "trainer=ddp inside a Hydra multirun (-m): Lightning would start the other "
                "ranks by re-running the whole sweep command. Run DDP as a single run "
                "(no -m), or let SLURM create the processes (hydra/launcher=slurm_gpu, "
                "tasks_per_node == trainer.devices); sweeps use one device per job."
            )
