"""Job identity from the resolved config.

A job folder is ``<variant id>/<split name>`` where the *variant id* is the model's ``name``
(``model.name``; ``_ft-<mode>`` appended for a fine-tuned arm, ``_ens-<K>`` for an ensemble)
plus a short hash of the model variant as configured (the ``model`` node before interpolation,
``finetune`` and ``ensemble``). Two variants of one model class (``ridge`` and a user's
``ridge_flatten``, or ``model.net.embed_dim=32,64``) therefore never share a folder or an
aggregation key.

The *job hash* covers the whole resolved job config except the keys in ``IGNORED_KEYS``, which
do not change results (where files go, logging, progress bars, device placement, worker counts,
the experiment's planning block). It is stored in the job's completion marker; a finished job
is reused only when the hash matches (see :mod:`painnet.experiments.jobdir`). For a simulated
dataset the dataset is identified by its simulation parameters (``data.simulate``), so its
file locations (``data.root``, atlas paths) are ignored too; a real dataset's root is not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

HASH_LENGTH = 6
IGNORED_KEYS = (
    "paths",
    "logger",
    "hydra",
    "study",
    "job",
    "task_name",
    "tags",
    "torch_threads",
    "on_config_change",
    "eval.plots",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.strategy",
    "trainer.num_nodes",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "callbacks.progress_bar",
    "callbacks.model_checkpoint.dirpath",
    "data.cache_dir",
    "data.num_workers",
    "data.n_jobs",
    "data.progress",
    "data.pin_memory",
    "data.eval_batch_size",
)
# Ignored only for simulated datasets (identified by data.simulate instead).
SIMULATED_PATH_KEYS = ("data.root", "data.atlas.path", "data.atlas.labels_tsv")


def _plain(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        if "paths" in cfg:
            cfg.paths.output_dir = None  # ignored, and ${hydra:...} outside a Hydra app
        return OmegaConf.to_container(cfg, resolve=True)
    return json.loads(json.dumps(cfg, default=str))


def _drop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return
    node.pop(leaf, None)


def identity_config(cfg) -> dict:
    """The resolved job config without the keys that do not change results."""
    tree = _plain(cfg)
    for key in IGNORED_KEYS:
        _drop(tree, key)
    if (tree.get("data") or {}).get("simulate"):
        for key in SIMULATED_PATH_KEYS:
            _drop(tree, key)
    return tree


def digest(tree, length: int = 16) -> str:
    text = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def config_hash(cfg) -> str:
    """Hash of :func:`identity_config` (what a completion marker records)."""
    return digest(identity_config(cfg))


def variant_name(cfg) -> str:
    """The model's name in tables: ``model.name`` (+ ``_ft-<mode>``, + ``_ens-<K>``)."""
    name = cfg.model.get("name")
    if not name:
        raise ValueError(
            f"model.name is missing in the model config ({cfg.model.get('_target_')}): every "
            "model config names itself (e.g. `name: convattn`)"
        )
    name = str(name)
    if cfg.get("finetune"):
        name += f"_ft-{cfg.finetune.get('mode', 'all')}"
    members = int((cfg.get("ensemble") or {}).get("members", 1) or 1)
    if members > 1:
        name += f"_ens-{members}"
    return name


def variant_config(cfg) -> dict:
    """What distinguishes a model variant: the model as configured (interpolations kept, so
    ``${seed}`` or ``${trainer.max_epochs}`` are no part of it), fine-tuning, ensemble."""
    finetune = cfg.get("finetune")
    if finetune:
        finetune = OmegaConf.to_container(finetune, resolve=False)
        finetune.pop("from", None)  # planned by the study (a dependency), injected at run time
    ensemble = cfg.get("ensemble")
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=False),
        "finetune": finetune or None,
        "ensemble": OmegaConf.to_container(ensemble) if ensemble else None,
    }


def variant_id(cfg) -> str:
    """``<variant name>-<hash>``: the folder and aggregation key of a model variant."""
    return f"{variant_name(cfg)}-{digest(variant_config(cfg), HASH_LENGTH)}"


def job_variant_id(cfg) -> str:
    """The variant id of a job's config *as planned*: ``job.variant`` when a study planned it,
    else :func:`variant_id`.

    A study may inject values into a job's model before it runs (``DataSize`` with
    ``inherit``: each fold's chosen ``fixed_components``); the resolved config then hashes to
    a different id per fold, but the job is still a repeat of the model as configured. Folders,
    completion markers and aggregation all key on the planned id.
    """
    planned = (cfg.get("job") or {}).get("variant")
    return str(planned) if planned else variant_id(cfg)


def flatten(tree, prefix: str = "") -> dict:
    out = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        if not tree and prefix:
            out[prefix[:-1]] = {}
    else:
        out[prefix[:-1]] = tree
    return out


def config_diff(old: Mapping, new: Mapping) -> list[str]:
    """``key: old -> new`` lines for every dotted key that differs."""
    a, b = flatten(old), flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return lines
