"""Hybrid pain decoder: the study's edge model as a second-order pathway + ConvAttn residual.

Why: per-run z-scoring removes each run's mean activation, so a model reading activation alone
cannot see session-level pain; in leave-one-session-out folds it then predicts every held-out
session near the mean of the *other* sessions, which is anti-correlated with the truth. What
survives z-scoring is co-fluctuation: the mean over a run of ``z_i z_j`` is the correlation of
parcels i and j, and the reference study's edge model reads exactly that with a per-frame
quadratic form ``z(t)ᵀ W z(t) + b`` (:func:`painnet.models.classical.quadratic_predict`).

The decoder sums two pathways on a causal window ``x`` [B, P, L] (z-scored parcels):

* :class:`QuadraticPathway` -- ``mean over the last k frames of z(t)ᵀ (U Uᵀ - V Vᵀ) z(t) + b``.
  ``U`` holds the square-root-scaled eigenvectors of the positive eigenvalues of a symmetric
  ``W``, ``V`` those of the negative ones, so with full rank and ``k = 1`` it *is* the edge
  model (:meth:`QuadraticPathway.set_from_matrix`). The rank (columns of U and of V) is
  configurable; a truncated W keeps its largest-magnitude eigenvalues.
* :class:`LinearPathway` (``linear=True``) -- ``a · mean over the window of z + c``: activation,
  read *linearly* from run-z-scored parcels. Because every parcel has mean 0 over its run, this
  pathway's run mean is (up to window edges and censoring) the constant ``c``: it adds
  within-run pain and cannot carry the leave-one-session-out artifact that a nonlinear
  activation model falls into.
* the temporal-conv + cross-parcel-attention pathway
  (:class:`painnet.models.convattn.ConvAttnDecoder`, ``conv`` not None), started at exactly zero
  output so the untrained hybrid equals its fitted pathways; it learns what is left.

:meth:`HybridDecoder.fit_init` (called by ``PainDecoderTask.on_fit_start``) fits an
:class:`~painnet.models.classical.EdgePCR` on the split's ``init_sessions`` and loads its W into
the quadratic pathway, then a :class:`~painnet.models.classical.WindowRidge` (window mean,
penalty by inner leave-one-session-out CV) on the *residual* ``rating - edge prediction`` of the
same runs, loaded into the linear pathway: a closed-form stack of the study's model and a
run-mean-free activation read-out. Whether these fitted pathways then stay frozen or train
with a smaller learning rate is ``fitted_lr_scale`` (0 = frozen).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from painnet.models.classical import EdgePCR, WindowRidge
from painnet.models.convattn import ConvAttnDecoder

log = logging.getLogger(__name__)

INIT_SESSIONS = ("train", "train_val", "none")


class QuadraticPathway(nn.Module):
    """Low-rank quadratic form over the last ``n_last`` frames of a window.

    ``forward(x)`` for x [B, P, L]: ``mean_{t in last k} (|Uᵀ z_t|² - |Vᵀ z_t|²) + b`` -> [B].

    Args:
        n_parcels: P.
        rank: columns of U and of V (each at most P); ``None`` = P (any symmetric W fits).
        n_last: k, frames averaged (1 = the window's end frame, the edge model's prediction).
        init_scale: sd of the random start of U and V (0 = the zero form).
    """

    def __init__(
        self, n_parcels: int, rank: int | None = None, n_last: int = 1, init_scale: float = 0.0
    ):
        super().__init__()
        rank = int(n_parcels) if rank is None else int(rank)
        if not 1 <= rank <= n_parcels:
            raise ValueError(f"QuadraticPathway: rank must be in 1..{n_parcels}, got {rank}")
        if int(n_last) < 1:
            raise ValueError(f"QuadraticPathway: n_last must be >= 1, got {n_last}")
        self.n_parcels, self.rank, self.n_last = int(n_parcels), rank, int(n_last)
        self.u = nn.Parameter(torch.randn(n_parcels, rank) * init_scale)
        self.v = nn.Parameter(torch.randn(n_parcels, rank) * init_scale)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x[..., -self.n_last :].transpose(1, 2)  # [B, k, P]
        form = (z @ self.u).square().sum(-1) - (z @ self.v).square().sum(-1)  # [B, k]
        return form.mean(-1) + self.bias

    def matrix(self) -> np.ndarray:
        """The current W = U Uᵀ - V Vᵀ (P, P) float64."""
        u = self.u.detach().double().cpu().numpy()
        v = self.v.detach().double().cpu().numpy()
        return u @ u.T - v @ v.T

    @torch.no_grad()
    def set_from_matrix(self, weights: np.ndarray, intercept: float) -> float:
        """Load a symmetric W (P, P) and intercept b; returns the dropped fraction of |W|_F².

        W = Q diag(λ) Qᵀ; U gets ``q_i sqrt(λ_i)`` of the ``rank`` largest positive λ, V
        ``q_i sqrt(-λ_i)`` of the ``rank`` most negative ones. Exact (0.0 dropped) when W has
        at most ``rank`` positive and ``rank`` negative eigenvalues.
        """
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.n_parcels, self.n_parcels):
            raise ValueError(
                f"QuadraticPathway: W must be ({self.n_parcels}, {self.n_parcels}), got {w.shape}"
            )
        if not np.allclose(w, w.T, atol=1e-10 * max(1.0, np.abs(w).max())):
            raise ValueError("QuadraticPathway: W must be symmetric")
        lam, q = np.linalg.eigh((w + w.T) / 2.0)
        pos = np.flatnonzero(lam > 0)[::-1][: self.rank]  # largest first
        neg = np.flatnonzero(lam < 0)[: self.rank]  # most negative first
        u = np.zeros((self.n_parcels, self.rank))
        v = np.zeros((self.n_parcels, self.rank))
        u[:, : pos.size] = q[:, pos] * np.sqrt(lam[pos])
        v[:, : neg.size] = q[:, neg] * np.sqrt(-lam[neg])
        self.u.copy_(torch.as_tensor(u, dtype=self.u.dtype))
        self.v.copy_(torch.as_tensor(v, dtype=self.v.dtype))
        self.bias.fill_(float(intercept))
        total = float((lam**2).sum())
        kept = float((lam[pos] ** 2).sum() + (lam[neg] ** 2).sum())
        return 0.0 if total == 0 else 1.0 - kept / total


class LinearPathway(nn.Module):
    """``a · mean over the last n_frames frames of x + c``: x [B, P, L] -> [B]."""

    def __init__(self, n_parcels: int, n_frames: int):
        super().__init__()
        self.n_frames = int(n_frames)
        self.linear = nn.Linear(n_parcels, 1)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[..., -self.n_frames :].mean(-1)).squeeze(-1)

    @torch.no_grad()
    def set_from_ridge(self, model: WindowRidge) -> None:
        """Load a fitted ``WindowRidge(summary="mean")``: its scaler and ridge folded into a, c."""
        if model.summary != "mean" or model.window_frames_ != self.n_frames:
            raise ValueError(
                f"LinearPathway: needs a WindowRidge with summary='mean' over {self.n_frames} "
                f"frames, got summary={model.summary!r} over {model.window_frames_}"
            )
        scaler, ridge = model.pipeline_.named_steps["scale"], model.pipeline_.named_steps["ridge"]
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        a = ridge.coef_ / scale
        c = float(ridge.intercept_ - a @ scaler.mean_)
        self.linear.weight.copy_(torch.as_tensor(a[None, :], dtype=self.linear.weight.dtype))
        self.linear.bias.fill_(c)


class HybridDecoder(nn.Module):
    """Edge-model quadratic pathway + ConvAttn pathway, summed (see the module docstring).

    Args:
        n_parcels, n_frames: input size [B, P, L].
        rank, n_last: of the :class:`QuadraticPathway` (``n_last`` is capped at L).
        init_sessions: sessions the initial EdgePCR is fitted on in :meth:`fit_init`:
            ``"train"`` (the split's training sessions: validation stays unseen, so selection
            on it is honest), ``"train_val"`` (also the validation session, as the classical
            ``edge_pcr`` job fits) or ``"none"`` (no edge fit; the pathway starts at zero and is
            learned like any other weight, so ``fitted_lr_scale`` must then be > 0).
        edge: keyword arguments of that :class:`~painnet.models.classical.EdgePCR`.
        linear: add the :class:`LinearPathway`, fitted on the edge model's residual.
        linear_alphas: ridge penalties the linear pathway's inner CV chooses from.
        fitted_lr_scale: learning-rate multiplier of the quadratic and linear pathways (0 =
            frozen; read by ``PainDecoderTask.configure_optimizers`` via :meth:`param_groups`).
        conv: keyword arguments of the :class:`~painnet.models.convattn.ConvAttnDecoder`
            pathway; ``None`` = no conv pathway (the hybrid is then the quadratic form alone).

    Output: [B] pain estimates on the rating scale.
    """

    def __init__(
        self,
        n_parcels: int,
        n_frames: int,
        rank: int | None = None,
        n_last: int = 1,
        init_sessions: str = "train_val",
        edge: Mapping[str, Any] | None = None,
        linear: bool = True,
        linear_alphas: Sequence[float] = (1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0),
        fitted_lr_scale: float = 0.0,
        conv: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if init_sessions not in INIT_SESSIONS:
            raise ValueError(
                f"HybridDecoder: init_sessions must be one of {INIT_SESSIONS}, "
                f"got {init_sessions!r}"
            )
        if fitted_lr_scale < 0:
            raise ValueError(f"HybridDecoder: fitted_lr_scale must be >= 0, got {fitted_lr_scale}")
        if init_sessions == "none" and fitted_lr_scale == 0:
            raise ValueError(
                "HybridDecoder: init_sessions='none' with fitted_lr_scale=0 leaves the "
                "quadratic pathway at zero forever; fit it (init_sessions) or train it"
            )
        self.n_parcels, self.n_frames = int(n_parcels), int(n_frames)
        self.init_sessions = init_sessions
        self.edge_kwargs = dict(edge or {})
        self.fitted_lr_scale = float(fitted_lr_scale)
        self.linear_alphas = tuple(float(a) for a in linear_alphas)
        self.quadratic = QuadraticPathway(
            n_parcels,
            rank,
            min(int(n_last), self.n_frames),
            init_scale=0.0 if init_sessions != "none" else 0.01,
        )
        self.linear = LinearPathway(n_parcels, n_frames) if linear else None
        self.conv = None
        if conv is not None:
            conv_kwargs = {**dict(conv), "init_output": 0.0}
            self.conv = ConvAttnDecoder(n_parcels=n_parcels, n_frames=n_frames, **conv_kwargs)
            with torch.no_grad():  # exactly zero output: the untrained hybrid = the edge model
                self.conv.head[-1].weight.zero_()
        for fitted in self._fitted():
            fitted.requires_grad_(self.fitted_lr_scale > 0)
        self.init_report: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, P, L] float -> [B]."""
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.n_parcels, self.n_frames):
            raise ValueError(
                f"HybridDecoder expects a (B, {self.n_parcels}, {self.n_frames}) tensor, "
                f"got shape {tuple(x.shape)}"
            )
        out = self.quadratic(x)
        if self.linear is not None:
            out = out + self.linear(x)
        if self.conv is not None:
            out = out + self.conv(x)
        return out

    def _fitted(self) -> list[nn.Module]:
        """The pathways that :meth:`fit_init` fits in closed form."""
        return [self.quadratic] + ([self.linear] if self.linear is not None else [])

    def head_modules(self) -> list[nn.Module]:
        """'Head only' fine-tuning trains the conv pathway's head (else the fitted pathways)."""
        return self.conv.head_modules() if self.conv is not None else self._fitted()

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups: the fitted pathways at ``lr * fitted_lr_scale``."""
        fitted_ids = {id(p) for m in self._fitted() for p in m.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in fitted_ids]
        fitted = [p for m in self._fitted() for p in m.parameters() if p.requires_grad]
        groups = [{"params": rest}] if rest else []
        if fitted:
            groups.append({"params": fitted, "lr": lr * self.fitted_lr_scale})
        return groups

    # ---- initialisation from the study's model -----------------------------------------

    def fit_init(self, datamodule) -> None:
        """Fit an EdgePCR on the split's ``init_sessions`` runs and load its W into the form.

        ``datamodule`` is a set-up :class:`~painnet.data.datamodule.PainDataModule`; only its
        ``runs`` of the chosen roles are read (never the test session).
        """
        if self.init_sessions == "none":
            return
        roles = ("train",) if self.init_sessions == "train" else ("train", "val")
        idx = sorted({i for role in roles for i in datamodule.runs_in(role)})
        runs = [datamodule.runs[i] for i in idx]
        edge = EdgePCR(**self.edge_kwargs).fit(runs)
        self.load_edge_model(edge)
        if self.linear is not None:
            self.linear.set_from_ridge(self.fit_residual_ridge(edge, runs))

    def fit_residual_ridge(self, edge: EdgePCR, runs: list) -> WindowRidge:
        """WindowRidge (window mean over this net's frames) on ``rating - edge(frame)``."""
        residual_runs = []
        for run in runs:
            edge_pred = edge.predict_run(run)
            target = np.where(run.valid_target, run.target - edge_pred, np.nan)
            residual_runs.append(dataclasses.replace(run, target=target.astype(np.float32)))
        tr = runs[0].tr
        ridge = WindowRidge(
            window_s=self.n_frames * tr, summary="mean", alphas=self.linear_alphas, inner_cv=True
        )
        ridge.fit(residual_runs)
        self.init_report["linear_alpha"] = ridge.alpha_
        log.info(
            "HybridDecoder: linear pathway fitted on the edge residual (alpha %g)", ridge.alpha_
        )
        return ridge

    def load_edge_model(self, model: EdgePCR) -> None:
        """Set the quadratic pathway from a fitted EdgePCR (its ``weights_`` / ``intercept_``)."""
        dropped = self.quadratic.set_from_matrix(model.weights_, model.intercept_)
        self.init_report = {
            "edge_components": int(model.n_components_),
            "dropped_fraction": dropped,
            "sessions": [list(s) for s in model.training_sessions_],
        }
        log.info(
            "HybridDecoder: quadratic pathway set from EdgePCR (%d PCs, %d sessions; rank %d "
            "drops %.3g of |W|^2)",
            model.n_components_,
            len(model.training_sessions_),
            self.quadratic.rank,
            dropped,
        )
