"""Deep pain decoder: a shared temporal convolution per parcel, then attention across parcels.

Data flow of one batch of causal windows, shapes in brackets (B windows, P parcels, L frames,
C = last conv channel count, E = ``embed_dim``):

1. ``x`` [B, P, L] -> every parcel's time course becomes an independent 1-channel sequence
   [B*P, 1, L]; one stack of causal, dilated 1-D convolutions (weights shared by all parcels)
   turns it into [B*P, L, C].
2. Optional temporal attention (``temporal_attention=True``): the C features of each frame are
   widened to E and one pre-norm transformer layer runs over the L frames *of one parcel*
   (with a learned time-position embedding), so a parcel's summary can weigh distant frames by
   content, not only through the conv kernels. Parcels never see each other at this stage. It
   works on one token per parcel and frame: a CPU training step costs ~10x the default one
   at P=100, L=22.
3. Time summary per parcel: the last frame (default; through the causal convs it sees the
   last ``1 + (kernel_size - 1) * sum(dilation_growth ** i)`` frames, 13 at the defaults), or
   attention pooling over the L frames (a content score plus a learned bias per frame, started
   as a recency prior), or the mean; then dropout and a linear map to E -> [B, P, E]. Up to
   here each parcel is processed alone: its features do not depend on which other parcels are
   in the batch or where it sits (see :meth:`ConvAttnDecoder.encode_time`).
4. A learned parcel embedding [P, E] is added so attention knows which region a token is.
5. ``n_layers`` pre-norm transformer layers across parcels (tokens = parcels) -> [B, P, E].
6. Pooling over parcels (learned attention pooling or mean) -> [B, E], MLP head -> [B].

The ``pool`` and ``head`` children form the decoder's "head" (:meth:`head_modules`); everything
else is the backbone that per-participant "head only" fine-tuning freezes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

POOLINGS = ("attention", "mean")
TIME_POOLINGS = ("attention", "last", "mean")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a [N, C, L] tensor, separately at every frame.

    Chosen over BatchNorm so a parcel's features never depend on the rest of the batch (nor on
    train/eval mode), and over GroupNorm so a frame's features never depend on later frames.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class CausalConvBlock(nn.Module):
    """Causal dilated Conv1d -> channel LayerNorm -> GELU: [N, C_in, L] -> [N, C_out, L].

    Left padding of ``(kernel_size - 1) * dilation`` zeros keeps the length and makes frame t
    see only frames <= t. No dropout here: these tensors are the model's largest (one per
    parcel and frame), so dropout is applied once to the much smaller per-parcel summary.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, dilation: int):
        super().__init__()
        self.left_pad = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, dilation=dilation)
        self.norm = ChannelLayerNorm(c_out)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(nn.functional.pad(x, (self.left_pad, 0)))
        return self.act(self.norm(h))

    def forward_last(self, x: torch.Tensor) -> torch.Tensor:
        """Only the last frame of :meth:`forward`: [N, C_in, L] -> [N, C_out, 1], same values.

        It reads just the ``left_pad + 1`` frames that frame L-1 sees, so it skips the work
        for frames that a "last" time summary would throw away.
        """
        window = x[..., -(self.left_pad + 1) :]
        window = nn.functional.pad(window, (self.left_pad + 1 - window.shape[-1], 0))
        return self.act(self.norm(self.conv(window)))


class AttentionPool(nn.Module):
    """Softmax-weighted average over axis 1: [N, S, D] -> [N, D].

    The weight of token s is ``softmax_s(w . h_s + b_s)``; ``b_s`` is an optional learned bias
    per position (used over time, where position carries meaning; not over parcels, whose
    identity is already in the tokens). The score has no scalar bias: softmax would ignore it.
    """

    def __init__(self, dim: int, n_positions: int | None = None):
        super().__init__()
        self.score = nn.Linear(dim, 1, bias=False)
        self.position_bias = None
        if n_positions is not None:
            # Recency prior: start with weights halving every ~1.4 positions into the past,
            # since the target frame and its neighbours carry the most signal.
            steps_back = torch.arange(n_positions - 1, -1, -1, dtype=torch.float32)
            self.position_bias = nn.Parameter(-0.5 * steps_back)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        scores = self.score(h).squeeze(-1)  # [N, S]
        if self.position_bias is not None:
            scores = scores + self.position_bias
        weights = torch.softmax(scores, dim=1)
        return torch.einsum("ns,nsd->nd", weights, h)


class MeanPool(nn.Module):
    """Plain average over axis 1: [N, S, D] -> [N, D]."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(dim=1)


class LastStep(nn.Module):
    """The last position along axis 1: [N, S, D] -> [N, D] (the window's target frame)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, -1]


class ConvAttnDecoder(nn.Module):
    """Pain decoder for causal fMRI windows (see the module docstring for the architecture).

    Args:
        n_parcels: P, parcels per window (the tokens of the cross-parcel attention).
        n_frames: L, frames per window; the last frame is the target frame.
        conv_channels: output channels of each causal conv layer (the conv stack's depth).
        kernel_size: conv kernel length in frames.
        dilation_growth: conv layer i uses dilation ``dilation_growth ** i``.
        embed_dim: E, width of every parcel token.
        n_heads: attention heads (must divide ``embed_dim``).
        n_layers: transformer layers across parcels.
        dropout: dropout on the per-parcel summary, in the transformers' residual branches
            and in the head.
        parcel_embedding: add a learned embedding per parcel to its token. Without it the
            decoder is invariant to the order of the parcels (with either pooling).
        temporal_attention: one transformer layer over the frames of each parcel before the
            time summary (~10x slower to train at P=100, L=22).
        pooling: how to pool parcels: ``"attention"`` (learned weights) or ``"mean"``.
        time_pooling: how to summarise frames per parcel: ``"attention"``, ``"last"`` or
            ``"mean"``.
        ff_dim: feed-forward width of the transformer layers (default ``2 * embed_dim``).
        attention_dropout: dropout on the attention weights (default off: on CPU it makes
            a training step ~30% slower, as it rules out the fused attention kernel).
        init_output: starting value of the output bias, i.e. the untrained prediction
            (0.5 = middle of the 0-1 rating scale).

    Input ``x``: floating-point tensor [B, n_parcels, n_frames]. Output: tensor [B], one pain
    estimate per window, on the scale of the ratings it was trained on (not clipped).
    """

    def __init__(
        self,
        n_parcels: int,
        n_frames: int,
        conv_channels: Sequence[int] = (16, 32),
        kernel_size: int = 5,
        dilation_growth: int = 2,
        embed_dim: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        dropout: float = 0.1,
        parcel_embedding: bool = True,
        temporal_attention: bool = False,
        pooling: str = "attention",
        time_pooling: str = "last",
        ff_dim: int | None = None,
        attention_dropout: float = 0.0,
        init_output: float = 0.5,
    ):
        super().__init__()
        conv_channels = tuple(int(c) for c in conv_channels)
        _check_args(
            n_parcels, n_frames, conv_channels, kernel_size, dilation_growth, embed_dim, n_heads
        )
        _check_choice("pooling", pooling, POOLINGS)
        _check_choice("time_pooling", time_pooling, TIME_POOLINGS)
        self.n_parcels = int(n_parcels)
        self.n_frames = int(n_frames)
        ff_dim = int(ff_dim) if ff_dim is not None else 2 * embed_dim

        self.conv = _conv_stack(conv_channels, kernel_size, dilation_growth)
        step_dim = conv_channels[-1]
        if temporal_attention:
            self.time_in = nn.Linear(step_dim, embed_dim)
            self.time_position = nn.Parameter(torch.zeros(n_frames, embed_dim))
            self.time_encoder = _encoder(
                embed_dim, n_heads, ff_dim, dropout, attention_dropout, n_layers=1
            )
            step_dim = embed_dim
        else:
            self.time_in = self.time_position = self.time_encoder = None
        # Time is summarised before widening to E: the per-frame tensors dominate the cost.
        self.time_pool = _time_pool(time_pooling, step_dim, n_frames)
        self.to_embed = nn.Sequential(nn.Dropout(dropout), nn.Linear(step_dim, embed_dim))

        self.parcel_embedding = nn.Embedding(n_parcels, embed_dim) if parcel_embedding else None
        self.encoder = _encoder(embed_dim, n_heads, ff_dim, dropout, attention_dropout, n_layers)
        self.pool = AttentionPool(embed_dim) if pooling == "attention" else MeanPool()
        self.head = nn.Sequential(
            nn.LayerNorm(embed_dim),
            nn.Linear(embed_dim, embed_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(embed_dim, 1),
        )
        self._init_output(init_output)

    def _init_output(self, value: float) -> None:
        """Start near a constant prediction ``value``: with the default init the untrained
        output would be a random function of the input, several times wider than the ratings."""
        last = self.head[-1]
        with torch.no_grad():
            last.weight.mul_(0.1)
            last.bias.fill_(value)

    def head_modules(self) -> list[nn.Module]:
        """The modules that "head only" fine-tuning trains: parcel pooling and the MLP head."""
        return [self.pool, self.head]

    def encode_time(self, x: torch.Tensor) -> torch.Tensor:
        """Per-parcel temporal features: [B, P', n_frames] -> [B, P', E], for any P'.

        Every parcel goes through the same weights on its own, so a parcel's features depend
        only on its own time course (not on its position or on the other parcels).
        """
        b, p, length = x.shape
        h = x.reshape(b * p, 1, length)
        if self.time_encoder is None and isinstance(self.time_pool, LastStep):
            # Only the last frame survives the summary: compute just that in the last layer.
            h = self.conv[-1].forward_last(self.conv[:-1](h))
        else:
            h = self.conv(h)
        h = h.transpose(1, 2)  # [B*P, L or 1, C]
        if self.time_encoder is not None:
            h = self.time_encoder(self.time_in(h) + self.time_position)  # [B*P, L, E]
        return self.to_embed(self.time_pool(h)).reshape(b, p, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pain estimate per window: x [B, n_parcels, n_frames] float -> [B]."""
        self._check_input(x)
        return self.head(self.pool(self.parcel_tokens(x))).squeeze(-1)

    def parcel_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """One token per parcel after the cross-parcel attention: [B, P, L] -> [B, P, E] (what
        the head pools; self-supervised pretraining reconstructs from it)."""
        tokens = self.encode_time(x)  # [B, P, E]
        if self.parcel_embedding is not None:
            tokens = tokens + self.parcel_embedding.weight
        return self.encoder(tokens)

    def _check_input(self, x: torch.Tensor) -> None:
        expected = f"a (B, {self.n_parcels}, {self.n_frames}) floating-point tensor"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"ConvAttnDecoder expects {expected}, got {type(x).__name__}")
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.n_parcels, self.n_frames):
            raise ValueError(
                f"ConvAttnDecoder expects {expected} (B, parcels, frames), "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"ConvAttnDecoder expects {expected}, got dtype {x.dtype}")


def _encoder(
    embed_dim: int,
    n_heads: int,
    ff_dim: int,
    dropout: float,
    attention_dropout: float,
    n_layers: int,
) -> nn.TransformerEncoder:
    """A pre-norm transformer encoder (batch_first) with a final LayerNorm."""
    layer = nn.TransformerEncoderLayer(
        d_model=embed_dim,
        nhead=n_heads,
        dim_feedforward=ff_dim,
        dropout=dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    # Dropout on the attention weights forces the unfused attention kernel (~30% of a CPU
    # training step at the default size), so it has its own, separate rate.
    layer.self_attn.dropout = attention_dropout
    # Nested tensors only speed up padded batches; ours never are, and pre-norm disables them.
    return nn.TransformerEncoder(
        layer, n_layers, norm=nn.LayerNorm(embed_dim), enable_nested_tensor=False
    )


def _conv_stack(channels: tuple[int, ...], kernel_size: int, dilation_growth: int) -> nn.Sequential:
    """Causal conv blocks 1 -> channels[0] -> ... -> channels[-1], dilation growing per layer."""
    c_in = (1, *channels[:-1])
    return nn.Sequential(
        *(
            CausalConvBlock(ci, co, kernel_size, dilation_growth**i)
            for i, (ci, co) in enumerate(zip(c_in, channels))
        )
    )


def _time_pool(kind: str, dim: int, n_frames: int) -> nn.Module:
    if kind == "attention":
        return AttentionPool(dim, n_positions=n_frames)
    return LastStep() if kind == "last" else MeanPool()


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ConvAttnDecoder: {name} must be one of {choices}, got {value!r}")


def _check_args(
    n_parcels: int,
    n_frames: int,
    conv_channels: tuple[int, ...],
    kernel_size: int,
    dilation_growth: int,
    embed_dim: int,
    n_heads: int,
) -> None:
    positive = {
        "n_parcels": n_parcels,
        "n_frames": n_frames,
        "kernel_size": kernel_size,
        "dilation_growth": dilation_growth,
        "embed_dim": embed_dim,
        "n_heads": n_heads,
    }
    for name, value in positive.items():
        if int(value) < 1:
            raise ValueError(f"ConvAttnDecoder: {name} must be >= 1, got {value}")
    if not conv_channels or min(conv_channels) < 1:
        raise ValueError(
            "ConvAttnDecoder: conv_channels must be a non-empty list of positive ints, "
            f"got {conv_channels}"
        )
    if embed_dim % n_heads:
        raise ValueError(
            f"ConvAttnDecoder: embed_dim ({embed_dim}) must be divisible by n_heads ({n_heads})"
        )
