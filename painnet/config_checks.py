"""Validation at the boundary: every numeric (and enumerated) config value range-checked.

One declarative table, :data:`RULES`, maps a config key (``fnmatch`` patterns allowed, e.g.
``model.alphas.*`` for list items) to its constraint. :func:`check_config` runs it on a composed
config before anything else happens (``painnet.train`` / ``painnet.evaluate`` call it first), and
the DataModule runs the ``data.*`` part on its own arguments (:func:`check_section`), so configs
composed in tests or notebooks are checked too. An error names every offending key with the
value as typed, e.g. ``data.window_s=-5: must be > 0 (window length, s)``.

:func:`check_window` is the one check that needs the data: the window must fit in every run.

This module also registers painnet's OmegaConf resolvers (:func:`register_resolvers`), e.g.
``${painnet.sim_suffix:${data.simulate}}``, which makes a simulated dataset's folder name depend
on every simulation parameter.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value is out of range or of the wrong type; the message names the key."""


# --------------------------------------------------------------------------- constraints


@dataclass(frozen=True)
class Number:
    """A real (or integer) number within bounds; ``also`` lists extra allowed values (-1 …)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    nullable: bool = False
    also: tuple = ()
    what: str = ""

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.nullable else "must be set (got null)"
        if value in self.also and not isinstance(value, bool):
            return None
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be {kind}, got {type(value).__name__}"
        if self.integer and not (isinstance(value, int) or float(value).is_integer()):
            return f"must be {kind}"
        if not math.isfinite(value):
            return "must be finite"
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return f"must be {self._bounds()}"
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return f"must be {self._bounds()}"
        return None

    def _bounds(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        text = " and ".join(parts)
        if self.also:
            text += f" (or {', '.join(map(str, self.also))})"
        return text


@dataclass(frozen=True)
class OneOf:
    values: tuple
    nullable: bool = False
    what: str = ""

    def problem(self, value: Any) -> str | None:
        if value is None and self.nullable:
            return None
        if isinstance(value, bool) or value not in self.values:
            return f"must be one of {list(self.values)}"
        return None


@dataclass(frozen=True)
class Interval:
    """Two finite numbers ``[low, high]`` with low < high."""

    nullable: bool = False
    what: str = ""

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.nullable else "must be [low, high] (got null)"
        ok = (
            isinstance(value, Sequence)
            and not isinstance(value, str)
            and len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            and all(math.isfinite(v) for v in value)
        )
        if not ok or not value[0] < value[1]:
            return "must be two finite numbers [low, high] with low < high"
        return None


@dataclass(frozen=True)
class Text:
    nullable: bool = False
    what: str = ""

    def problem(self, value: Any) -> str | None:
        if value is None and self.nullable:
            return None
        if not isinstance(value, str) or not value.strip():
            return "must be a non-empty string"
        return None


@dataclass(frozen=True)
class Devices:
    """Lightning's ``devices``: a count >= 1, -1 or "auto" (all), or a list of device ids."""

    what: str = ""

    def problem(self, value: Any) -> str | None:
        if value in ("auto", -1) and not isinstance(value, bool):
            return None
        if isinstance(value, list):
            ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
            return None if ok and value else "must list device ids >= 0"
        return Number(lo=1, integer=True).problem(value) and 'must be >= 1, -1, "auto" or a list'


@dataclass(frozen=True)
class Simulation:
    """``data.simulate.<param>``: checked by the simulator itself (see :func:`check_config`)."""

    what: str = ""

    def problem(self, value: Any) -> str | None:
        return None


Rule = Number | OneOf | Interval | Text | Devices | Simulation

_INT_POS = Number(lo=1, integer=True)
_INT_NONNEG = Number(lo=0, integer=True)
_POSITIVE = Number(lo=0, lo_open=True)
_NONNEG = Number(lo=0)

# key (fnmatch pattern) -> constraint. Keys absent from a config are not checked.
RULES: dict[str, Rule] = {
    # run
    "seed": Number(lo=0, integer=True, what="random seed"),
    "torch_threads": Number(lo=1, integer=True, nullable=True, what="threads per process"),
    "eval.n_boot": Number(lo=1, integer=True, what="bootstrap draws"),
    "eval.protocol.bins_per_run.*": _INT_POS,
    "ensemble.members": Number(lo=1, integer=True, what="models in a seed ensemble"),
    # data: windows, loaders, targets
    "data.lag_s": Number(lo=0, what="hemodynamic lag, s"),
    "data.window_s": Number(lo=0, lo_open=True, what="window length, s"),
    "data.train_stride": Number(lo=1, integer=True, what="stride between training windows"),
    "data.batch_size": Number(lo=1, integer=True, what="training batch size"),
    "data.eval_batch_size": Number(lo=1, integer=True, what="evaluation batch size"),
    "data.num_workers": Number(lo=0, integer=True, what="DataLoader workers"),
    "data.n_jobs": Number(lo=1, integer=True, also=(0, -1), what="extraction processes, 0/-1=all"),
    "data.max_rating_gap_s": Number(lo=0, what="longest rating gap bridged, s"),
    "data.rating_range": Interval(what="scale of the ratings"),
    "data.rating_rescale": Interval(nullable=True, what="scale of the rating files"),
    "data.rating_alignment": OneOf(("interval_mean", "midpoint")),
    "data.rating_column": Text(what="rating column name"),
    "data.bold_kind": OneOf(("nifti", "cifti", "tsv")),
    "data.simulate.seed": Number(lo=0, integer=True),
    "data.simulate.*": Simulation(),
    # data: cleaning
    "data.clean.motion": OneOf((0, 6, 24)),
    "data.clean.n_acompcor": _INT_NONNEG,
    "data.clean.high_pass_hz": Number(lo=0, lo_open=True, nullable=True, what="Hz"),
    "data.clean.low_pass_hz": Number(lo=0, lo_open=True, nullable=True, what="Hz"),
    "data.clean.drop_initial_s": Number(lo=0, what="s dropped at the start of a run"),
    "data.clean.fd_threshold": Number(lo=0, lo_open=True, nullable=True, what="mm"),
    "data.clean.filter": OneOf(("butterworth", "cosine")),
    "data.clean.n_wm_compcor": _INT_NONNEG,
    "data.clean.n_csf_compcor": _INT_NONNEG,
    "data.clean.head_radius_mm": Number(lo=0, lo_open=True, what="mm"),
    "data.clean.fd_low_pass_hz": Number(lo=0, lo_open=True, nullable=True, what="Hz"),
    "data.clean.rest_low_pass_hz": Number(lo=0, lo_open=True, nullable=True, what="Hz"),
    # split
    "split.fold": _INT_NONNEG,
    "split.n_val": _INT_NONNEG,
    "split.n_train": Number(lo=1, integer=True, nullable=True),
    "split.repeat": _INT_NONNEG,
    "split.seed": Number(lo=0, integer=True),
    # trainer
    "trainer.max_epochs": Number(lo=1, integer=True, also=(-1,), nullable=True, what="epochs"),
    "trainer.min_epochs": Number(lo=0, integer=True, nullable=True),
    "trainer.devices": Devices(),
    "trainer.devices.*": Number(lo=0, integer=True),
    "trainer.gradient_clip_val": Number(lo=0, nullable=True),
    "trainer.log_every_n_steps": _INT_POS,
    "trainer.max_steps": Number(lo=1, integer=True, also=(-1,), nullable=True),
    "trainer.accumulate_grad_batches": _INT_POS,
    "trainer.num_nodes": _INT_POS,
    "trainer.check_val_every_n_epoch": Number(lo=1, integer=True, nullable=True),
    # models (patterns: the same key inside nested nets, e.g. model.net.conv.kernel_size)
    "model.optimizer.lr": _POSITIVE,
    "model.optimizer.weight_decay": _NONNEG,
    "model.scheduler.T_max": Number(lo=1, integer=True, also=(-1,)),
    "model.huber_delta": _POSITIVE,
    "model.*dropout": Number(lo=0, hi=1, hi_open=True),
    "model.*conv_channels.*": _INT_POS,
    "model.*kernel_size": _INT_POS,
    "model.*dilation_growth": _INT_POS,
    "model.*embed_dim": _INT_POS,
    "model.*n_heads": _INT_POS,
    "model.*n_layers": _INT_NONNEG,
    "model.net.rank": Number(lo=1, integer=True, nullable=True),
    "model.net.n_last": _INT_POS,
    "model.net.quadratic_lr_scale": _NONNEG,
    "model.net.fitted_lr_scale": _NONNEG,
    "model.net.linear_alphas.*": _POSITIVE,
    "model.*n_deciles": Number(lo=2, integer=True),
    "model.*min_segment": _INT_POS,
    "model.*max_components": Number(lo=1, integer=True, nullable=True),
    "model.*component_grid.*": _INT_POS,
    "model.*n_lasso_alphas": _INT_POS,
    "model.*random_state": Number(lo=0, integer=True, nullable=True),
    "model.*n_jobs": Number(lo=1, integer=True, also=(-1,), nullable=True),
    # model=stack (painnet/experiments/stack.py)
    "model.inner_folds": Number(lo=2, integer=True),
    "callbacks.early_stopping.patience": _INT_NONNEG,  # reached through model.member_jobs
    "model.window_s": _POSITIVE,
    "model.alphas.*": _POSITIVE,
    "model.target": OneOf(("rating", "within_run")),  # model=ridge's training target
    # model=cofluct (painnet/models/cofluct.py)
    "model.rank": _INT_POS,
    "model.shrinkage": _NONNEG,
    "model.alpha": _NONNEG,
    "model.run_alphas.*": Number(lo=0, also=(math.inf,)),  # .inf: the training mean alone
    # experiments
    "finetune.pretrain_epochs": _INT_POS,
    "finetune.n_val": _INT_NONNEG,
    # self-supervised pretraining (experiment=pretrain, painnet.pretrain)
    "finetune.pretrain.scope": OneOf(("fold", "others")),
    "finetune.pretrain.mask": OneOf(("parcel", "frame")),
    "finetune.pretrain.mask_ratio": Number(lo=0, hi=1, lo_open=True, hi_open=True),
    "finetune.pretrain.epochs": _INT_POS,
    "finetune.pretrain.monitor": _INT_POS,
    "finetune.pretrain.recon_frames": Number(lo=1, integer=True, nullable=True),
    "study.repeats": _INT_POS,
    "study.n_val": Number(lo=0, integer=True, nullable=True),
    "study.n_train.*": _INT_POS,
    "study.folds.*": _INT_NONNEG,
}

# Sections of a config that RULES covers (others, e.g. hydra, paths, logger, are not walked).
SECTIONS = (
    "seed",
    "torch_threads",
    "eval",
    "ensemble",
    "data",
    "split",
    "trainer",
    "model",
    "finetune",
    "study",
)


# A stack's members (model.members.<name>.*) are model configs: their keys follow model.* rules.
_MEMBER_KEY = re.compile(r"^model\.members\.[^.]+\.")
# ... and their job overrides (model.member_jobs.<name>.*) are keys of a whole job config.
_MEMBER_JOB_KEY = re.compile(r"^model\.member_jobs\.[^.]+\.")


def rule_for(key: str) -> Rule | None:
    """The constraint of a dotted key: an exact entry first, else the first matching pattern."""
    if _MEMBER_KEY.match(key):
        return rule_for(_MEMBER_KEY.sub("model.", key))
    if _MEMBER_JOB_KEY.match(key):
        return rule_for(_MEMBER_JOB_KEY.sub("", key))
    if key in RULES:
        return RULES[key]
    for pattern, rule in RULES.items():
        if any(c in pattern for c in "*?[") and fnmatchcase(key, pattern):
            return rule
    return None


# --------------------------------------------------------------------------- walking configs


def _leaves(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf; lists are leaves and their items leaves ``key.i``.

    Values that cannot be resolved here (e.g. ``${hydra:…}`` outside a Hydra run) are skipped:
    they are not numbers a user typed.
    """
    if isinstance(node, DictConfig):
        items = []
        for k in node:
            try:
                items.append((k, node[k]))
            except OmegaConfBaseException:
                continue
    elif isinstance(node, Mapping):
        items = list(node.items())
    else:
        items = None
    if items is not None:
        for k, v in items:
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, DictConfig | Mapping):
                yield from _leaves(v, key)
            else:
                yield from _leaves(v, key) if _is_list(v) else [(key, _plain(v))]
        return
    if _is_list(node):
        yield prefix, _plain(node)
        for i, item in enumerate(_plain(node)):
            if not isinstance(item, Mapping | list):
                yield f"{prefix}.{i}", item


def _is_list(value: Any) -> bool:
    return isinstance(value, ListConfig | list | tuple)


def _plain(value: Any) -> Any:
    if isinstance(value, ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, tuple):
        return list(value)
    return value


def problems(leaves: Iterable[tuple[str, Any]]) -> list[str]:
    """One line per leaf that breaks its rule: ``key=value: what is wrong (meaning)``."""
    out = []
    for key, value in leaves:
        rule = rule_for(key)
        if rule is None:
            continue
        message = rule.problem(value)
        if message:
            what = f" ({rule.what})" if rule.what else ""
            out.append(f"{key}={_typed(value)}: {message}{what}")
    return out


def _typed(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value) if isinstance(value, list | bool) else str(value)


def _cross_problems(get) -> list[str]:
    """Constraints between keys."""
    out = []
    high, low = get("data.clean.high_pass_hz"), get("data.clean.low_pass_hz")
    if _num(high) and _num(low) and low <= high:
        out.append(
            f"data.clean.low_pass_hz={low}: must be above data.clean.high_pass_hz={high}"
            " (the pass band would be empty)"
        )
    lo_ep, hi_ep = get("trainer.min_epochs"), get("trainer.max_epochs")
    if _num(lo_ep) and _num(hi_ep) and hi_ep != -1 and lo_ep > hi_ep:
        out.append(f"trainer.min_epochs={lo_ep}: must be <= trainer.max_epochs={hi_ep}")
    return out


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _raise(found: list[str], where: str) -> None:
    if found:
        lines = "\n  ".join(found)
        raise ConfigError(f"invalid config value(s){where}:\n  {lines}")


def check_config(cfg: DictConfig | Mapping) -> None:
    """Raise :class:`ConfigError` naming every key of ``cfg`` whose value breaks its rule."""
    leaves = []
    for section in SECTIONS:
        try:
            node = cfg.get(section) if isinstance(cfg, DictConfig | Mapping) else None
        except OmegaConfBaseException:
            continue
        if node is None:
            continue
        leaves.extend(
            _leaves(node, section)
            if isinstance(node, DictConfig | Mapping | list)
            else [(section, _plain(node))]
        )
    values = dict(leaves)
    _raise(problems(leaves) + _cross_problems(values.get) + _simulation_problems(values), "")


def _simulation_problems(values: Mapping[str, Any]) -> list[str]:
    """The simulator's own parameter checks, reported under ``data.simulate.<param>``."""
    prefix = "data.simulate."
    spec = {
        k[len(prefix) :]: v
        for k, v in values.items()
        if k.startswith(prefix) and "." not in k[len(prefix) :]
    }
    preset = spec.pop("preset", None)
    spec.pop("seed", None)
    if preset is None:
        return []
    from painnet.data.simulate import resolve_params

    try:
        resolve_params(str(preset), spec)
    except ValueError as err:
        keys = [k for k in sorted(spec) if k in str(err)] or ["preset"]
        return [f"data.simulate.{keys[0]}={_typed(spec.get(keys[0], preset))}: {err}"]
    return []


def check_section(prefix: str, values: Mapping[str, Any]) -> None:
    """Check the arguments of one object (e.g. the DataModule's) as keys ``<prefix>.<name>``.

    Names without a rule (``self``, ``split`` …) are ignored, so ``check_section("data",
    locals())`` at the top of a constructor checks exactly its config-backed arguments.
    """
    plain = {k: v for k, v in values.items() if not k.startswith("_") and k != "self"}
    leaves = [(key, value) for key, value in _leaves(plain, prefix)]
    found = dict(leaves)
    cross = [p for p in _cross_problems(found.get) if p.startswith(prefix + ".")]
    _raise(problems(leaves) + cross, "")


def unchecked_numbers(cfg: DictConfig | Mapping) -> list[str]:
    """Numeric leaves in the checked sections that no rule covers (keeps RULES complete)."""
    out = []
    for section in SECTIONS:
        node = cfg.get(section)
        if node is None:
            continue
        leaves = _leaves(node, section) if isinstance(node, DictConfig | Mapping) else []
        for key, value in leaves:
            parent = key.rpartition(".")[0]
            if _num(value) and rule_for(key) is None and rule_for(parent) is None:
                out.append(key)
    return out


def check_window(window_s: float, runs: Sequence, key: str = "data.window_s") -> None:
    """The window must be at least one frame and fit in the usable part of every run.

    ``runs`` are :class:`painnet.data.types.RunData`; the usable part starts at the first kept
    frame (after ``data.clean.drop_initial_s``).
    """
    for run in runs:
        if window_s < run.tr - 1e-9:
            raise ConfigError(
                f"{key}={window_s:g}: shorter than one frame (TR {run.tr:g} s of run {run.key})"
            )
        frames = max(1, int(round(window_s / run.tr)))
        usable = run.n_frames - run.first_kept
        if frames > usable:
            raise ConfigError(
                f"{key}={window_s:g}: the window ({frames} frames at TR {run.tr:g} s) is longer"
                f" than run {run.key.bids_prefix()}, which has {usable} usable frames"
                f" ({usable * run.tr:.1f} s of {run.n_frames * run.tr:.1f} s after the"
                " dropped start); shorten the window or drop the run"
            )


# --------------------------------------------------------------------------- resolvers


def sim_suffix(simulate: Any) -> str:
    """``""`` for a preset's own parameters, else ``-<hash>`` of every parameter that differs.

    Used in ``conf/data/_simulated.yaml``: ``sim-<preset>-seed<seed>${painnet.sim_suffix:…}``, so
    ``+data.simulate.n_parcels=40`` gets a folder of its own instead of colliding with (and
    failing on) the preset's dataset. Values are coerced as the simulator coerces them, so
    ``noise_sd=1`` and ``noise_sd=1.0`` are the same dataset; unknown names are an error.
    """
    spec = dict(_plain_mapping(simulate))
    preset = spec.pop("preset", None)
    spec.pop("seed", None)
    if not spec:
        return ""
    from painnet.data.simulate import PRESETS, resolve_params

    params = resolve_params(str(preset), spec)
    changed = {k: params[k] for k in sorted(spec) if params[k] != PRESETS[str(preset)][k]}
    if not changed:
        return ""
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()
    return f"-{digest[:8]}"


def _plain_mapping(node: Any) -> Mapping:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node or {}


def register_resolvers() -> None:
    """Register painnet's OmegaConf resolvers (idempotent)."""
    if not OmegaConf.has_resolver("painnet.sim_suffix"):
        OmegaConf.register_new_resolver("painnet.sim_suffix", sim_suffix)


register_resolvers()
