"""Multi-expert attention: several token streams, each with its own projections, one attention.

Every expert maps its own width into ONE shared head space (``HeadSpace``); the streams'
queries, keys and values are concatenated along the sequence, rotated with joint positions,
attended once, split back and projected out by each expert's own ``o_proj``. With one expert
this is exactly LLaMA's attention.

    expert 0 [B, L0, W0] --q/k/v_0--\\                               /--o_0--> [B, L0, W0]
                                      concat -> RoPE -> attention -> split
    expert 1 [B, L1, W1] --q/k/v_1--/                               \\--o_1--> [B, L1, W1]
"""

from __future__ import annotations

import math

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlablocks.blocks.masks import as_additive_mask
from vlablocks.blocks.mlp import stacked_linear
from vlablocks.blocks.rope import apply_rope

KeyValue = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class HeadSpace:
    """The attention head space that all experts of one joint attention share.

    Attributes:
        num_heads: query heads.
        num_kv_heads: key/value heads (``num_heads`` for MHA, fewer for GQA, 1 for MQA).
        head_dim: width of one head.
        rope_theta: RoPE base.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"HeadSpace.{name} must be a positive int; got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"HeadSpace.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) so that query heads share key/value heads in equal groups"
            )
        if self.head_dim % 2:
            raise ValueError(f"HeadSpace.head_dim must be even for RoPE; got {self.head_dim}")
        if not 0 < self.rope_theta < math.inf:  # NaN fails too
            raise ValueError(f"HeadSpace.rope_theta must be a finite number > 0; got {self.rope_theta!r}")

    @property
    def query_dim(self) -> int:
        """``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim


# ---------------------------------------------------------------------------------------------
# Attention backends: (query [B, H, Lq, D], key/value [B, Hkv, Lk, D], mask [B, Lq, Lk]) -> [B, H, Lq, D]
# The mask may be bool (True = attend) or additive float; both backends give the same result.
# ---------------------------------------------------------------------------------------------

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def eager_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Reference attention written out: scores, additive mask, float32 softmax, weighted sum."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    scores = scores + as_additive_mask(mask, scores.dtype)[:, None]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value)


def sdpa_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """torch's fused ``scaled_dot_product_attention`` (bool masks made additive so padded rows stay finite)."""
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=as_additive_mask(mask, query.dtype)[:, None],
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )


def grouped_matmul_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention as two matmuls with the query heads of each key/value group stacked as rows
    (``[B, Hkv, G * Lq, D]``: no copy of the keys/values per head, one large matmul instead of
    ``H`` small ones): the fastest on a CPU for short queries over a long cache (the denoise
    step). Float32 softmax, as :func:`eager_attention`; equal to it up to float rounding."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    rows = query.reshape(batch, kv_heads, (heads // kv_heads) * length, dim)
    scores = torch.matmul(rows, key.transpose(-1, -2)) * scale
    additive = as_additive_mask(mask, scores.dtype)[:, None, None]  # [B, 1, 1, Lq, Lk]
    scores = (scores.view(batch, kv_heads, heads // kv_heads, length, -1) + additive).flatten(2, 3)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).view(batch, heads, length, dim)


#: queries per key/value head up to which :func:`auto_attention` takes the grouped matmuls.
GROUPED_MAX_QUERIES = 64


def auto_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """:func:`grouped_matmul_attention` for short queries (``Lq <= GROUPED_MAX_QUERIES``: a
    denoise step's suffix over the cache), :func:`sdpa_attention` for long ones (a prefix pass,
    where torch's fused kernel measured faster on a CPU)."""
    if query.shape[2] <= GROUPED_MAX_QUERIES:
        return grouped_matmul_attention(query, key, value, mask, scale)
    return sdpa_attention(query, key, value, mask, scale)


ATTENTION_BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa_attention, "eager": eager_attention, "grouped_matmul": grouped_matmul_attention,
    "auto": auto_attention,
}


def get_attention_backend(name: str) -> AttentionFn:
    """Look up an attention backend by name; ValueError lists the valid names."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {sorted(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]


class ExpertProjections(nn.Module):
    """One expert's q/k/v/o projections between its width and the shared head space.

    :meth:`fuse` stacks ``q_proj``, ``k_proj`` and ``v_proj`` into one ``qkv_proj`` (one matmul
    instead of three, for inference); :meth:`qkv` and :meth:`kv` work either way.
    """

    def __init__(
        self,
        width: int,
        head_space: HeadSpace,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(width, head_space.query_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(width, head_space.kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(width, head_space.kv_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(head_space.query_dim, width, bias=bias, **factory)
        self.split = (head_space.query_dim, head_space.kv_dim, head_space.kv_dim)

    @property
    def fused(self) -> bool:
        """Whether q/k/v are one ``qkv_proj`` (:meth:`fuse`)."""
        return hasattr(self, "qkv_proj")

    def fuse(self) -> None:
        """Replace ``q_proj``, ``k_proj``, ``v_proj`` by one ``qkv_proj`` with their stacked
        weights (the same outputs up to float rounding). The parameter names change: a fused
        model is for inference, its checkpoints are written before fusing."""
        if self.fused:
            return
        self.qkv_proj = stacked_linear([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, L, W]`` -> ``(q [B, L, H * D], k, v [B, L, Hkv * D])``."""
        if self.fused:
            return self.qkv_proj(x).split(self.split, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, L, W]`` -> ``(k, v [B, L, Hkv * D])``."""
        if self.fused:
            return self.qkv(x)[1:]
        return self.k_proj(x), self.v_proj(x)


class MultiExpertAttention(nn.Module):
    """Joint attention over the token streams of several experts in one shared head space.

    Args:
        widths: hidden width of each expert.
        head_space: the shared head space.
        bias: whether each expert's projections have biases (one flag, or one per expert).
        backend: ``"sdpa"`` (default) or ``"eager"``; see :data:`ATTENTION_BACKENDS`.
        route: for each input stream, the index of the projection set it uses (``None``: stream
            ``e`` uses set ``e``). Two streams routed to one set share weights (an expert that
            reuses the base's projections).

    Any expert may be absent from a call (``None``). Returns each present expert's output and
    the post-RoPE keys/values of this call's tokens (not including ``past_key_value``), which is
    what a prefix cache stores.
    """

    def __init__(
        self,
        widths: Sequence[int],
        head_space: HeadSpace,
        bias: bool | Sequence[bool] = False,
        backend: str = "sdpa",
        route: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("MultiExpertAttention needs at least one expert width; got none")
        biases = [bias] * len(widths) if isinstance(bias, bool) else list(bias)
        if len(biases) != len(widths):
            raise ValueError(f"bias must be one bool or one per expert ({len(widths)}); got {len(biases)}")
        self.route = tuple(range(len(widths))) if route is None else tuple(route)
        if any(not 0 <= k < len(widths) for k in self.route):
            raise ValueError(f"route must index the {len(widths)} projection sets; got {self.route}")
        self.head_space = head_space
        self.scale = head_space.head_dim**-0.5
        self.experts = nn.ModuleList(
            ExpertProjections(w, head_space, b, device=device, dtype=dtype) for w, b in zip(widths, biases)
        )
        self.set_backend(backend)

    def set_backend(self, backend: str) -> None:
        """Switch the attention kernel (``"sdpa"`` or ``"eager"``)."""
        self.attention_fn = get_attention_backend(backend)
        self.backend = backend

    def forward(
        self,
        hidden_states: Sequence[torch.Tensor | None],
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_value: KeyValue | None = None,
    ) -> tuple[list[torch.Tensor | None], KeyValue]:
        """Attend all present streams jointly.

        Args:
            hidden_states: per expert ``[B, L_e, W_e]`` or ``None``; present streams are
                concatenated in expert order into ``Lq = sum(L_e)`` tokens.
            cos, sin: ``[B, Lq, head_dim]`` RoPE tables for the concatenated tokens.
            attention_mask: ``[B, Lq, P + Lq]`` bool (True = attend) or additive float, where
                ``P`` is the length of ``past_key_value`` (0 without one).
            past_key_value: cached post-RoPE ``(key, value)``, each ``[B, Hkv, P, head_dim]``,
                placed before this call's keys.

        Returns:
            ``(outputs, (key, value))``: outputs per expert ``[B, L_e, W_e]`` (``None`` where
            absent); key/value ``[B, Hkv, Lq, head_dim]`` post-RoPE for this call's tokens.
        """
        if len(hidden_states) != len(self.route):
            raise ValueError(f"expected {len(self.route)} expert streams; got {len(hidden_states)}")
        projections, present = self._present(hidden_states)
        space = self.head_space
        queries, keys, values = zip(*(proj.qkv(x) for proj, x in present))
        query = _cat_tokens(queries)
        batch, length, _ = query.shape
        query = apply_rope(query.view(batch, length, space.num_heads, space.head_dim).transpose(1, 2), cos, sin)
        key, value = self._heads(_cat_tokens(keys), _cat_tokens(values), cos, sin)

        all_key, all_value = key, value
        if past_key_value is not None:
            all_key = torch.cat([past_key_value[0].to(key.dtype), key], dim=2)
            all_value = torch.cat([past_key_value[1].to(value.dtype), value], dim=2)
        if attention_mask.shape != (batch, length, all_key.shape[2]):
            raise ValueError(
                f"attention_mask must be [B, Lq, P + Lq] = {[batch, length, all_key.shape[2]]}; "
                f"got {list(attention_mask.shape)}"
            )
        attended = self.attention_fn(query, all_key, all_value, attention_mask, self.scale)
        attended = attended.transpose(1, 2).reshape(batch, length, space.query_dim)

        chunks = iter(attended.split([x.shape[1] for _, x in present], dim=1))
        outputs = [None if x is None else proj.o_proj(next(chunks)) for proj, x in zip(projections, hidden_states)]
        return outputs, (key, value)

    def key_value(
        self, hidden_states: Sequence[torch.Tensor | None], cos: torch.Tensor, sin: torch.Tensor
    ) -> KeyValue:
        """Only this call's post-RoPE ``(key, value)``, ``[B, Hkv, Lq, head_dim]`` each, as
        :meth:`forward` returns them, without the queries, the attention or ``o_proj``
        (the last layer of a prefix pass that only fills a cache)."""
        if len(hidden_states) != len(self.route):
            raise ValueError(f"expected {len(self.route)} expert streams; got {len(hidden_states)}")
        keys, values = zip(*(proj.kv(x) for proj, x in self._present(hidden_states)[1]))
        return self._heads(_cat_tokens(keys), _cat_tokens(values), cos, sin)

    def _present(
        self, hidden_states: Sequence[torch.Tensor | None]
    ) -> tuple[list[ExpertProjections], list[tuple[ExpertProjections, torch.Tensor]]]:
        """Each stream's projection set, and the ``(projections, stream)`` pairs of present streams."""
        projections = [self.experts[k] for k in self.route]
        present = [(proj, x) for proj, x in zip(projections, hidden_states) if x is not None]
        if not present:
            raise ValueError("MultiExpertAttention needs at least one present expert stream")
        return projections, present

    def _heads(self, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> KeyValue:
        """Projected ``key, value [B, L, Hkv * D]`` -> post-RoPE ``[B, Hkv, L, D]`` each."""
        space = self.head_space
        batch, length, _ = key.shape
        key = key.view(batch, length, space.num_kv_heads, space.head_dim).transpose(1, 2)
        value = value.view(batch, length, space.num_kv_heads, space.head_dim).transpose(1, 2)
        return apply_rope(key, cos, sin), value


def _cat_tokens(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the sequence; a single stream is passed through without a copy."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=1)


class KeyValueCrossAttention(nn.Module):
    """One stream's queries attend to another stream's keys/values, re-projected (SmolVLA).

    SmolVLA's cross-attention layers: the action expert's queries attend only to the VLM's
    post-RoPE keys/values of that layer, passed through the expert's own
    ``k_proj``/``v_proj`` (``Linear(kv_dim -> kv_dim)``); the re-projected keys get no second
    rotation.

    Args:
        width: width of the query stream.
        head_space: the shared head space (of the keys/values too).
        bias: biases on the four projections.
        backend: ``"sdpa"`` or ``"eager"``.
    """

    def __init__(
        self,
        width: int,
        head_space: HeadSpace,
        bias: bool = False,
        backend: str = "sdpa",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.head_space = head_space
        self.scale = head_space.head_dim**-0.5
        self.q_proj = nn.Linear(width, head_space.query_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(head_space.kv_dim, head_space.kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(head_space.kv_dim, head_space.kv_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(head_space.query_dim, width, bias=bias, **factory)
        self.set_backend(backend)

    def set_backend(self, backend: str) -> None:
        """Switch the attention kernel (``"sdpa"`` or ``"eager"``)."""
        self.attention_fn = get_attention_backend(backend)
        self.backend = backend

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``hidden_states [B, L, W]`` with RoPE tables ``[B, L, head_dim]`` attend ``key/value
        [B, Hkv, P, head_dim]`` under ``attention_mask [B, L, P]`` -> ``[B, L, W]``.

        The same as :meth:`attend` on :meth:`project_key_value`'s output; a caller that attends
        one source many times (every ODE step over one prefix) projects it once and calls
        :meth:`attend`."""
        return self.attend(hidden_states, cos, sin, *self.project_key_value(key, value), attention_mask)

    def project_key_value(self, key: torch.Tensor, value: torch.Tensor) -> KeyValue:
        """The source's ``key/value [B, Hkv, P, head_dim]`` through this layer's ``k_proj`` /
        ``v_proj`` -> ``(key, value)`` of the same shapes (no second rotation)."""
        space = self.head_space
        batch, _, source, _ = key.shape
        key = self.k_proj(key.transpose(1, 2).reshape(batch, source, space.kv_dim))
        value = self.v_proj(value.transpose(1, 2).reshape(batch, source, space.kv_dim))
        key = key.view(batch, source, space.num_kv_heads, space.head_dim).transpose(1, 2)
        value = value.view(batch, source, space.num_kv_heads, space.head_dim).transpose(1, 2)
        return key, value

    def attend(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Attend already projected ``key/value [B, Hkv, P, head_dim]`` (from
        :meth:`project_key_value`); other shapes as in :meth:`forward`."""
        space = self.head_space
        batch, length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, length, space.num_heads, space.head_dim).transpose(1, 2)
        query = apply_rope(query, cos, sin)
        attended = self.attention_fn(query, key, value, attention_mask, self.scale)
        return self.o_proj(attended.transpose(1, 2).reshape(batch, length, space.query_dim))
