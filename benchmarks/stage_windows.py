"""Stage 2: window throughput, cleaned runs -> collated training batches.

Input: one paper-sized participant's cleaned runs (random float32 ``(1304, 400)`` × 84 runs,
the first 65 frames of each dropped). Measured in one child process:

- ``dataset build``: ``WindowDataset(runs, L)`` (concatenates the runs into one tensor);
- ``DataLoader``: one pass (an epoch, or ``n_batches``) of
  ``DataLoader(ds, batch_size, shuffle=True, collate_fn=collate_batch)`` — what the
  DataModule's training loader does with ``num_workers=0``; rate = windows/s;
- ``memory copy``: the same number of batches, each a plain copy of an equally sized
  contiguous block ``(B·L, P)`` of the concatenated series into a preallocated tensor — the
  bandwidth floor for moving those bytes; rate in windows/s (``B`` windows per copy).

``_WARM_BATCHES`` untimed batches first; then best and median of ``repeats`` passes. The
windows/s target (≥ 10 × the training step's samples/s) is checked by the runner once stage 3
has run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.common import PeakMemory, measurement, run_child, time_calls
from benchmarks.synthetic import RunSizes

_WARM_BATCHES = 20  # untimed batches before the timed passes


@dataclass(frozen=True)
class WindowSizes:
    runs: RunSizes = RunSizes()
    length: int = 22  # 10 s at TR 0.46 s (painnet.data.windows.window_frames(10.0, 0.46))
    batch_size: int = 128
    n_batches: int | None = None  # None: a whole epoch
    repeats: int = 3


def child_windows(params: dict[str, Any]) -> dict[str, Any]:
    """Child process: build the dataset, time loader passes and equal-sized block copies."""
    import torch
    from torch.utils.data import DataLoader

    from benchmarks.synthetic import make_runs
    from painnet.data.windows import WindowDataset, collate_batch

    sizes = RunSizes(**params["runs"])
    length, batch = int(params["length"]), int(params["batch_size"])
    runs = make_runs(sizes, seed=0)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        ds = WindowDataset(runs, length)
        build_s = time.perf_counter() - t0
        loader = DataLoader(ds, batch_size=batch, shuffle=True, collate_fn=collate_batch)
        n_batches = min(params["n_batches"] or len(loader), len(loader))

        def loader_pass(limit: int = n_batches) -> None:
            for i, b in enumerate(loader):
                if b["x"].shape[1:] != (sizes.n_parcels, length):
                    raise RuntimeError(f"unexpected batch shape {tuple(b['x'].shape)}")
                if i + 1 == limit:
                    break

        loader_pass(min(n_batches, _WARM_BATCHES))
        loader_times = time_calls(loader_pass, params["repeats"])

    series = ds.series
    rows = batch * length
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, series.shape[0] - rows, (n_batches,), generator=gen).tolist()
    out = torch.empty(rows, series.shape[1], dtype=series.dtype)

    def copy_pass() -> None:
        for s in starts:
            out.copy_(series[s : s + rows])

    copy_pass()  # warm (cheap)
    copy_times = time_calls(copy_pass, params["repeats"])
    return {
        "build_s": build_s,
        "n_windows_total": len(ds),
        "n_batches": n_batches,
        "windows_per_pass": min(n_batches * batch, len(ds)),
        "loader_times": loader_times,
        "copy_times": copy_times,
        "batch_bytes": rows * series.shape[1] * series.element_size(),
        "dataset_bytes": series.numel() * series.element_size(),
        "torch_threads": torch.get_num_threads(),
        **mem.as_dict(),
    }


def run_stage(sizes: WindowSizes, log=print) -> dict[str, Any]:
    t_start = time.perf_counter()
    params = asdict(sizes)
    res = run_child("windows", params)
    windows = res["windows_per_pass"]
    loader = measurement(
        "DataLoader pass",
        "DataLoader(WindowDataset, batch_size, shuffle=True, collate_fn=collate_batch)",
        res["loader_times"],
        peak_mem_mb=res["peak_mem_mb"],
        items=windows,
        rate_unit="windows/s",
        n_batches=res["n_batches"],
    )
    copy = measurement(
        "memory copy",
        "copy of an equally sized contiguous (B*L, P) float32 block per batch",
        res["copy_times"],
        items=res["n_batches"] * sizes.batch_size,
        rate_unit="windows/s",
    )
    build = measurement(
        "dataset build",
        "WindowDataset(runs, L): concatenate runs, index window ends",
        [res["build_s"]],
    )
    log(f"  loader {loader['rate']:.0f} windows/s, copy floor {copy['rate']:.0f} windows/s")
    return {
        "what": "cleaned runs -> collated (B, P, L) batches through the training DataLoader",
        "sizes": {
            **sizes.runs.as_dict(),
            "runs": sizes.runs.total_runs,
            "window_frames": sizes.length,
            "batch_size": sizes.batch_size,
            "windows_in_dataset": res["n_windows_total"],
            "batches_per_pass": res["n_batches"],
            "batch_mb": res["batch_bytes"] / 2**20,
            "dataset_mb": res["dataset_bytes"] / 2**20,
            "torch_threads": res["torch_threads"],
        },
        "method": (
            f"{_WARM_BATCHES} warm batches, then best and median of {sizes.repeats} passes; "
            "num_workers=0"
        ),
        "measurements": [build, loader, copy],
        "targets": [],
        "checks": {"loader_vs_copy": loader["rate"] / copy["rate"]},
        "wall_s": time.perf_counter() - t_start,
    }
