"""Deep fusion: a stack of transformer layers shared by several experts through joint attention.

Expert 0 is the base (the VLM: it sees the prefix); the others (an action expert, ...) carry the
suffix. In every layer each present expert applies its own pre-norm, its own q/k/v into the
shared head space, one joint attention, its own o_proj and residual, its own post-norm, gated
MLP and residual (pi0's ``PaliGemmaWithExpertModel``, the LLaVA-3D deep-fusion design):

    for each layer i:
        h_e = x_e + attn_e(norm1_e(x_e))     attn: MultiExpertAttention over the present experts
        x_e = h_e + mlp_e(norm2_e(h_e))      (gated residuals when the norm is AdaRMS)
    out_e = final_norm_e(x_e)

An expert may be shallower than the base: its layer map lists the base layers at which it has
a layer; at other layers its stream passes through unchanged. One ``forward`` serves the three
modes, chosen by which streams are given:

- prefix-only: only the base stream; ``return_cache=True`` returns an immutable
  :class:`PrefixCache` of post-RoPE keys/values for the layers the other experts need
  (``cache_only=True`` skips the work nothing reads: layers past the last cached one, and that
  layer's attention output and MLP);
- suffix-with-cache: only expert streams, plus the cache, attending ``[cache ; own tokens]``;
- joint: all streams in one pass (training with a language-model loss, or checks).

Two variants from the reference designs: an expert may reuse the base's layer weights
(``share_base_weights``, the parameter-shared expert of the LLaVA-3D brief: only its final norm
is its own), and chosen layers may be cross-attention layers (SmolVLA), where the other experts'
queries attend only to the base's keys/values of that layer (see :class:`~vlablocks.blocks.fusion_layers.CrossAttentionFusionBlock`; the layer classes live in
:mod:`vlablocks.blocks.fusion_layers`).

Expert specs and layer maps live in :mod:`vlablocks.blocks.experts` (re-exported here). The
per-layer masks and RoPE tables of a call come from :meth:`DeepFusionStack.layout`
(:mod:`vlablocks.blocks.attention_layout`); a caller that repeats one token layout (the suffix
at every ODE step) builds it once, together with the cache's re-projected cross-attention
keys/values (:meth:`DeepFusionStack.project_cross_key_values`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlablocks.blocks.attention import KeyValue
from vlablocks.blocks.attention_layout import AttentionLayout, RopeTables, attention_layout
from vlablocks.blocks.experts import ExpertSpec, apply_norm, every_layer
from vlablocks.blocks.experts import every_kth_layer as every_kth_layer  # re-exported
from vlablocks.blocks.experts import first_n_layers as first_n_layers  # re-exported
from vlablocks.blocks.fusion_layers import CrossAttentionFusionBlock, DeepFusionBlock
from vlablocks.blocks.mlp import GatedMlp, input_dtype


# ------------------------------------------------------------------------------- the stack


@dataclass(frozen=True)
class PrefixCache:
    """Post-RoPE keys and values of the prefix, per base layer; never modified after creation.

    Attributes:
        keys, values: one entry per base layer, ``[B, Hkv, P, head_dim]``, or ``None`` for
            layers no suffix expert attends at.
        cross_key_values: optional, per base layer: at a cross-attention layer the base's
            keys/values re-projected for each other expert (``((key, value), ...)``, each
            ``[B, Hkv, P, head_dim]``; see :meth:`DeepFusionStack.project_cross_key_values`),
            ``None`` elsewhere. Without them the suffix projects the cached keys/values itself.
    """

    keys: tuple[torch.Tensor | None, ...]
    values: tuple[torch.Tensor | None, ...]
    cross_key_values: tuple[tuple[KeyValue, ...] | None, ...] | None = None

    @property
    def length(self) -> int:
        """Number of cached prefix tokens ``P``."""
        return next(k.shape[2] for k in self.keys if k is not None)


@dataclass(frozen=True)
class FusionOutput:
    """Result of :meth:`DeepFusionStack.forward`.

    Attributes:
        hidden_states: per expert, the final-normed output ``[B, L_e, W_e]`` (``None`` if absent).
        cache: the prefix cache, when asked for.
        layer_hidden_states: when asked for, per base layer ``i`` the streams after layer ``i``
            (not final-normed), each a tuple over experts.
    """

    hidden_states: tuple[torch.Tensor | None, ...]
    cache: PrefixCache | None = None
    layer_hidden_states: tuple[tuple[torch.Tensor | None, ...], ...] | None = field(default=None)


class DeepFusionStack(nn.Module):
    """``num_layers`` joint layers over N experts sharing the base expert's head space.

    Args:
        experts: expert specs; ``experts[0]`` is the base and has every layer.
        num_layers: base depth ``L``.
        attention_backend: ``"sdpa"`` or ``"eager"``.
        gradient_checkpointing: recompute each layer in the backward pass to save memory.
        cross_attention_layers: base layers at which the other experts cross-attend to the
            base instead of attending jointly (SmolVLA: the odd layers).

    Parameter names: ``layers.i`` (a :class:`DeepFusionBlock` or, at cross-attention layers,
    a :class:`CrossAttentionFusionBlock`; local expert order ``layer_experts[i]``),
    ``final_norms.e`` per expert.
    """

    def __init__(
        self,
        experts: Sequence[ExpertSpec],
        num_layers: int,
        attention_backend: str = "sdpa",
        gradient_checkpointing: bool = False,
        cross_attention_layers: Sequence[int] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not experts:
            raise ValueError("DeepFusionStack needs at least one expert (the base); got none")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1; got {num_layers}")
        self.experts = tuple(experts)
        self.num_layers = num_layers
        self.head_space = experts[0].head_space
        self.gradient_checkpointing = gradient_checkpointing
        layer_maps = [self._check_expert(index, spec) for index, spec in enumerate(experts)]
        #: for each base layer, the indices of the experts that have a layer there (stack order).
        self.layer_experts: tuple[tuple[int, ...], ...] = tuple(
            tuple(e for e, layers in enumerate(layer_maps) if i in layers) for i in range(num_layers)
        )
        #: the base layers whose prefix keys/values a prefix cache keeps: those some other expert
        #: attends at (every layer for a base-only stack).
        self.cached_layers: tuple[int, ...] = tuple(sorted({i for layers in layer_maps[1:] for i in layers}))
        self.cached_layers = self.cached_layers or every_layer(num_layers)
        bad = [i for i in cross_attention_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"cross_attention_layers {bad} are out of range for {num_layers} layers (valid 0..{num_layers - 1})")
        self.cross_attention_layers = tuple(sorted(set(cross_attention_layers)))
        factory = {"device": device, "dtype": dtype}
        self.layers = nn.ModuleList(
            (CrossAttentionFusionBlock if i in self.cross_attention_layers and len(present) > 1 else DeepFusionBlock)(
                [experts[e] for e in present], self.head_space, attention_backend, **factory
            )
            for i, present in enumerate(self.layer_experts)
        )
        self.final_norms = nn.ModuleList(spec.make_norm(**factory) for spec in experts)

    def _check_expert(self, index: int, spec: ExpertSpec) -> tuple[int, ...]:
        base = self.experts[0]
        if spec.head_space != self.head_space:
            raise ValueError(
                f"expert {index} ({spec.name!r}) has head space {spec.head_space}, but the base expert "
                f"0 ({base.name!r}) has {self.head_space}. All experts of a deep-fusion stack attend "
                "jointly, so num_heads, num_kv_heads, head_dim and rope_theta must equal the base's; "
                "width, depth and MLP size are free."
            )
        if spec.share_base_weights:
            fields = ("width", "mlp_dim", "act_layer", "norm_eps", "norm_unit_offset", "adarms_cond_dim", "attention_bias")
            differ = {f: (getattr(spec, f), getattr(base, f)) for f in fields if getattr(spec, f) != getattr(base, f)}
            if index == 0 or differ:
                raise ValueError(
                    f"expert {index} ({spec.name!r}) shares the base's weights, so it must be a non-base expert "
                    f"with the base's shape; differing fields (expert, base): {differ}"
                )
        layers = every_layer(self.num_layers) if spec.layers is None else tuple(spec.layers)
        if index == 0 and layers != every_layer(self.num_layers):
            raise ValueError(
                f"the base expert {base.name!r} must have every layer 0..{self.num_layers - 1}; got layers {layers}"
            )
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"layer map of expert {index} ({spec.name!r}) names layers {bad}, but the base has "
                f"{self.num_layers} layers (valid 0..{self.num_layers - 1})"
            )
        if not layers or list(layers) != sorted(set(layers)):
            raise ValueError(
                f"layer map of expert {index} ({spec.name!r}) must be non-empty, strictly increasing "
                f"base-layer indices; got {layers}"
            )
        return layers

    def expert_named_parameters(self, expert: int) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs of one expert, with names as in ``named_parameters()``.

        Useful for freezing (the base) or per-expert learning rates.
        """
        for i, (layer, present) in enumerate(zip(self.layers, self.layer_experts)):
            if expert not in present:
                continue
            for prefix, module in layer.expert_modules(present.index(expert)).items():
                for name, param in module.named_parameters():
                    yield f"layers.{i}.{prefix}.{name}", param
        for name, param in self.final_norms[expert].named_parameters():
            yield f"final_norms.{expert}.{name}", param

    def expert_dtype(self, expert: int) -> torch.dtype:
        """The dtype expert ``expert``'s stream runs in: that of its attention / MLP linears (the
        base's for an expert that shares them), whatever dtype its norms keep
        (:mod:`vlablocks.policy.precision` keeps norms in float32 under bfloat16 weights);
        float32 for dynamically quantised linears, which take float activations."""
        i = next(i for i, present in enumerate(self.layer_experts) if expert in present)
        layer = self.layers[i]
        modules = layer.expert_modules(self.layer_experts[i].index(expert)) or layer.expert_modules(0)
        return input_dtype(next(module.down_proj for module in modules.values() if isinstance(module, GatedMlp)))

    def set_attention_backend(self, backend: str) -> None:
        """Switch every layer's attention kernel (``"sdpa"`` or ``"eager"``)."""
        for layer in self.layers:
            layer.set_backend(backend)

    def layout(
        self,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        lengths: Sequence[int],
        past_len: int = 0,
        mask_dtype: torch.dtype | None = None,
    ) -> AttentionLayout:
        """The per-layer masks and RoPE tables of a call with ``lengths[e]`` tokens of expert
        ``e`` (0: absent) after ``past_len`` cached ones, for :meth:`forward`'s ``layout``.

        ``attention_mask [B, Lq, P + Lq]`` and ``position_ids [B, Lq]`` as in :meth:`forward`;
        ``mask_dtype`` makes a bool mask additive once, in the dtype of the call's queries (see
        :func:`~vlablocks.blocks.attention_layout.attention_dtype`). Build it once and pass it to
        every call with the same layout (the suffix at every ODE step): the result is the same.
        """
        if len(lengths) != len(self.experts):
            raise ValueError(f"expected one length per expert ({len(self.experts)}); got {len(lengths)}")
        return attention_layout(attention_mask, position_ids, lengths, self.layer_experts, self.head_space,
                                past_len, bool(self.cross_attention_layers), mask_dtype)

    def project_cross_key_values(self, cache: PrefixCache) -> PrefixCache:
        """``cache`` with :attr:`PrefixCache.cross_key_values` filled in: at every cross-attention
        layer the cached keys/values re-projected by each other expert's ``k_proj``/``v_proj``
        (``[B, Hkv, P, head_dim]`` each), once per prefix instead of once per suffix call.
        Differentiable (training reaches the projections through it)."""
        projected = tuple(
            layer.cross_key_values((key, value))
            if isinstance(layer, CrossAttentionFusionBlock) and key is not None else None
            for layer, key, value in zip(self.layers, cache.keys, cache.values)
        )
        return replace(cache, cross_key_values=projected)

    def forward(
        self,
        hidden_states: Sequence[torch.Tensor | None],
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: PrefixCache | None = None,
        conds: Sequence[torch.Tensor | None] | None = None,
        return_cache: bool = False,
        output_layer_hidden_states: bool = False,
        num_layers: int | None = None,
        cache_only: bool = False,
        layout: AttentionLayout | None = None,
    ) -> FusionOutput:
        """Run the stack over the given expert streams.

        Args:
            hidden_states: per expert ``[B, L_e, W_e]`` or ``None``; present streams form the
                sequence ``Lq = sum(L_e)`` in expert order. Each is cast to the dtype of its
                expert's linear weights (:meth:`expert_dtype`; not under autocast, which
                picks the compute dtype itself), as are the outputs.
            attention_mask: ``[B, Lq, P + Lq]`` bool (True = attend) or additive float, ``P`` the
                cache length (0 without a cache); see :mod:`vlablocks.blocks.masks`.
            position_ids: ``[B, Lq]`` RoPE positions of the present tokens.
            cache: prefix keys/values to attend to (suffix-with-cache mode).
            conds: per expert ``[B, adarms_cond_dim]`` for AdaRMS experts, else ``None``.
            return_cache: return a :class:`PrefixCache` (prefix-only mode: base stream only).
            cache_only: with ``return_cache``, do only the work the cache needs: stop at the
                last layer in :attr:`cached_layers`, and in it after the keys/values (no
                attention output, no MLP). ``hidden_states`` of the result are then all ``None``.
            output_layer_hidden_states: also return every layer's output streams.
            num_layers: run only the first ``num_layers`` layers (a head that reads early
                layers needs no more); the final norms apply to the last layer run.
            layout: instead of ``attention_mask`` and ``position_ids``, their per-layer form
                precomputed by :meth:`layout` (for the same lengths and cache length).
        """
        streams = list(hidden_states)
        conds = list(conds) if conds is not None else [None] * len(self.experts)
        self._check_inputs(streams, conds, cache, return_cache)
        if cache_only and (not return_cache or output_layer_hidden_states or num_layers is not None):
            raise ValueError("cache_only goes with return_cache=True, without output_layer_hidden_states or num_layers")
        num_layers = self.num_layers if num_layers is None else num_layers
        if not 1 <= num_layers <= self.num_layers:
            raise ValueError(f"num_layers must be in 1..{self.num_layers}; got {num_layers}")
        layout = self._resolve_layout(streams, cache, attention_mask, position_ids, layout)
        streams = [_to_dtype(x, self.expert_dtype(e)) for e, x in enumerate(streams)]
        last_needed = self.cached_layers[-1] if cache_only else None
        keys: list[torch.Tensor | None] = [None] * self.num_layers
        values: list[torch.Tensor | None] = [None] * self.num_layers
        per_layer: list[tuple[torch.Tensor | None, ...]] = []
        for i, (layer, layer_experts) in enumerate(zip(self.layers[:num_layers], self.layer_experts)):
            if layout.layers[i] is not None:
                inputs = [streams[e] for e in layer_experts]
                layer_conds = [conds[e] for e in layer_experts]
                if i == last_needed:
                    keys[i], values[i] = layer.key_value(inputs, layout.layers[i][1], layer_conds)
                    break
                outputs, (key, value) = self._run_layer(i, inputs, layout.layers[i], cache, layer_conds)
                for e, out in zip(layer_experts, outputs):
                    if out is not None:
                        streams[e] = out
                if return_cache and i in self.cached_layers:
                    keys[i], values[i] = key, value
            if output_layer_hidden_states:
                per_layer.append(tuple(streams))

        final = tuple(
            None if x is None or cache_only else apply_norm(norm, x, cond)[0]
            for x, norm, cond in zip(streams, self.final_norms, conds)
        )
        return FusionOutput(
            hidden_states=final,
            cache=PrefixCache(tuple(keys), tuple(values)) if return_cache else None,
            layer_hidden_states=tuple(per_layer) if output_layer_hidden_states else None,
        )

    def _run_layer(
        self,
        i: int,
        inputs: list[torch.Tensor | None],
        layer_inputs: tuple[torch.Tensor, RopeTables],
        cache: PrefixCache | None,
        conds: list[torch.Tensor | None],
    ) -> tuple[list[torch.Tensor | None], KeyValue]:
        """Layer ``i`` over its experts' streams (checkpointed when asked and training)."""
        mask, rope = layer_inputs
        past = None if cache is None else (cache.keys[i], cache.values[i])
        projected = None if cache is None or cache.cross_key_values is None else cache.cross_key_values[i]
        extra = () if projected is None else (projected,)  # only cross-attention layers have them
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.layers[i], inputs, rope, mask, past, conds, *extra, use_reentrant=False)
        return self.layers[i](inputs, rope, mask, past, conds, *extra)

    def _resolve_layout(
        self,
        streams: list[torch.Tensor | None],
        cache: PrefixCache | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        layout: AttentionLayout | None,
    ) -> AttentionLayout:
        """The given ``layout`` (checked against this call) or one built from mask and positions."""
        lengths = tuple(0 if x is None else x.shape[1] for x in streams)
        past_len = 0 if cache is None else cache.length
        if layout is None:
            if attention_mask is None or position_ids is None:
                raise ValueError("DeepFusionStack.forward needs attention_mask and position_ids, or a layout")
            return self.layout(attention_mask, position_ids, lengths, past_len)
        if attention_mask is not None or position_ids is not None:
            raise ValueError("give either a layout or attention_mask and position_ids, not both")
        if (layout.lengths, layout.past_len) != (lengths, past_len):
            raise ValueError(
                f"the layout was built for stream lengths {layout.lengths} after {layout.past_len} cached tokens; "
                f"this call has {lengths} after {past_len}"
            )
        return layout

    def _check_inputs(
        self,
        streams: list[torch.Tensor | None],
        conds: list[torch.Tensor | None],
        cache: PrefixCache | None,
        return_cache: bool,
    ) -> None:
        if len(streams) != len(self.experts) or len(conds) != len(self.experts):
            raise ValueError(
                f"expected one stream and one cond per expert ({len(self.experts)}); "
                f"got {len(streams)} streams and {len(conds)} conds"
            )
        if all(x is None for x in streams):
            raise ValueError("DeepFusionStack.forward needs at least one expert stream; all are None")
        for index, (spec, x, cond) in enumerate(zip(self.experts, streams, conds)):
            if x is None:
                continue
            if x.shape[-1] != spec.width:
                raise ValueError(
                    f"stream of expert {index} ({spec.name!r}) must be [B, L, {spec.width}]; got {list(x.shape)}"
                )
            if (spec.adarms_cond_dim is None) != (cond is None):
                expected = f"a [B, {spec.adarms_cond_dim}] cond" if spec.adarms_cond_dim else "no cond"
                raise ValueError(f"expert {index} ({spec.name!r}) takes {expected}; got {_describe(cond)}")
        if return_cache and any(x is not None for x in streams[1:]):
            raise ValueError("return_cache is the prefix-only mode: give only the base stream (expert 0)")
        if cache is not None:
            if streams[0] is not None:
                raise ValueError("with a cache (suffix mode) the base stream must be None: it lives in the cache")
            if len(cache.keys) != self.num_layers:
                raise ValueError(f"cache has {len(cache.keys)} layers; this stack has {self.num_layers}")
            missing = [i for i in self.cached_layers if cache.keys[i] is None]
            if missing:
                raise ValueError(f"cache lacks keys/values for layers {missing}; build it with return_cache=True")


def _to_dtype(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``x`` in ``dtype``, unless autocast is on for its device (then as given)."""
    if x is None or (torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)):
        return x
    return x.to(dtype)


def _describe(x: torch.Tensor | None) -> str:
    return "None" if x is None else f"a tensor of shape {list(x.shape)}"
