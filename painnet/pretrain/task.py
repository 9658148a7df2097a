"""Masked reconstruction of z-scored windows: self-supervised pretraining of ConvAttn.

A window x [B, P, L] (parcel series already z-scored over their run by the cleaning) is
corrupted by setting masked entries to 0 (the z-scored mean, also what a censored frame holds),
encoded by the ConvAttn backbone -- per-parcel causal convolutions, parcel embedding, attention
across parcels -- into one token per parcel [B, P, E], and a small reconstruction head
(LayerNorm + Linear E -> K) predicts every parcel's last K frames. The loss is the mean squared
error on the masked entries only.

- ``mask: parcel``: ``mask_ratio`` of the parcels lose their whole time course; their
  tokens must be filled in from the other parcels through the cross-parcel attention, the part
  of the backbone that reads co-fluctuations.
- ``mask: frame`` (``experiment=pretrain``'s default): ``mask_ratio`` of the last K frames are
  zeroed in every parcel. On demo in 4 epochs its validation loss fell to 0.62 (zero-prediction
  ~1.0) while parcel masking stayed at 0.99.

K is the last-frame receptive field of the causal conv stack (13 frames at the defaults) when
the net summarises time by its last frame: older frames cannot reach a token, so they are not
asked for. The pain head of the net is left untrained; the checkpoint's ``net.*`` weights load
into a :class:`painnet.task.PainDecoderTask` of the same net config for fine-tuning
(``finetune.from``, :class:`painnet.experiments.finetune.BackboneFinetuning`); the
``recon_head.*`` weights stay behind. (A pretraining job still ends, like every job, in a
prediction table scored on its monitor sessions: those figures are of this untrained head, a
formality of the one decoder protocol, not a result; pretraining jobs are not aggregated.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from painnet.task import PainDecoderTask

MASKS = ("parcel", "frame")
# Validation masks are drawn from this seed (+ batch index): every epoch scores the same task.
VAL_MASK_SEED = 12345


class MaskedPretrainTask(PainDecoderTask):
    """Self-supervised pretraining of a ConvAttn net (see the module docstring).

    Args beyond :class:`PainDecoderTask`'s: ``mask`` (``parcel`` or ``frame``), ``mask_ratio``
    (share of parcels / frames masked, in (0, 1)), ``recon_frames`` (K; None = the receptive
    field, at most the window).
    """

    def __init__(
        self,
        net,
        optimizer,
        scheduler=None,
        mask: str = "parcel",
        mask_ratio: float = 0.3,
        recon_frames: int | None = None,
        **kwargs,
    ):
        super().__init__(net, optimizer, scheduler, **kwargs)
        if mask not in MASKS:
            raise ValueError(f"finetune.pretrain.mask must be one of {MASKS}, got {mask!r}")
        if not 0.0 < float(mask_ratio) < 1.0:
            raise ValueError(f"finetune.pretrain.mask_ratio={mask_ratio}: must be in (0, 1)")
        _check_backbone(self.net)
        self.mask = mask
        self.mask_ratio = float(mask_ratio)
        frames = int(self.net.n_frames)
        k = int(recon_frames) if recon_frames else min(frames, receptive_field(self.net))
        if not 1 <= k <= frames:
            raise ValueError(f"recon_frames={recon_frames}: must be 1 … {frames} (window frames)")
        self.recon_frames = k
        embed_dim = int(self.net.encoder.norm.normalized_shape[0])  # token width E
        self.recon_head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, k))

    # ---- reconstruction -----------------------------------------------------------------
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The last K frames of every parcel from a (masked) window: [B, P, L] -> [B, P, K]."""
        return self.recon_head(self.net.parcel_tokens(x))

    def draw_mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bool [B, P, K]: the entries of the last K frames that are hidden (and scored)."""
        b, p, _ = x.shape
        k = self.recon_frames
        n_items = p if self.mask == "parcel" else k
        n_masked = max(1, int(round(self.mask_ratio * n_items)))
        scores = torch.rand(b, n_items, generator=generator).to(x.device)
        chosen = scores.argsort(dim=1)[:, :n_masked]
        picked = torch.zeros(b, n_items, dtype=torch.bool, device=x.device)
        picked.scatter_(1, chosen, True)
        if self.mask == "parcel":
            return picked[:, :, None].expand(b, p, k)
        return picked[:, None, :].expand(b, p, k)

    def corrupt(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` with the masked entries set to 0; a masked parcel loses all its frames."""
        corrupted = x.clone()
        if self.mask == "parcel":
            corrupted[mask[:, :, 0]] = 0.0
        else:
            k = self.recon_frames
            corrupted[..., -k:] = corrupted[..., -k:].masked_fill(mask, 0.0)
        return corrupted

    def masked_loss(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared reconstruction error over the masked entries only."""
        recon = self.reconstruct(self.corrupt(x, mask))
        return F.mse_loss(recon[mask], x[..., -self.recon_frames :][mask])

    # ---- steps --------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch["x"]
        loss = self.masked_loss(x, self.draw_mask(x))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._log_fixed_mask_loss(batch, batch_idx, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._log_fixed_mask_loss(batch, batch_idx, "test")

    def _log_fixed_mask_loss(self, batch, batch_idx: int, stage: str) -> None:
        x = batch["x"]
        generator = torch.Generator().manual_seed(VAL_MASK_SEED + batch_idx)
        loss = self.masked_loss(x, self.draw_mask(x, generator))
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=len(x), sync_dist=True)

    def configure_callbacks(self) -> list:
        return []  # no binned validation r: the pain head is not trained here


def receptive_field(net: nn.Module) -> int:
    """Frames that reach a parcel's token: the causal convs' span when time is summarised by
    the last frame, else the whole window."""
    from painnet.models.convattn import LastStep

    if net.time_encoder is None and isinstance(net.time_pool, LastStep):
        return 1 + sum(int(block.left_pad) for block in net.conv)
    return int(net.n_frames)


def _check_backbone(net: nn.Module) -> None:
    needed = ("parcel_tokens", "encoder", "conv", "time_pool", "n_frames")
    missing = [name for name in needed if not hasattr(net, name)]
    if missing or getattr(net.encoder, "norm", None) is None:
        raise ValueError(
            f"self-supervised pretraining needs a ConvAttn-like net (painnet.models.convattn."
            f"ConvAttnDecoder); {type(net).__name__} lacks {missing or ['encoder.norm']}"
        )
