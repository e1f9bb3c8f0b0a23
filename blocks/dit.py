"""DiT blocks on diffusers parts, conditioned on a continuous per-sample time embedding.

GR00T / starVLA-style action transformers: every block is adaptive LayerNorm (scale and shift
from the time embedding), ONE attention (cross-attention to conditioning tokens, or
self-attention), then LayerNorm + feed-forward; an adaptive-LayerNorm output stage closes the
stack. diffusers' stock ``BasicTransformerBlock`` cannot take a continuous embedding per
sample for its ``ada_norm``, so the block is assembled here from diffusers' ``Attention`` and
``FeedForward``::

    h = x + attn(ada_ln(x, temb), context?)     cross-attention, or self-attention
    h = h + ff(ln(h))
    out = proj_out_2(ln(h) * (1 + scale) + shift),  (shift, scale) = proj_out_1(silu(temb))

Conditioning padding masks are passed to diffusers as additive float masks (a float 0/1 mask
would silently be added as is), so padded context tokens get exactly zero weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlablocks.blocks.device import device_context
from vlablocks.blocks.masks import as_additive_mask


class AdaLayerNorm(nn.Module):
    """``LayerNorm(x) * (1 + scale) + shift`` with ``(scale, shift) = Linear(silu(temb)).chunk(2)``
    (scale first, GR00T's order; diffusers' ``AdaLayerNorm(chunk_dim=1)`` returns shift first).

    Shapes: ``x [B, L, D]``, ``temb [B, T]`` -> ``[B, L, D]``.
    """

    def __init__(
        self,
        dim: int,
        temb_dim: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(temb_dim, 2 * dim, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class DiTBlock(nn.Module):
    """One DiT block: AdaLN -> one attention -> residual -> LayerNorm -> feed-forward -> residual.

    Args:
        dim: token width.
        num_heads: attention heads.
        head_dim: width per head (``num_heads * head_dim`` is the attention width).
        temb_dim: width of the time embedding.
        cross_attention_dim: width of the conditioning tokens for a cross-attention block;
            ``None`` makes a self-attention block.
        ff_mult: feed-forward hidden width as a multiple of ``dim``.
        dropout: dropout in attention and feed-forward.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        temb_dim: int,
        cross_attention_dim: int | None = None,
        ff_mult: int = 4,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.is_cross_attention = cross_attention_dim is not None
        self.norm1 = AdaLayerNorm(dim, temb_dim, norm_eps, device=device, dtype=dtype)
        with device_context(device):
            self.attn = Attention(
                query_dim=dim, cross_attention_dim=cross_attention_dim, heads=num_heads, dim_head=head_dim,
                dropout=dropout, bias=True, out_bias=True,
            ).to(dtype=dtype)
            self.ff = FeedForward(dim, mult=ff_mult, dropout=dropout, activation_fn="gelu-approximate").to(dtype=dtype)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False, device=device, dtype=dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden_states [B, L, D]``, ``temb [B, T]``; a cross-attention block also takes
        ``encoder_hidden_states [B, S, C]`` with ``encoder_mask [B, S]`` bool (True = real)."""
        h = self.norm1(hidden_states, temb)
        if self.is_cross_attention:
            mask = None if encoder_mask is None else as_additive_mask(encoder_mask[:, None, :], h.dtype)
            h = self.attn(h, encoder_hidden_states=encoder_hidden_states, attention_mask=mask)
        else:
            h = self.attn(h)
        hidden_states = hidden_states + h
        return hidden_states + self.ff(self.norm2(hidden_states))


class DiT(nn.Module):
    """A stack of :class:`DiTBlock` with an adaptive-LayerNorm output stage.

    Args:
        num_layers: blocks.
        dim: token width.
        num_heads, head_dim: attention shape.
        temb_dim: time-embedding width.
        cross_attention_dim: conditioning width.
        interleave_self_attention: cross-attention on even blocks and self-attention on odd
            ones (GR00T); ``False``: every block cross-attends (starVLA's layerwise head).
        out_dim: output width (``None``: ``dim``).
        ff_mult, dropout, norm_eps: as in :class:`DiTBlock`.
        gradient_checkpointing: recompute each block in the backward pass.
    """

    def __init__(
        self,
        num_layers: int,
        dim: int,
        num_heads: int,
        head_dim: int,
        temb_dim: int,
        cross_attention_dim: int,
        interleave_self_attention: bool = False,
        out_dim: int | None = None,
        ff_mult: int = 4,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        gradient_checkpointing: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1; got {num_layers}")
        self.blocks = nn.ModuleList(
            DiTBlock(
                dim, num_heads, head_dim, temb_dim,
                cross_attention_dim=None if interleave_self_attention and i % 2 else cross_attention_dim,
                ff_mult=ff_mult, dropout=dropout, norm_eps=norm_eps, device=device, dtype=dtype,
            )
            for i in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False, device=device, dtype=dtype)
        self.proj_out_1 = nn.Linear(temb_dim, 2 * dim, device=device, dtype=dtype)
        self.proj_out_2 = nn.Linear(dim, out_dim or dim, device=device, dtype=dtype)
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def cross_attention_blocks(self) -> tuple[int, ...]:
        """Indices of the blocks that cross-attend to the conditioning."""
        return tuple(i for i, block in enumerate(self.blocks) if block.is_cross_attention)

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        context: Sequence[torch.Tensor] | torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the blocks.

        Args:
            hidden_states: ``[B, L, dim]`` action-side tokens.
            temb: ``[B, temb_dim]`` per-sample time embedding.
            context: conditioning ``[B, S, C]`` shared by every cross-attention block, or one
                tensor per block (layerwise: block ``i`` reads ``context[i]``).
            context_mask: ``[B, S]`` bool, True for real conditioning tokens.

        Returns:
            ``[B, L, out_dim]``.
        """
        per_block = context if isinstance(context, (list, tuple)) else [context] * len(self.blocks)
        if len(per_block) != len(self.blocks):
            raise ValueError(f"context must be one tensor or one per block ({len(self.blocks)}); got {len(per_block)}")
        for block, encoder_states in zip(self.blocks, per_block):
            args = (hidden_states, temb, encoder_states if block.is_cross_attention else None, context_mask)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden_states = checkpoint(block, *args, use_reentrant=False)
            else:
                hidden_states = block(*args)
        shift, scale = self.proj_out_1(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        return self.proj_out_2(self.norm_out(hidden_states) * (1 + scale) + shift)
