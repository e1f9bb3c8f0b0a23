"""Attention masks and positions in the pi0 / big_vision convention.

Every token carries two marks: ``pad`` (True for a real token) and ``ar`` (an int; a 1 starts a
new causal block). Query ``q`` may attend key ``k`` iff ``cumsum(ar)[k] <= cumsum(ar)[q]`` and
both are real tokens. So a run of zeros is one bidirectional block, a 1 opens a block that sees
every earlier block, and all ones is plain causal attention.

    prefix-LM prefix      ar = [0 0 0 0]
    pi0 suffix            ar = [1 | 1 0 0 ...]    state token, then one block of actions
    pi0.5 suffix          ar = [1 0 0 ...]
    causal (SmolVLA)      ar = [1 1 1 ...]

This module is the only mask builder of the toolkit; every other mask is a slice of this one.
"""

from __future__ import annotations

import torch


def block_causal_mask(pad: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask, True where query ``q`` may attend key ``k``.

    Args:
        pad: ``[B, L]`` bool, True for real tokens.
        ar: ``[B, L]`` or ``[L]`` int/bool block-causal marks.

    Returns:
        ``[B, L, L]`` bool, indexed ``[batch, query, key]``. Rows of padding tokens are all False.
    """
    if pad.dim() != 2:
        raise ValueError(f"pad must be [B, L]; got shape {tuple(pad.shape)}")
    if ar.shape[-1] != pad.shape[-1]:
        raise ValueError(f"ar must have length L={pad.shape[-1]} like pad; got shape {tuple(ar.shape)}")
    pad = pad.bool()
    cumsum = torch.cumsum(ar.long(), dim=-1).expand_as(pad)
    causal = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = pad[:, None, :] & pad[:, :, None]
    return causal & valid


def positions_from_pad(pad: torch.Tensor) -> torch.Tensor:
    """RoPE positions ``cumsum(pad) - 1``: padding does not advance the position. ``[B, L] -> [B, L]``."""
    return torch.cumsum(pad.long(), dim=-1) - 1


def suffix_mask_and_positions(
    prefix_pad: torch.Tensor,
    prefix_ar: torch.Tensor,
    suffix_pad: torch.Tensor,
    suffix_ar: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The suffix rows of the joint mask and positions, for a suffix attending a cached prefix.

    Exactly the last ``S`` rows of :func:`block_causal_mask` and :func:`positions_from_pad`
    over the concatenated sequence, so suffix positions continue from the number of real
    prefix tokens.

    Args:
        prefix_pad, prefix_ar: ``[B, P]``.
        suffix_pad, suffix_ar: ``[B, S]`` (``ar`` may be ``[S]``).

    Returns:
        ``(mask [B, S, P + S] bool, positions [B, S] long)``.
    """
    batch, suffix_len = suffix_pad.shape
    pad = torch.cat([prefix_pad.bool(), suffix_pad.bool()], dim=1)
    ar = torch.cat([prefix_ar.long().expand(batch, -1), suffix_ar.long().expand(batch, -1)], dim=1)
    return block_causal_mask(pad, ar)[:, -suffix_len:], positions_from_pad(pad)[:, -suffix_len:]


def as_additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn an attention mask into the additive form that attention kernels add to the scores.

    A bool mask (True = attend) becomes 0 / ``finfo(dtype).min``: a finite value, so a fully
    masked row (a padding query) gets a uniform softmax and finite output instead of NaN. A
    floating mask is taken as already additive and only cast. Integer masks are ambiguous
    (0/1 "keep" masks added to scores are silently wrong) and are rejected.

    ``[..., Lq, Lk] -> [..., Lq, Lk]`` in ``dtype``.
    """
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    if mask.is_floating_point():
        return mask.to(dtype)
    raise TypeError(
        f"attention mask must be bool (True = attend) or an additive float mask; got dtype {mask.dtype}"
    )
