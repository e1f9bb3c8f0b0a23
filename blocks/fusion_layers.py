"""One layer of the deep-fusion stack (:mod:`vlablocks.blocks.fusion`): :class:`DeepFusionBlock`
(joint attention of the experts present at that depth, then per-expert MLPs) and
:class:`CrossAttentionFusionBlock` (SmolVLA: the base self-attends, the other experts attend
only to the base's keys/values of the layer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlablocks.blocks.attention import HeadSpace, KeyValue, KeyValueCrossAttention, MultiExpertAttention
from vlablocks.blocks.attention_layout import RopeTables
from vlablocks.blocks.experts import ExpertSpec, apply_norm, gated_residual
from vlablocks.blocks.experts import every_kth_layer as every_kth_layer  # re-exported
from vlablocks.blocks.experts import first_n_layers as first_n_layers  # re-exported
from vlablocks.blocks.mlp import GatedMlp


class DeepFusionBlock(nn.Module):
    """One joint layer over the experts present at this depth (in stack order).

    Args:
        experts: the specs of the experts that have a layer here.
        head_space: the shared head space.
        attention_backend: ``"sdpa"`` or ``"eager"``.

    Parameter names per expert ``j`` (local order): ``input_norms.j``, ``attention.experts.j``
    (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), ``post_attention_norms.j``, ``mlps.j``.
    An expert with ``share_base_weights`` owns no slot: it runs on slot 0, the base's.
    """

    def __init__(
        self,
        experts: Sequence[ExpertSpec],
        head_space: HeadSpace,
        attention_backend: str = "sdpa",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        owners = [spec for spec in experts if not spec.share_base_weights]
        #: for each local expert, the index of the weight slot it runs on.
        self.slots = tuple(0 if spec.share_base_weights else owners.index(spec) for spec in experts)
        self.input_norms = nn.ModuleList(spec.make_norm(**factory) for spec in owners)
        self.attention = MultiExpertAttention(
            [spec.width for spec in owners],
            head_space,
            bias=[spec.attention_bias for spec in owners],
            backend=attention_backend,
            route=self.slots,
            **factory,
        )
        self.post_attention_norms = nn.ModuleList(spec.make_norm(**factory) for spec in owners)
        self.mlps = nn.ModuleList(GatedMlp(spec.width, spec.mlp_dim, spec.act_layer, **factory) for spec in owners)

    def expert_modules(self, j: int) -> dict[str, nn.Module]:
        """The modules local expert ``j`` owns, by parameter-name prefix (none if it shares the base's)."""
        if j and self.slots[j] == 0:
            return {}
        k = self.slots[j]
        return {
            f"input_norms.{k}": self.input_norms[k],
            f"attention.experts.{k}": self.attention.experts[k],
            f"post_attention_norms.{k}": self.post_attention_norms[k],
            f"mlps.{k}": self.mlps[k],
        }

    def set_backend(self, backend: str) -> None:
        """Switch the attention kernel."""
        self.attention.set_backend(backend)

    def forward(
        self,
        hidden_states: Sequence[torch.Tensor | None],
        rope: RopeTables,
        attention_mask: torch.Tensor,
        past_key_value: KeyValue | None,
        conds: Sequence[torch.Tensor | None],
    ) -> tuple[list[torch.Tensor | None], KeyValue]:
        """Streams ``[B, L_e, W_e]`` (or ``None``) -> updated streams and this call's post-RoPE ``(key, value)``."""
        normed, attn_gates = _pre_norm([self.input_norms[k] for k in self.slots], hidden_states, conds)
        attended, key_value = self.attention(normed, rope.cos, rope.sin, attention_mask, past_key_value)
        outputs = [
            None if x is None else _mlp_residual(self.post_attention_norms[k], self.mlps[k], gated_residual(x, y, gate), cond)
            for x, y, gate, k, cond in zip(hidden_states, attended, attn_gates, self.slots, conds)
        ]
        return outputs, key_value

    def key_value(
        self, hidden_states: Sequence[torch.Tensor | None], rope: RopeTables, conds: Sequence[torch.Tensor | None]
    ) -> KeyValue:
        """Only this call's post-RoPE ``(key, value)``, as :meth:`forward` returns them."""
        normed, _ = _pre_norm([self.input_norms[k] for k in self.slots], hidden_states, conds)
        return self.attention.key_value(normed, rope.cos, rope.sin)


class CrossAttentionFusionBlock(nn.Module):
    """A SmolVLA cross-attention layer: the base attends to itself, the others to the base.

    The base (local expert 0) runs an ordinary self-attention layer over its own tokens. Every
    other present expert's queries (with positions restarting at 0 in its stream) attend only
    to the base's post-RoPE keys/values of this layer (from this call or from the prefix
    cache), re-projected by the expert's own ``k_proj``/``v_proj``
    (:class:`~vlablocks.blocks.attention.KeyValueCrossAttention`). Norms, residuals and MLPs
    are per expert as in :class:`DeepFusionBlock`.

    Parameter names: ``input_norms.j``, ``attention.experts.0`` (the base's q/k/v/o),
    ``cross_attention.{j-1}`` for experts ``j >= 1``, ``post_attention_norms.j``, ``mlps.j``.
    """

    def __init__(
        self,
        experts: Sequence[ExpertSpec],
        head_space: HeadSpace,
        attention_backend: str = "sdpa",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if any(spec.share_base_weights for spec in experts):
            raise ValueError("an expert that shares the base's weights cannot have a cross-attention layer")
        factory = {"device": device, "dtype": dtype}
        base = experts[0]
        self.input_norms = nn.ModuleList(spec.make_norm(**factory) for spec in experts)
        self.attention = MultiExpertAttention([base.width], head_space, bias=base.attention_bias,
                                              backend=attention_backend, **factory)
        self.cross_attention = nn.ModuleList(
            KeyValueCrossAttention(spec.width, head_space, spec.attention_bias, attention_backend, **factory)
            for spec in experts[1:]
        )
        self.post_attention_norms = nn.ModuleList(spec.make_norm(**factory) for spec in experts)
        self.mlps = nn.ModuleList(GatedMlp(spec.width, spec.mlp_dim, spec.act_layer, **factory) for spec in experts)

    def expert_modules(self, j: int) -> dict[str, nn.Module]:
        """The modules local expert ``j`` owns, by parameter-name prefix."""
        attention = {"attention.experts.0": self.attention.experts[0]} if j == 0 else {
            f"cross_attention.{j - 1}": self.cross_attention[j - 1]}
        return {f"input_norms.{j}": self.input_norms[j], **attention,
                f"post_attention_norms.{j}": self.post_attention_norms[j], f"mlps.{j}": self.mlps[j]}

    def set_backend(self, backend: str) -> None:
        """Switch the attention kernel."""
        self.attention.set_backend(backend)
        for cross in self.cross_attention:
            cross.set_backend(backend)

    def forward(
        self,
        hidden_states: Sequence[torch.Tensor | None],
        rope: RopeTables,
        attention_mask: torch.Tensor,
        past_key_value: KeyValue | None,
        conds: Sequence[torch.Tensor | None],
        cross_key_values: Sequence[KeyValue] | None = None,
    ) -> tuple[list[torch.Tensor | None], KeyValue]:
        """As :meth:`DeepFusionBlock.forward`; the returned ``(key, value)`` are the base's.

        ``cross_key_values``: per other expert, the base's keys/values already through its
        ``k_proj``/``v_proj`` (:meth:`cross_key_values` of the cached ones, ``[B, Hkv, P,
        head_dim]`` each); without them each call projects ``past_key_value`` / its own."""
        base = hidden_states[0]
        n_base = 0 if base is None else base.shape[1]
        normed, attn_gates = _pre_norm(self.input_norms, hidden_states, conds)

        attended: list[torch.Tensor | None] = [None] * len(hidden_states)
        key_value = past_key_value
        if base is not None:
            past_len = 0 if past_key_value is None else past_key_value[0].shape[2]
            (attended[0],), key_value = self.attention(
                [normed[0]], rope.cos[:, :n_base], rope.sin[:, :n_base],
                attention_mask[:, :n_base, : past_len + n_base], past_key_value,
            )
        if key_value is None:
            raise ValueError("a cross-attention layer needs the base's keys/values: give the base stream or a cache")
        source_len = key_value[0].shape[2]
        start = n_base
        for j, (h, cross) in enumerate(zip(normed[1:], self.cross_attention), start=1):
            if h is None:
                continue
            rows = slice(start, start + h.shape[1])
            projected = cross.project_key_value(*key_value) if cross_key_values is None else cross_key_values[j - 1]
            attended[j] = cross.attend(h, rope.stream_cos[:, rows], rope.stream_sin[:, rows], *projected,
                                       attention_mask[:, rows, :source_len])
            start += h.shape[1]

        outputs = [
            None if x is None else _mlp_residual(norm, mlp, gated_residual(x, y, gate), cond)
            for x, y, gate, norm, mlp, cond in zip(
                hidden_states, attended, attn_gates, self.post_attention_norms, self.mlps, conds)
        ]
        return outputs, key_value

    def cross_key_values(self, key_value: KeyValue) -> tuple[KeyValue, ...]:
        """The base's ``(key, value) [B, Hkv, P, head_dim]`` re-projected for each other expert
        (local order ``1..``): what :meth:`forward` takes as ``cross_key_values``."""
        return tuple(cross.project_key_value(*key_value) for cross in self.cross_attention)

    def key_value(
        self, hidden_states: Sequence[torch.Tensor | None], rope: RopeTables, conds: Sequence[torch.Tensor | None]
    ) -> KeyValue:
        """The base's post-RoPE ``(key, value)`` of this call, as :meth:`forward` returns them."""
        base = hidden_states[0]
        if base is None or any(x is not None for x in hidden_states[1:]):
            raise ValueError("CrossAttentionFusionBlock.key_value takes the base stream only")
        normed, _ = apply_norm(self.input_norms[0], base, conds[0])
        return self.attention.key_value([normed], rope.cos, rope.sin)


def _pre_norm(
    norms: Sequence[nn.Module], streams: Sequence[torch.Tensor | None], conds: Sequence[torch.Tensor | None]
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Each present stream through its pre-attention norm: ``-> (normed, gates)`` (``None`` where absent)."""
    pairs = [apply_norm(norm, x, cond) if x is not None else (None, None) for norm, x, cond in zip(norms, streams, conds)]
    return [h for h, _ in pairs], [gate for _, gate in pairs]


def _mlp_residual(norm: nn.Module, mlp: nn.Module, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """The second half of a layer: ``x + mlp(norm(x))`` (gated under AdaRMS)."""
    h, gate = apply_norm(norm, x, cond)
    return gated_residual(x, mlp(h), gate)
