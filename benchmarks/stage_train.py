"""Stage 3: training throughput of the ConvAttn decoder, and the wall time of a deep LOSO run.

The model is built from the repository's default config (``conf/model/convattn.yaml``: net
arguments, AdamW learning rate and weight decay; ``gradient_clip_val`` from
``conf/trainer/cpu.yaml``) for P = 400 parcels, L = 22 frames, batch 128.

``train step`` (all in one child process): one optimisation step of
``PainDecoderTask`` (no LR scheduler) = forward, the task's loss, backward, gradient clipping, ``optimizer.step``
on one fixed batch already on the device (so the data loader is not in it; stage 2 measures
that). Warm-up steps first, then each step timed (CUDA synchronised); samples/s = batch / step
time. Peak memory: added resident memory on CPU; ``torch.cuda.max_memory_allocated`` on GPU,
where the step runs under bf16 autocast (``conf/trainer/gpu.yaml``: ``bf16-mixed``) and also in
fp32 for reference. ``eval forward``: a no-grad forward of an evaluation batch (512).

``LOSO`` (leave-one-session-out of one paper-sized participant: 28 folds, each trains on 26
sessions, validates on 1, predicts every frame of the held-out one): on a GPU it is run for
real through ``lightning.Trainer`` for a fixed number of epochs per fold, in the same child
after the step timings; on CPU it is an *estimate* from the measured step and forward rates
(``max_epochs`` of ``conf/trainer/cpu.yaml``), unless forced (``--measure-loso yes``, which
quick mode uses at tiny size so that this code path is exercised without a GPU).

``loaders`` (GPU path, and wherever the LOSO run is measured): a full training step *with* data
loading, over the training windows of one LOSO fold, for three ways to feed the device: the
default loader (``num_workers=0``), pinned memory with worker processes (``pin_memory=True``,
``num_workers=4``, batches copied with ``non_blocking=True``), and a GPU-resident window dataset
(the participant's parcel series and window indices moved to the device once, windows gathered
there). The LOSO run then uses the fastest of them. ``compiled``: the step rate of the bf16 step
with ``torch.compile`` on the net (``model.compile=true``), compile time left out.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.common import REPO_ROOT, PeakMemory, measurement, run_child
from benchmarks.synthetic import RunSizes


@dataclass(frozen=True)
class TrainSizes:
    n_parcels: int = 400
    n_frames: int = 22
    batch_size: int = 128
    eval_batch_size: int = 512
    warmup_steps: int = 2
    steps: int = 5  # timed CPU steps (seconds each on 2 cores)
    gpu_steps: int = 50


@dataclass(frozen=True)
class LosoSizes:
    """A deep leave-one-session-out run (measured on GPU, or when forced)."""

    runs: RunSizes = RunSizes()
    epochs: int = 1
    folds: int | None = None  # None: every session is held out once
    batch_size: int = 128
    eval_batch_size: int = 512


# --------------------------------------------------------------------------- config


def default_config() -> dict[str, Any]:
    """Net kwargs, optimizer kwargs, gradient clipping and epochs from the repo's configs."""
    from omegaconf import OmegaConf

    model = OmegaConf.load(REPO_ROOT / "painnet" / "conf" / "model" / "convattn.yaml")
    cpu = OmegaConf.load(REPO_ROOT / "painnet" / "conf" / "trainer" / "cpu.yaml")
    gpu = OmegaConf.load(REPO_ROOT / "painnet" / "conf" / "trainer" / "gpu.yaml")
    skip = {"_target_", "_partial_"}
    net = {k: v for k, v in OmegaConf.to_container(model.net).items() if k not in skip}
    opt = {k: v for k, v in OmegaConf.to_container(model.optimizer).items() if k not in skip}
    return {
        "net": net,
        "optimizer": opt,
        "loss": str(model.get("loss", "mse")),
        "gradient_clip_val": float(cpu.get("gradient_clip_val") or 0.0),
        "max_epochs": int(cpu.max_epochs),
        "gpu_precision": str(gpu.get("precision", "bf16-mixed")),
    }


def build_task(n_parcels: int, n_frames: int, config: dict[str, Any]):
    """A ``PainDecoderTask`` around a ``ConvAttnDecoder`` with the default config (no scheduler)."""
    import torch

    from painnet.models.convattn import ConvAttnDecoder
    from painnet.task import PainDecoderTask

    net = ConvAttnDecoder(n_parcels=n_parcels, n_frames=n_frames, **config["net"])
    optimizer = functools.partial(torch.optim.AdamW, **config["optimizer"])
    return PainDecoderTask(net, optimizer=optimizer, loss=config["loss"])


# --------------------------------------------------------------------------- step timing


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, n_warmup: int, n_steps: int, device) -> list[float]:
    for _ in range(n_warmup):
        step()
    _sync(device)
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _measure_device(
    sizes: TrainSizes, config: dict, device, bf16: bool, n_steps: int, compile_net: bool = False
) -> dict:
    """Step and eval-forward times of one task on one device and precision."""
    import contextlib

    import torch

    torch.manual_seed(0)
    task = build_task(sizes.n_parcels, sizes.n_frames, config).to(device)
    if compile_net:
        task.net.compile()
    task.train()
    optimizer = task.configure_optimizers()
    x = torch.randn(sizes.batch_size, sizes.n_parcels, sizes.n_frames, device=device)
    y = torch.rand(sizes.batch_size, device=device)
    x_eval = torch.randn(sizes.eval_batch_size, sizes.n_parcels, sizes.n_frames, device=device)
    clip = config["gradient_clip_val"]

    def autocast():
        if bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = task.loss(task(x).float(), y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(task.parameters(), clip)
        optimizer.step()

    def forward() -> None:
        with torch.no_grad(), autocast():
            task(x_eval)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakMemory() as mem:
        step_times = _time_steps(step, sizes.warmup_steps, n_steps, device)
    gpu_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    task.eval()
    eval_times = _time_steps(forward, 1, max(2, n_steps // 4), device)
    return {
        "step_times": step_times,
        "eval_times": eval_times,
        "cpu_peak_mem_mb": mem.peak_mb,
        "gpu_peak_mem_mb": gpu_peak,
        "n_params": sum(p.numel() for p in task.parameters()),
    }


def child_train(params: dict[str, Any]) -> dict[str, Any]:
    """Child process: step timings on CPU, and on CUDA (bf16 and fp32) when available."""
    import torch

    sizes = TrainSizes(**params["sizes"])
    config = default_config()
    out: dict[str, Any] = {"config": config, "torch_threads": torch.get_num_threads()}
    if params.get("cpu", True):
        out["cpu"] = _measure_device(sizes, config, torch.device("cpu"), False, sizes.steps)
    if torch.cuda.is_available() and params.get("gpu", True):
        device = torch.device("cuda")
        out["gpu_name"] = torch.cuda.get_device_name(device)
        out["gpu_bf16"] = _measure_device(sizes, config, device, True, sizes.gpu_steps)
        out["gpu_fp32"] = _measure_device(sizes, config, device, False, sizes.gpu_steps)
        try:
            out["gpu_bf16_compiled"] = _measure_device(
                sizes, config, device, True, sizes.gpu_steps, compile_net=True
            )
        except Exception as err:  # recorded in the results, never hidden
            out["compile_error"] = f"{type(err).__name__}: {err}"
    loso = params.get("loso")
    if loso is not None and (loso["measure"] == "yes" or torch.cuda.is_available()):
        out["loaders"] = measure_loaders(loso, sizes.n_frames, config)
        loso = {**loso, "loader": max(out["loaders"], key=lambda k: out["loaders"][k]["rate"])}
        out["loso"] = run_loso(loso, sizes.n_frames, config)
    return out


# --------------------------------------------------------------------------- loaders

LOADERS = ("workers0", "pinned_workers4", "gpu_resident")


def _device_dataset(ds, device):
    """The WindowDataset with its tensors on ``device``: windows are gathered there."""
    for name in ("series", "target", "global_end", "local_end", "owner_run", "_steps"):
        setattr(ds, name, getattr(ds, name).to(device))
    return ds


def _loader(ds, kind: str, batch: int, shuffle: bool, device):
    from torch.utils.data import DataLoader

    from painnet.data.windows import collate_batch

    if kind == "gpu_resident":
        return DataLoader(
            _device_dataset(ds, device), batch_size=batch, shuffle=shuffle, collate_fn=collate_batch
        )
    workers = 4 if kind == "pinned_workers4" else 0
    return DataLoader(
        ds,
        batch_size=batch,
        shuffle=shuffle,
        collate_fn=collate_batch,
        num_workers=workers,
        pin_memory=kind == "pinned_workers4" and device.type == "cuda",
        persistent_workers=workers > 0,
    )


def measure_loaders(params: dict[str, Any], length: int, config: dict[str, Any]) -> dict:
    """Training samples/s with data loading, per way of feeding the device (see module doc)."""
    import contextlib

    import torch

    from benchmarks.synthetic import make_runs
    from painnet.data.windows import WindowDataset

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    sizes = RunSizes(**params["runs"])
    runs = make_runs(sizes, seed=0, coupled_parcels=min(30, sizes.n_parcels // 2))
    train = list(range(min(len(runs), max(1, (sizes.n_sessions - 2) * sizes.n_runs))))
    batch = int(params["batch_size"])
    max_batches = 200 if gpu else 4
    out = {}
    for kind in LOADERS:
        torch.manual_seed(0)
        task = build_task(runs[0].n_parcels, length, config).to(device)
        optimizer = task.configure_optimizers()
        ds = WindowDataset([runs[i] for i in train], length, train, True)
        loader = _loader(ds, kind, batch, True, device)
        autocast = (
            torch.autocast(device_type="cuda", dtype=torch.bfloat16)
            if gpu
            else contextlib.nullcontext()
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        n, t0 = 0, None
        for i, b in enumerate(loader):
            if i == 2:  # two warm-up batches (worker start-up, allocator)
                _sync(device)
                n, t0 = 0, time.perf_counter()
            x = b["x"].to(device, non_blocking=True)
            y = b["y"].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = task.loss(task(x).float(), y)
            loss.backward()
            optimizer.step()
            n += len(y)
            if i + 1 >= max_batches:
                break
        _sync(device)
        elapsed = time.perf_counter() - t0 if t0 is not None else float("nan")
        out[kind] = {
            "rate": n / elapsed if t0 is not None and elapsed > 0 else 0.0,
            "samples": n,
            "seconds": elapsed,
            "gpu_peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if gpu else None,
        }
        del loader, ds
    return out


# --------------------------------------------------------------------------- LOSO


def run_loso(params: dict[str, Any], length: int, config: dict[str, Any]) -> dict[str, Any]:
    """A whole deep LOSO run of one synthetic participant through ``lightning.Trainer``.

    Per fold: windows of the fold's runs, a fresh task, ``fit`` (train + validation each
    epoch), ``predict`` of every frame of the held-out session. On CUDA with the GPU trainer's
    precision, otherwise on CPU in fp32.
    """
    import lightning
    import torch

    from benchmarks.synthetic import make_runs, sessions_of
    from painnet.data.splits import loso_split
    from painnet.data.windows import WindowDataset

    sizes = LosoSizes(
        runs=RunSizes(**params["runs"]),
        **{
            k: v
            for k, v in params.items()
            if k in ("epochs", "folds", "batch_size", "eval_batch_size")
        },
    )
    gpu = torch.cuda.is_available()
    runs = make_runs(sizes.runs, seed=0, coupled_parcels=min(30, sizes.runs.n_parcels // 2))
    sessions = sessions_of(runs)
    subject = next(iter(sessions))
    n_folds = len(sessions[subject]) if sizes.folds is None else int(sizes.folds)

    kind = str(params.get("loader", "workers0"))
    device = torch.device("cuda" if gpu else "cpu")

    def loader(role_runs: list[int], batch: int, shuffle: bool, targets_only: bool = True):
        ds = WindowDataset([runs[i] for i in role_runs], length, role_runs, targets_only)
        return _loader(ds, kind, batch, shuffle, device)

    fold_times, n_predicted = [], 0
    t_all = time.perf_counter()
    for fold in range(n_folds):
        t0 = time.perf_counter()
        split = loso_split(sessions, subject, fold, n_val=1, seed=0)
        role = {
            name: [i for i, r in enumerate(runs) if r.key.session_key in getattr(split, name)]
            for name in ("train", "val", "test")
        }
        torch.manual_seed(fold)
        task = build_task(runs[0].n_parcels, length, config)
        trainer = lightning.Trainer(
            accelerator="gpu" if gpu else "cpu",
            devices=1,
            precision=config["gpu_precision"] if gpu else "32-true",
            max_epochs=sizes.epochs,
            gradient_clip_val=config["gradient_clip_val"] or None,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        # A DataModule, as in painnet: callbacks (binned validation r) read its ``runs``.
        data = lightning.LightningDataModule.from_datasets()
        data.runs = runs
        data.train_dataloader = lambda r=role: loader(r["train"], sizes.batch_size, True)
        data.val_dataloader = lambda r=role: loader(r["val"], sizes.eval_batch_size, False)
        data.predict_dataloader = lambda r=role: loader(
            r["test"], sizes.eval_batch_size, False, False
        )
        trainer.fit(task, datamodule=data)
        batches = trainer.predict(task, datamodule=data)
        n_predicted += sum(int(b["prediction"].numel()) for b in batches)
        fold_times.append(time.perf_counter() - t0)
    return {
        "total_s": time.perf_counter() - t_all,
        "fold_times": fold_times,
        "n_folds": n_folds,
        "n_folds_possible": len(sessions[subject]),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "precision": config["gpu_precision"] if gpu else "32-true",
        "frames_predicted": n_predicted,
        "loader": kind,
    }


# --------------------------------------------------------------------------- stage


def loso_windows(runs: RunSizes, length: int) -> dict[str, int]:
    """Windows per LOSO fold (no censoring): training, validation and predicted frames."""
    per_run = runs.n_frames - runs.drop_frames - (length - 1)
    return {
        "train": (runs.n_sessions - 2) * runs.n_runs * per_run,
        "val": runs.n_runs * per_run,
        "predict": runs.n_runs * per_run,
    }


def run_stage(
    sizes: TrainSizes, loso: LosoSizes, measure_loso: str = "auto", log=print
) -> dict[str, Any]:
    """Step rates (CPU, and GPU if any), then the LOSO wall time (measured or estimated).

    ``measure_loso``: ``"auto"`` measures the LOSO run only where CUDA is available, ``"yes"``
    always (on CPU too, for small sizes), ``"no"`` never (estimate only).
    """
    t_start = time.perf_counter()
    measure = measure_loso in ("yes", "auto")
    loso_params = {**asdict(loso), "measure": measure_loso} if measure else None
    res = run_child("train", {"sizes": asdict(sizes), "loso": loso_params}, timeout_s=3600)
    measurements, rates = [], {}
    labels = (
        ("cpu", "CPU fp32"),
        ("gpu_bf16", "GPU bf16"),
        ("gpu_fp32", "GPU fp32"),
        ("gpu_bf16_compiled", "GPU bf16 compiled"),
    )
    for key, label in labels:
        if key not in res:
            continue
        r = res[key]
        peak = r["gpu_peak_mem_mb"] if key.startswith("gpu") else r["cpu_peak_mem_mb"]
        step = measurement(
            f"train step {label}",
            "PainDecoderTask step: forward + loss + backward + clip + AdamW",
            r["step_times"],
            peak_mem_mb=peak,
            items=sizes.batch_size,
            rate_unit="samples/s",
            peak_mem_kind="torch.cuda.max_memory_allocated" if key != "cpu" else "added RSS",
            device=res.get("gpu_name", "cpu") if key != "cpu" else "cpu",
            n_params=r["n_params"],
        )
        fwd = measurement(
            f"eval forward {label}",
            f"no-grad forward of a batch of {sizes.eval_batch_size}",
            r["eval_times"],
            items=sizes.eval_batch_size,
            rate_unit="samples/s",
        )
        measurements += [step, fwd]
        rates[key] = {"train": step["rate_median"], "eval": fwd["rate_median"]}
        log(f"  {label}: {step['rate']:.0f} samples/s (best), {step['rate_median']:.0f} (median)")

    for kind, r in (res.get("loaders") or {}).items():
        record = measurement(
            f"train with loader {kind} ({res.get('gpu_name', 'cpu')})",
            "samples/s of full training steps fed by the loader (batches after 2 warm-up)",
            [r["seconds"]],
            items=r["samples"],
            rate_unit="samples/s",
            peak_mem_mb=r["gpu_peak_mem_mb"],
            peak_mem_kind="torch.cuda.max_memory_allocated",
        )
        measurements.append(record)
        log(f"  loader {kind}: {r['rate']:.0f} samples/s")
    if res.get("compile_error"):
        log(f"  torch.compile failed: {res['compile_error']}")

    config = res["config"]
    windows = loso_windows(loso.runs, sizes.n_frames)
    n_folds = loso.runs.n_sessions if loso.folds is None else loso.folds
    estimate = (
        _loso_estimate(rates["cpu"], windows, n_folds, config["max_epochs"])
        if ("cpu" in rates)
        else None
    )
    if "loso" in res:
        loso_res = res["loso"]
        loso_record = measurement(
            f"LOSO deep ({loso_res['device']})",
            f"{loso_res['n_folds']} folds x {loso.epochs} epoch(s) through lightning.Trainer: "
            "fit (train + val) then predict the held-out session",
            [loso_res["total_s"]],
            fold_median_s=statistics.median(loso_res["fold_times"]),
            n_folds=loso_res["n_folds"],
            epochs=loso.epochs,
            precision=loso_res["precision"],
        )
        measurements.append(loso_record)
        log(
            f"  LOSO ({loso_res['n_folds']} folds x {loso.epochs} epochs): "
            f"{loso_res['total_s']:.1f} s"
        )

    return {
        "what": "ConvAttn training step throughput; wall time of one participant's deep LOSO",
        "sizes": {
            **asdict(sizes),
            "loso": {**loso.runs.as_dict(), "folds": n_folds, "windows_per_fold": windows},
            "torch_threads": res["torch_threads"],
            "config": config,
        },
        "method": (
            f"{sizes.warmup_steps} warm-up steps, then {sizes.steps} (CPU) / {sizes.gpu_steps} "
            "(GPU) steps each timed; one fixed batch on the device"
        ),
        "gpu_name": res.get("gpu_name"),
        "compile_error": res.get("compile_error"),
        "loader_choice": (res.get("loso") or {}).get("loader"),
        "measurements": measurements,
        "targets": [],
        "loso_estimate_cpu": estimate,
        "rates": rates,
        "wall_s": time.perf_counter() - t_start,
    }


def _loso_estimate(rate: dict, windows: dict, n_folds: int, epochs: int) -> dict[str, Any]:
    """CPU LOSO wall time from median rates: per fold ``epochs`` × (train + val) + predict."""
    epoch_s = windows["train"] / rate["train"] + windows["val"] / rate["eval"]
    fold_s = epochs * epoch_s + windows["predict"] / rate["eval"]
    return {
        "estimate": True,
        "epochs": epochs,
        "folds": n_folds,
        "epoch_s": epoch_s,
        "fold_s": fold_s,
        "total_s": n_folds * fold_s,
        "total_h": n_folds * fold_s / 3600,
        "basis": "median step and eval-forward rates; data loading and Lightning overhead left out",
    }
