"""A stacked decoder's combiner: a non-negative linear combination of member predictions,
fitted on *out-of-sample* predictions binned as the study scores them.

Why a stack, and why split each member into a run-level and a within-run part: under
leave-one-session-out, a model that cannot see session-level pain (anything reading per-run
z-scored activation) predicts a held-out run's mean near the mean of the *other* sessions, which
anti-correlates with the truth, while its variation *within* the run can track pain well. The
edge model reads co-fluctuation and so also carries run- and session-level pain. Giving every
member two features -- its run mean and its deviation from that mean -- and fitting their
weights with a positivity constraint on predictions the members made for sessions they never
saw lets the combination keep what generalises (e.g. the edge model's run level, the deep
model's within-run shape) and give zero weight to what anti-correlates. Run means are taken over
each run's own predicted frames (no rating is read), just as the input is z-scored per run.

The combiner is fitted on bins of ``bin_size`` (the study's 1-min bins): the combination that
maximises the binned pooled r is what is scored.

:class:`StackCombiner` is the ``model._target_`` of ``model=stack``; the decoder adapter that
runs the members' inner cross-validation is :class:`painnet.experiments.stack.StackDecoder`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from painnet.evaluation.bins import bin_predictions
from painnet.evaluation.table import BIN_SIZES, FRAME_KEYS, RUN_KEYS, SESSION_KEYS
from painnet.models.classical import group_nanmean

RUN_LEVEL_MODES = ("residual", "anchor", "convex", "split", "pooled")
WITHIN_SCALES = ("session", "none")
ANCHOR_WEIGHTS = ("screened", "fitted", "equal")
WITHIN_WEIGHTS = ("correlation", "fitted")
RUN_LEVEL_ORIGINS = ("inner_mean", "predicted")
ANCHOR_FALLBACKS = ("none", "best")


class StackCombiner:
    """Weights of member predictions, fitted on out-of-sample member tables.

    Args:
        bin_size: bins the weights are fitted on (a key of ``BIN_SIZES``; the study's ``1min``).
        run_level: how the stack's run level is made.
            ``anchor`` (``model=stack``'s default) -- the run level of member ``anchor`` as is
            (weight 1, no intercept); the within-run parts of every member are weighted as
            ``within_weights`` says. ``anchor`` may list several members (those that read
            session-level pain): the run level is then a convex mix of their run levels,
            weighted as ``anchor_weights`` says.
            ``residual`` -- member ``anchor``'s whole prediction as is (run level and
            within-run shape, weight 1, no intercept), plus the other members' within-run
            parts with free non-negative weights fitted on what the anchor leaves: the stack
            is the anchor whenever nothing else helps on the inner bins. (It won the tuning
            variants but not the held-out ones: benchmarks/decoders.md.)
            ``convex`` -- each member gives its run mean and its within-run
            deviation; the run means are mixed by weights that sum to 1 (a convex
            combination, no intercept) and the within-run parts by free non-negative weights.
            ``split`` -- the same two features per member, all weights free and non-negative,
            plus an intercept. ``pooled`` -- one free weight per member, plus an intercept.
        anchor_weights: with several anchors, ``screened`` (``model=stack``'s default) -- the
            mean of the anchors whose run level correlates positively with the inner binned
            ratings (if none does, the one that correlates best); ``fitted`` -- weights on the
            simplex (summing to 1, no intercept), fitted with the within-run weights on the
            inner bins; ``equal`` -- the mean of all anchors. Why not ``equal``: two readers of
            session-level pain can disagree in sign on a participant (var_cofluct_sparse 01 in
            benchmarks/decoders.md: the co-fluctuation decoder's run level anti-correlates with
            pain there, edge_pcr's does not), and a mean then takes half of the wrong one. Why
            not ``fitted``: see *anti-selection* below. Both need inner predictions made as the
            outer ones are, one session held out at a time (``model.inner_loso``).
        within_weights: ``correlation`` (``model=stack``'s default) -- each member's within-run
            part weighted in proportion to its correlation with the inner binned ratings (zero
            where that is not positive), their sum then scaled by one non-negative factor
            fitted with the run level (least squares, no intercept); ``fitted`` -- a free
            non-negative weight per member, all fitted together by least squares. Not with
            ``run_level`` ``split`` or ``pooled`` (they fit every weight freely).
        run_level_origin: with ``run_level=anchor``: ``inner_mean`` -- the (mixed) anchors' run
            level minus its mean over the inner bins, so every outer fold's prediction is
            measured from the same origin (its training sessions' average); ``predicted`` --
            the run level as the anchors predict it, in rating units. Why ``inner_mean``: an
            anchor's held-out run level is its intercept, about the training sessions' mean
            rating, plus what it reads; under leave-one-session-out that mean is
            (S·grand mean − held-out mean)/(S − 1), which anti-correlates with the held-out
            session. Its inner predictions are made the same way (one training session held out
            at a time), so their mean is that intercept plus the anchor's average reading, and
            subtracting it leaves the anchor's reading of how this session differs from the
            training sessions. The stack then predicts pain relative to the participant's
            training average (pooled r, AUC and within-run r do not see a constant; a pooled
            table of several folds does, which is the point).
        anchor_fallback: with ``anchor_weights=screened``, when no anchor's inner run level
            correlates positively: ``best`` -- keep the one that correlates best; ``none`` --
            no run level (the within-run shapes alone, around the common origin; needs
            ``run_level_origin=inner_mean``).
        within_scale: ``session`` (``model=stack``'s default) -- each member's within-run part
            is divided by its root-mean-square over the frames of its session before it is
            weighted (no rating is read: a scale, like per-run z-scoring of the input;
            ``residual``'s anchor stays as predicted). ``none`` -- the within-run parts as predicted.

    Why ``within_scale=session``: the weights are fitted on the predictions of *inner* fits
    (members trained on fewer sessions, with fewer epochs' worth of data) and applied to the
    *outer* fit's. A network's output scale is not the same in the two (measured: the small
    ConvAttn member's within-run weight reached 4.7 to 9 on var_cofluct 02, where its outer fit
    predicts with a larger amplitude than its inner fits), so raw weights overshoot. On the
    session scale, a weight says how much of a member's within-run *shape* to add, whatever the
    fit's amplitude; a session is the unit one fit predicts, and a session's combined prediction
    does not depend on which other sessions share its table. Measured on identical member
    predictions, ``none`` vs ``session``: benchmarks/decoders.md (``stack_raw_scale``).

    Why few fitted weights (*anti-selection*): the weights are fitted on the training sessions
    and applied to the held-out one. Where two members are about equally good, which one looks
    better on the other sessions is noise, and under leave-one-session-out that noise selects
    *against* the held-out session: a member that happens to do well on session k looks
    relatively worse on the sessions left when k is held out (the same arithmetic as the
    run-level artifact above). Measured on var_cofluct 02 (benchmarks/decoders.md): freely fitted
    within-run weights of edge_pcr and cofluct gave within-run r 0.52 although each member alone
    had 0.56 and 0.57 and their plain sum 0.59; the fitted anchor weights jumped between 0 and 1
    from fold to fold there. ``screened`` and ``correlation`` fit one scale and make only sign
    decisions, which a few inner sessions can support.

    Why no intercept (``anchor``, ``residual``, ``convex``): a fitted intercept is the training
    sessions' mean rating, and under leave-one-session-out that mean anti-correlates with the
    held-out session's (the artifact above). Free weights that shrink the members' run levels
    let that intercept set the held-out run level; a convex mix keeps the run level on the
    members' own scale, so the stack's run level is never more artifact-driven than its
    members'. Every member's own run level carries the same mean (its intercept);
    ``run_level_origin=inner_mean`` takes it out of the anchors' run level too. The cost: the
    stack's predictions are then pain relative to the training average, not in rating units, so
    R² and MAE, which compare absolute values, do not measure it (r and AUC do); ``predicted``
    keeps rating units. Measured: benchmarks/decoders.md (``stack_screened`` is the stack as
    predicted; ``stack_edge_pcr_alone`` is edge_pcr with the same origin). Why ``anchor`` over
    ``convex``: on the tuning variants (demo, var_both) the run-level weights, fitted on a few
    inner sessions, jumped between members from fold to fold and often took a member's
    anti-correlated run level; the anchors keep the run levels known to carry session-level
    pain (the co-fluctuation readers). Measured comparison of the modes: benchmarks/decoders.md.
    """

    #: The decoder adapter that fits the members (see painnet.experiments.decoder.adapter_class).
    decoder_adapter = "painnet.experiments.stack.StackDecoder"
    #: Combiners pickled before ``within_scale`` existed were fitted on raw within-run parts.
    within_scale = "none"
    #: ... and before ``anchor_weights`` existed, several anchors were averaged.
    anchor_weights = "equal"
    #: ... and before ``within_weights`` existed, every within-run part had a free weight.
    within_weights = "fitted"
    #: ... and before ``run_level_origin`` existed, the run level was used as predicted.
    run_level_origin = "predicted"
    anchor_fallback = "best"

    def __init__(
        self,
        bin_size: str = "1min",
        run_level: str = "convex",
        anchor: str | Sequence[str] | None = None,
        within_scale: str = "session",
        anchor_weights: str = "fitted",
        within_weights: str = "fitted",
        run_level_origin: str = "predicted",
        anchor_fallback: str = "best",
    ):
        if bin_size not in BIN_SIZES or BIN_SIZES[bin_size] is None:
            timed = [k for k, v in BIN_SIZES.items() if v is not None]
            raise ValueError(f"model.bin_size={bin_size!r}: choose one of {timed}")
        if run_level not in RUN_LEVEL_MODES:
            raise ValueError(f"model.run_level={run_level!r}: choose one of {RUN_LEVEL_MODES}")
        anchors = _as_list(anchor)
        if run_level in ("anchor", "residual") and not anchors:
            raise ValueError(
                f"model.run_level={run_level} needs model.anchor (the member whose run level is kept)"
            )
        if within_scale not in WITHIN_SCALES:
            raise ValueError(f"model.within_scale={within_scale!r}: choose one of {WITHIN_SCALES}")
        if anchor_weights not in ANCHOR_WEIGHTS:
            raise ValueError(
                f"model.anchor_weights={anchor_weights!r}: choose one of {ANCHOR_WEIGHTS}"
            )
        if within_weights not in WITHIN_WEIGHTS:
            raise ValueError(
                f"model.within_weights={within_weights!r}: choose one of {WITHIN_WEIGHTS}"
            )
        if within_weights == "correlation" and run_level in ("split", "pooled"):
            raise ValueError(
                f"model.within_weights=correlation does not apply to model.run_level={run_level} "
                "(it fits every weight freely): use within_weights=fitted, or run_level "
                "anchor, residual or convex"
            )
        if run_level_origin not in RUN_LEVEL_ORIGINS:
            raise ValueError(
                f"model.run_level_origin={run_level_origin!r}: choose one of {RUN_LEVEL_ORIGINS}"
            )
        if anchor_fallback not in ANCHOR_FALLBACKS:
            raise ValueError(
                f"model.anchor_fallback={anchor_fallback!r}: choose one of {ANCHOR_FALLBACKS}"
            )
        if run_level_origin == "inner_mean" and run_level != "anchor":
            raise ValueError(
                f"model.run_level_origin=inner_mean applies to model.run_level=anchor, not "
                f"{run_level}: use run_level_origin=predicted"
            )
        if anchor_fallback == "none" and run_level_origin != "inner_mean":
            raise ValueError(
                "model.anchor_fallback=none needs model.run_level_origin=inner_mean (a fold "
                "without a run level must share the other folds' origin)"
            )
        if run_level == "residual" and len(anchors) > 1:
            raise ValueError(f"model.run_level=residual takes one model.anchor, got {anchors}")
        self.bin_size = bin_size
        self.run_level = run_level
        self.anchor = anchor if isinstance(anchor, str) or anchor is None else anchors
        self.within_scale = within_scale
        self.anchor_weights = anchor_weights
        self.within_weights = within_weights
        self.run_level_origin = run_level_origin
        self.anchor_fallback = anchor_fallback
        self.members_: list[str] = []
        self.features_: list[str] = []
        # per feature: on the raw scale for run means, on the within_scale scale for within parts
        self.weights_: np.ndarray | None = None
        self.intercept_: float = 0.0
        self.report_: dict = {}

    @property
    def anchors(self) -> list[str]:
        """The anchor members as a list (``anchor`` may name one or several)."""
        return _as_list(self.anchor)

    def check_members(self, members) -> None:
        """The anchors the run level needs are among ``members`` (a stack job checks this
        before fitting anything; :meth:`fit` checks its tables)."""
        if self.run_level not in ("anchor", "residual"):
            return
        missing = [a for a in self.anchors if a not in members]
        if missing:
            shown = missing[0] if len(missing) == 1 else missing
            raise ValueError(f"model.anchor={shown!r} is not a member ({list(members)})")

    # -- features ------------------------------------------------------------------------
    def features(
        self, tables: Mapping[str, pd.DataFrame]
    ) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
        """The frame rows shared by every member table, their feature matrix and its names.

        Every member must have predicted the same frames (same ``FRAME_KEYS``); a frame any
        member left without a prediction has no feature values (NaN row).
        """
        names = list(tables)
        if not names:
            raise ValueError("a stack needs at least one member table")
        base = tables[names[0]].sort_values(FRAME_KEYS).reset_index(drop=True)
        columns, predictions = [], []
        for name in names:
            table = tables[name].sort_values(FRAME_KEYS).reset_index(drop=True)
            if len(table) != len(base) or not table[FRAME_KEYS].equals(base[FRAME_KEYS]):
                raise ValueError(
                    f"stack member {name!r} predicted other frames than {names[0]!r}: members "
                    "must share data.window_s (every member predicts every frame with a full window)"
                )
            predictions.append(table["prediction"].to_numpy(dtype=np.float64))
        stacked = np.column_stack(predictions)
        stacked[~np.isfinite(stacked).all(axis=1)] = np.nan
        run_id = base.groupby(RUN_KEYS, sort=False).ngroup().to_numpy()
        session_id = base.groupby(SESSION_KEYS, sort=False).ngroup().to_numpy()
        feature_columns = []
        for j, name in enumerate(names):
            p = stacked[:, j]
            if self.run_level != "pooled":
                mean = group_nanmean(p, run_id)
                within = p - mean
                # (residual: the anchor's whole prediction is kept as predicted, weight 1)
                kept_whole = self.run_level == "residual" and name in self.anchors
                if self.within_scale == "session" and not kept_whole:
                    rms = np.sqrt(group_nanmean(within**2, session_id))
                    # a member flat over a whole session keeps its zeros
                    within = within / np.where(rms > 1e-12, rms, 1.0)
                feature_columns += [mean, within]
                columns += [f"{name}:run", f"{name}:within"]
            else:
                feature_columns.append(p)
                columns.append(name)
        return base, np.column_stack(feature_columns), columns

    def _binned(self, base: pd.DataFrame, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bins × features, bin ratings): each feature binned as a prediction is scored."""
        binned_x, rating = [], None
        for j in range(X.shape[1]):
            table = base.assign(prediction=X[:, j])
            binned = bin_predictions(table, self.bin_size)
            binned_x.append(binned["prediction"].to_numpy(dtype=np.float64))
            rating = binned["rating"].to_numpy(dtype=np.float64)
        return np.column_stack(binned_x), rating

    # -- fit / combine -------------------------------------------------------------------
    def fit(self, tables: Mapping[str, pd.DataFrame]) -> StackCombiner:
        """Fit the weights on out-of-sample member tables (one per member, same frames)."""
        from sklearn.linear_model import LinearRegression

        base, X, names = self.features(tables)
        Xb, y = self._binned(base, X)
        if len(y) < 3:
            raise ValueError(
                f"the stack's inner validation gave {len(y)} {self.bin_size} bins: too few to "
                "fit member weights (more sessions, or a shorter model.bin_size)"
            )
        scale = Xb.std(axis=0)
        usable = scale > 1e-12 * max(1.0, float(np.abs(Xb).max()))
        if self.run_level in ("convex", "anchor", "residual"):
            self.check_members(list(tables))
            return self._fit_convex(list(tables), names, Xb, y, scale, usable)
        weights = np.zeros(Xb.shape[1])
        if usable.any():
            z = (Xb[:, usable] - Xb[:, usable].mean(axis=0)) / scale[usable]
            fit = LinearRegression(positive=True).fit(z, y)
            weights[usable] = fit.coef_ / scale[usable]
        member_r = {m: _r(_member_bins(Xb, names, m, self.run_level), y) for m in tables}
        fallback = None
        if not np.any(weights > 0):
            # Nothing generalised positively: fall back to the member with the best
            # out-of-sample r rather than predicting a constant.
            fallback = _best(member_r)
            weights = np.array([1.0 if n.split(":")[0] == fallback else 0.0 for n in names])
        intercept = float(np.mean(y) - np.mean(Xb @ weights))
        return self._fitted(
            list(tables), names, weights, intercept, Xb, y, fallback_member=fallback
        )

    def _fitted(self, members, names, weights, intercept, Xb, y, **extra) -> StackCombiner:
        """Store the fitted weights and the report (weights, inner r of each member and of the
        stack, bins used, and ``extra``)."""
        self.members_, self.features_ = list(members), names
        self.weights_, self.intercept_ = weights, intercept
        member_r = {m: _r(_member_bins(Xb, names, m, self.run_level), y) for m in self.members_}
        self.report_ = {
            "weights": {n: float(w) for n, w in zip(names, weights, strict=True)},
            "intercept": intercept,
            "inner_r": {**member_r, "stack": _r(Xb @ weights + intercept, y)},
            "inner_bins": len(y),
            **extra,
        }
        return self

    def _fit_convex(self, members, names, Xb, y, scale, usable) -> StackCombiner:
        """No intercept; least squares on the inner bins (SLSQP; a handful of weights).

        ``mixed`` columns get weights on the simplex (``convex``: every member's run mean;
        ``anchor``: the anchors' run means, or with ``anchor_weights`` ``equal`` / ``screened``
        the mean of all / of the kept anchors as one column, so weight 1; ``residual``: the
        anchor's run mean and within-run part, both weight 1); every other usable within-run
        part a free non-negative weight (``within_weights=fitted``) or a fixed share of one
        column whose scale is fitted (``correlation``)."""
        is_run = np.array([n.endswith(":run") for n in names])
        of_anchor = np.array([n.split(":")[0] in self.anchors for n in names])
        if self.run_level == "convex":
            mixed = is_run
        elif self.run_level == "anchor":
            mixed = is_run & of_anchor
        else:  # residual
            mixed = of_anchor
        within = ~is_run & ~mixed & usable
        extra: dict = {}
        if self.run_level == "anchor" and self.anchor_weights == "screened":
            run_r = {a: _r(Xb[:, names.index(f"{a}:run")], y) for a in self.anchors}
            kept = [a for a in self.anchors if run_r[a] > 0]
            if not kept and self.anchor_fallback == "best":
                kept = [_best(run_r)]
            mixed = is_run & np.array([n.split(":")[0] in kept for n in names])
            extra.update(anchor_run_r=run_r, anchors_kept=kept)
        # residual: the anchor's two parts are one column (weight 1 on its whole prediction);
        # anchor + equal / screened: the (kept) anchors' run levels averaged (one column)
        one_column = self.run_level == "residual" or (
            self.run_level == "anchor" and self.anchor_weights in ("equal", "screened")
        )
        if self.run_level == "residual":
            R = Xb[:, mixed].sum(axis=1, keepdims=True)
        elif one_column:  # (no column when the screen kept no anchor: no run level)
            R = Xb[:, mixed].mean(axis=1, keepdims=True) if mixed.any() else Xb[:, :0]
        else:
            R = Xb[:, mixed]
        # inner_mean: the run level measured from its own mean over the inner bins (its
        # training sessions' average), so every fold's prediction has the same origin
        origin = R.mean(axis=0) if self.run_level_origin == "inner_mean" else np.zeros(R.shape[1])
        target = y - y.mean() if self.run_level_origin == "inner_mean" else y
        R = R - origin
        if self.within_weights == "correlation":
            # one column: the within-run parts mixed in proportion to their positive inner r
            within_r = np.array([_r(Xb[:, j], y) for j in np.flatnonzero(within)])
            share = np.where(np.isfinite(within_r) & (within_r > 0), within_r, 0.0)
            extra["within_r"] = {
                names[j]: float(r) for j, r in zip(np.flatnonzero(within), within_r, strict=True)
            }
            share = share / share.sum() if share.sum() > 0 else share
            W = (Xb[:, within] @ share)[:, None] if share.any() else np.zeros((len(y), 0))
        else:
            W = Xb[:, within] / scale[within]
        k, q = R.shape[1], W.shape[1]

        def loss(theta):
            residual = target - R @ theta[:k] - W @ theta[k:]
            return float(residual @ residual) / len(y)

        start = np.concatenate([np.full(k, 1.0 / max(k, 1)), np.zeros(q)])
        solution = _minimize(
            loss,
            start,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * k + [(0.0, None)] * q,
            constraints=[{"type": "eq", "fun": lambda theta: theta[:k].sum() - 1.0}] if k else [],
            options={"maxiter": 500, "ftol": 1e-12},
        )
        theta = np.clip(solution.x, 0.0, None)
        if k:
            theta[:k] /= theta[:k].sum()
        weights = np.zeros(len(names))
        if not one_column:  # convex, or anchors with fitted weights: one weight per column
            weights[mixed] = theta[:k]
        elif mixed.any():  # one column: the anchor's whole prediction, or the anchors' mean
            weights[mixed] = theta[0] / (1 if self.run_level == "residual" else mixed.sum())
        if self.within_weights == "correlation":
            weights[within] = theta[k] * share if q else 0.0
        else:
            weights[within] = theta[k:] / scale[within]
        return self._fitted(
            members,
            names,
            weights,
            -float(theta[:k] @ origin),
            Xb,
            y,
            fallback_member=None,
            converged=bool(solution.success),
            **extra,
        )

    def combine(self, tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
        """The combined prediction table (frames of the member tables, their ``split``)."""
        if self.weights_ is None:
            raise RuntimeError("StackCombiner.combine before fit")
        if list(tables) != self.members_:
            raise ValueError(f"stack members {list(tables)} differ from the fitted {self.members_}")
        base, X, _ = self.features(tables)
        return base.assign(prediction=X @ self.weights_ + self.intercept_)

    def hyperparameters(self) -> dict:
        return dict(self.report_)


def _minimize(loss, start, **options):
    """scipy's minimize, or the empty solution when there is nothing to fit."""
    from types import SimpleNamespace

    from scipy.optimize import minimize

    if len(start) == 0:
        return SimpleNamespace(x=np.zeros(0), success=True)
    return minimize(loss, start, **options)


def _as_list(anchor) -> list[str]:
    return [anchor] if isinstance(anchor, str) else [str(a) for a in anchor or ()]


def _member_bins(Xb: np.ndarray, names: list[str], member: str, run_level: str) -> np.ndarray:
    """A member's own binned prediction (its run + within parts summed back)."""
    cols = [j for j, n in enumerate(names) if n.split(":")[0] == member]
    return Xb[:, cols].sum(axis=1) if run_level != "pooled" else Xb[:, cols[0]]


def _best(r: Mapping[str, float]) -> str:
    """The key with the highest r (a NaN r ranks last)."""
    return max(r, key=lambda k: -np.inf if np.isnan(r[k]) else r[k])


def _r(x: np.ndarray, y: np.ndarray) -> float:
    if np.std(x) < 1e-12 or np.std(y) < 1e-12:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])
