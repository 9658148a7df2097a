"""How held-out predictions are binned, scored and bootstrapped: painnet's rules or the study's.

One frozen :class:`EvalProtocol` travels from the config (``eval.protocol``) to
:func:`painnet.evaluation.bins.bin_predictions`, :func:`painnet.evaluation.metrics.compute_metrics`
and :func:`painnet.evaluation.bootstrap.hierarchical_bootstrap`. The defaults are painnet's;
``EvalProtocol.lee2026()`` (config: ``experiment=lee2026``) sets every rule to the one in the
reference study's code (cocoanlab/DEIPP, cited per field below). Where painnet's default differs,
the field's comment says why painnet keeps its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

BIN_RULES = ("equal_count", "discretize")
SESSION_VALUES = ("run_means", "frames")
MEDIAN_TIES = ("drop", "low")
AUC_LABELS = ("per_draw", "observed")
ONE_CLASS = ("nan", "redraw")
P_VALUES = ("capped", "study")
CI_RULES = ("percentile", "study")


@dataclass(frozen=True)
class EvalProtocol:
    """The rules of one evaluation (every field has a painnet default and a study value).

    bin_rule:
        ``equal_count``: the usable frames of a run are cut into groups of (nearly) equal frame
        count (``np.array_split``). ``discretize``: MATLAB ``discretize(1:n_kept, nbin)``, whose
        bin width is rounded to a "nice" value so the last bin is short (304 frames in 5 bins:
        69/70/70/70/25) -- analysis_rating.m:95. painnet keeps equal counts as its default:
        every bin then averages the same number of frames, so no bin is noisier than the rest.
    bins_per_run:
        Fixed bin count per run for a bin size, e.g. ``{"1min": 10, "2min": 5}`` (the study's
        ``nbin = [2 5 10]``, analysis_rating.m:53, used as 10 and 5 bins per run in
        analysis_visualize_model_test.m:51-52). ``None`` (painnet): ``round(run length / bin
        length)``, so a 300-s run gets 5 one-minute bins.
    session_value:
        ``run_means``: a session's value is the mean of its runs' means (the study:
        analysis_visualize_model_test.m:53-54,58-59). ``frames``: the mean of all its frames.
        Default ``run_means``: frame weighting has no advantage here -- a session's value is then
        a function of the run values shown in the same table, and a heavily censored run keeps
        its weight as a run.
    median_tie:
        A bin whose rating equals the median: ``drop`` (painnet: it belongs to neither class) or
        ``low`` (the study's ``a > quantile(a, 0.5)``, analysis_visualize_model_test.m:61).
    auc_labels:
        ``per_draw`` (painnet): every bootstrap draw relabels its bins by its own median, i.e. it
        re-runs the whole statistic. ``observed`` (the study): labels from the observed pooled
        median, kept fixed in every draw (analysis_visualize_model_test.m:61,265-266).
    one_class:
        Draws whose bins all carry one label: ``nan`` (painnet: AUC undefined in that draw, the
        draw still counts for r) or ``redraw`` (the study: the draw is replaced, for every metric
        of that bin size -- analysis_visualize_model_test.m:91).
    p_value:
        ``capped`` (painnet): 2 x the smaller tail fraction of finite draws, floored at
        1/(n+1) and capped at 1. ``study``: ``2 min((k_le + 1)/(n + 1), (k_ge + 1)/(n + 1))``,
        uncapped, n = all draws (Functions/boot2cip.m:20-22).
    ci:
        ``percentile`` (painnet): ``np.percentile(draws, [2.5, 97.5])`` (interpolated).
        ``study``: the order statistics ``sorted[round(0.025 n)]``, ``sorted[round(0.975 n)]``
        with MATLAB's 1-based index and round-half-away (Functions/boot2cip.m:18-19).
    min_units:
        Fewest resampling units (bins, runs or sessions, at the level the statistic resamples)
        for a bootstrap CI and p: with fewer, CI and p are undefined (NaN) and the result names
        the reason, never a floor p. The study had 23+ sessions and never met this case.
    """

    bin_rule: str = "equal_count"
    bins_per_run: Mapping[str, int] | None = None
    session_value: str = "run_means"
    median_tie: str = "drop"
    auc_labels: str = "per_draw"
    one_class: str = "nan"
    p_value: str = "capped"
    ci: str = "percentile"
    min_units: int = 5

    def __post_init__(self) -> None:
        for name, allowed in (
            ("bin_rule", BIN_RULES),
            ("session_value", SESSION_VALUES),
            ("median_tie", MEDIAN_TIES),
            ("auc_labels", AUC_LABELS),
            ("one_class", ONE_CLASS),
            ("p_value", P_VALUES),
            ("ci", CI_RULES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"eval.protocol.{name}: {value!r} is not one of {allowed}")
        if isinstance(self.min_units, bool) or not isinstance(self.min_units, int):
            raise ValueError(f"eval.protocol.min_units must be an int, got {self.min_units!r}")
        if self.min_units < 2:
            raise ValueError(f"eval.protocol.min_units must be >= 2, got {self.min_units}")
        if self.bins_per_run is not None:
            if not isinstance(self.bins_per_run, Mapping):
                raise ValueError(
                    "eval.protocol.bins_per_run must map bin sizes to counts, e.g. "
                    f"{{'1min': 10, '2min': 5}}; got {self.bins_per_run!r}"
                )
            frozen = []
            for size, count in self.bins_per_run.items():
                if size not in ("1min", "2min"):
                    raise ValueError(
                        f"eval.protocol.bins_per_run: {size!r} is not a time-bin size "
                        "('1min' or '2min')"
                    )
                if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    raise ValueError(
                        f"eval.protocol.bins_per_run.{size} must be an int >= 1, got {count!r}"
                    )
                frozen.append((str(size), int(count)))
            object.__setattr__(self, "bins_per_run", dict(frozen))

    @classmethod
    def lee2026(cls, **overrides) -> EvalProtocol:
        """Every rule as in the reference study's evaluation code (see the field docs)."""
        study = dict(
            bin_rule="discretize",
            bins_per_run={"1min": 10, "2min": 5},
            session_value="run_means",
            median_tie="low",
            auc_labels="observed",
            one_class="redraw",
            p_value="study",
            ci="study",
        )
        return cls(**{**study, **overrides})

    def as_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> EvalProtocol:
        return replace(self, **changes)


def as_protocol(protocol: EvalProtocol | Mapping | str | None) -> EvalProtocol:
    """An :class:`EvalProtocol` from None (defaults), a mapping of fields (e.g. the config's
    ``eval.protocol``, optionally with ``preset: lee2026``), a preset name, or a protocol."""
    if protocol is None:
        return EvalProtocol()
    if isinstance(protocol, EvalProtocol):
        return protocol
    if isinstance(protocol, str):
        return _preset(protocol, {})
    if isinstance(protocol, Mapping):
        fields = {str(k): v for k, v in dict(protocol).items() if k != "_target_"}
        preset = fields.pop("preset", None)
        if fields.get("bins_per_run") is not None:
            fields["bins_per_run"] = dict(fields["bins_per_run"])
        unknown = sorted(set(fields) - set(EvalProtocol().as_dict()))
        if unknown:
            raise ValueError(
                f"eval.protocol: unknown key(s) {unknown}; known: "
                f"{sorted(EvalProtocol().as_dict())} and 'preset'"
            )
        return _preset(preset, fields) if preset else EvalProtocol(**fields)
    raise ValueError(f"eval.protocol: expected a mapping or a preset name, got {protocol!r}")


def _preset(name: str, overrides: dict) -> EvalProtocol:
    if name == "painnet":
        return EvalProtocol(**overrides)
    if name == "lee2026":
        return EvalProtocol.lee2026(**overrides)
    raise ValueError(f"eval.protocol.preset: {name!r} is not one of ['painnet', 'lee2026']")
