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
  :class:`PrefixCache` of post-RoPE keys/values for the layers the other experts need;
- suffix-with-cache: only expert streams, plus the cache, attending ``[cache ; own tokens]``;
- joint: all streams in one pass (training with a language-model loss, or checks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlablocks.blocks.attention import HeadSpace, KeyValue, MultiExpertAttention
from vlablocks.blocks.mlp import ActLayer, GatedMlp
from vlablocks.blocks.norms import AdaRMSNorm, RMSNorm
from vlablocks.blocks.rope import rope_cos_sin


# ------------------------------------------------------------------------------- layer maps


def every_layer(num_layers: int) -> tuple[int, ...]:
    """An expert as deep as the base: a layer at every base layer."""
    return tuple(range(num_layers))


def every_kth_layer(num_layers: int, k: int) -> tuple[int, ...]:
    """An expert with a layer at base layers 0, k, 2k, ... (SmolVLA pairs expert layer j with base layer j*k)."""
    if k < 1:
        raise ValueError(f"every_kth_layer needs k >= 1; got {k}")
    return tuple(range(0, num_layers, k))


def first_n_layers(num_layers: int, n: int) -> tuple[int, ...]:
    """An expert with a layer at each of the first ``n`` base layers."""
    if not 1 <= n <= num_layers:
        raise ValueError(f"first_n_layers needs 1 <= n <= num_layers ({num_layers}); got {n}")
    return tuple(range(n))


# ------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ExpertSpec:
    """Shape and flavour of one expert stream.

    Attributes:
        name: label used in messages (``"vlm"``, ``"action"``, ...).
        width: hidden width.
        mlp_dim: gated-MLP hidden width.
        head_space: the attention head space; every expert of a stack must use the base's.
        layers: base-layer indices at which this expert has a layer (``None``: every layer).
            The base expert (index 0) always has every layer.
        act_layer: MLP activation (``nn.SiLU``: SwiGLU; ``GeluTanh``: Gemma's GeGLU).
        norm_eps: RMSNorm epsilon.
        norm_unit_offset: Gemma's ``(1 + w)`` RMSNorm instead of LLaMA's ``w``.
        adarms_cond_dim: if set, every norm of this expert is an :class:`AdaRMSNorm`
            conditioned on a ``[B, adarms_cond_dim]`` vector (pi0.5 time conditioning) with
            gated residuals.
        attention_bias: biases on q/k/v/o.
    """

    name: str
    width: int
    mlp_dim: int
    head_space: HeadSpace
    layers: tuple[int, ...] | None = None
    act_layer: ActLayer = nn.SiLU
    norm_eps: float = 1e-6
    norm_unit_offset: bool = False
    adarms_cond_dim: int | None = None
    attention_bias: bool = False

    def make_norm(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """This expert's norm layer (RMSNorm or AdaRMSNorm)."""
        if self.adarms_cond_dim is not None:
            return AdaRMSNorm(self.width, self.adarms_cond_dim, eps=self.norm_eps, device=device, dtype=dtype)
        return RMSNorm(self.width, eps=self.norm_eps, unit_offset=self.norm_unit_offset, device=device, dtype=dtype)


def apply_norm(
    norm: nn.Module, x: torch.Tensor, cond: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a plain or adaptive norm: ``-> (normed, gate or None)``."""
    if isinstance(norm, AdaRMSNorm):
        return norm(x, cond)
    return norm(x), None


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``x + y`` or, with an AdaRMS gate, ``x + y * gate``."""
    return x + y if gate is None else x + y * gate


# ------------------------------------------------------------------------------- one layer


class DeepFusionBlock(nn.Module):
    """One joint layer over the experts present at this depth (in stack order).

    Args:
        experts: the specs of the experts that have a layer here.
        head_space: the shared head space.
        attention_backend: ``"sdpa"`` or ``"eager"``.

    Parameter names per expert ``j`` (local order): ``input_norms.j``, ``attention.experts.j``
    (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), ``post_attention_norms.j``, ``mlps.j``.
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
        self.input_norms = nn.ModuleList(spec.make_norm(**factory) for spec in experts)
        self.attention = MultiExpertAttention(
            [spec.width for spec in experts],
            head_space,
            bias=[spec.attention_bias for spec in experts],
            backend=attention_backend,
            **factory,
        )
        self.post_attention_norms = nn.ModuleList(spec.make_norm(**factory) for spec in experts)
        self.mlps = nn.ModuleList(GatedMlp(spec.width, spec.mlp_dim, spec.act_layer, **factory) for spec in experts)

    def forward(
        self,
        hidden_states: Sequence[torch.Tensor | None],
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_value: KeyValue | None,
        conds: Sequence[torch.Tensor | None],
    ) -> tuple[list[torch.Tensor | None], KeyValue]:
        """Streams ``[B, L_e, W_e]`` (or ``None``) -> updated streams and this call's post-RoPE ``(key, value)``."""
        normed, attn_gates = [], []
        for x, norm, cond in zip(hidden_states, self.input_norms, conds):
            h, gate = apply_norm(norm, x, cond) if x is not None else (None, None)
            normed.append(h)
            attn_gates.append(gate)
        attended, key_value = self.attention(normed, cos, sin, attention_mask, past_key_value)

        outputs: list[torch.Tensor | None] = []
        for x, y, gate, norm, mlp, cond in zip(
            hidden_states, attended, attn_gates, self.post_attention_norms, self.mlps, conds
        ):
            if x is None:
                outputs.append(None)
                continue
            x = gated_residual(x, y, gate)
            h, mlp_gate = apply_norm(norm, x, cond)
            outputs.append(gated_residual(x, mlp(h), mlp_gate))
        return outputs, key_value


# ------------------------------------------------------------------------------- the stack


@dataclass(frozen=True)
class PrefixCache:
    """Post-RoPE keys and values of the prefix, per base layer; never modified after creation.

    Attributes:
        keys, values: one entry per base layer, ``[B, Hkv, P, head_dim]``, or ``None`` for
            layers no suffix expert attends at.
    """

    keys: tuple[torch.Tensor | None, ...]
    values: tuple[torch.Tensor | None, ...]

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

    Parameter names: ``layers.i`` (:class:`DeepFusionBlock`, local expert order
    ``layer_experts[i]``), ``final_norms.e`` per expert.
    """

    def __init__(
        self,
        experts: Sequence[ExpertSpec],
        num_layers: int,
        attention_backend: str = "sdpa",
        gradient_checkpointing: bool = False,
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
        factory = {"device": device, "dtype": dtype}
        self.layers = nn.ModuleList(
            DeepFusionBlock([experts[e] for e in present], self.head_space, attention_backend, **factory)
            for present in self.layer_experts
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
            j = present.index(expert)
            parts = {
                f"input_norms.{j}": layer.input_norms[j],
                f"attention.experts.{j}": layer.attention.experts[j],
                f"post_attention_norms.{j}": layer.post_attention_norms[j],
                f"mlps.{j}": layer.mlps[j],
            }
            for prefix, module in parts.items():
                for name, param in module.named_parameters():
                    yield f"layers.{i}.{prefix}.{name}", param
        for name, param in self.final_norms[expert].named_parameters():
            yield f"final_norms.{expert}.{name}", param

    def set_attention_backend(self, backend: str) -> None:
        """Switch every layer's attention kernel (``"sdpa"`` or ``"eager"``)."""
        for layer in self.layers:
            layer.attention.set_backend(backend)

    def forward(
        self,
        hidden_states: Sequence[torch.Tensor | None],
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: PrefixCache | None = None,
        conds: Sequence[torch.Tensor | None] | None = None,
        return_cache: bool = False,
        output_layer_hidden_states: bool = False,
    ) -> FusionOutput:
        """Run the stack over the given expert streams.

        Args:
            hidden_states: per expert ``[B, L_e, W_e]`` or ``None``; present streams form the
                sequence ``Lq = sum(L_e)`` in expert order.
            attention_mask: ``[B, Lq, P + Lq]`` bool (True = attend) or additive float, ``P`` the
                cache length (0 without a cache); see :mod:`vlablocks.blocks.masks`.
            position_ids: ``[B, Lq]`` RoPE positions of the present tokens.
            cache: prefix keys/values to attend to (suffix-with-cache mode).
            conds: per expert ``[B, adarms_cond_dim]`` for AdaRMS experts, else ``None``.
            return_cache: return a :class:`PrefixCache` (prefix-only mode: base stream only).
            output_layer_hidden_states: also return every layer's output streams.
        """
        streams = list(hidden_states)
        conds = list(conds) if conds is not None else [None] * len(self.experts)
        self._check_inputs(streams, conds, cache, return_cache)
        lengths = [0 if x is None else x.shape[1] for x in streams]
        past_len = 0 if cache is None else cache.length
        cos, sin = rope_cos_sin(position_ids, self.head_space.head_dim, self.head_space.rope_theta)

        keys: list[torch.Tensor | None] = [None] * self.num_layers
        values: list[torch.Tensor | None] = [None] * self.num_layers
        per_layer: list[tuple[torch.Tensor | None, ...]] = []
        sliced: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for i, (layer, layer_experts) in enumerate(zip(self.layers, self.layer_experts)):
            active = tuple(e for e in layer_experts if streams[e] is not None)
            if active:
                if active not in sliced:
                    sliced[active] = _slice_tokens(attention_mask, cos, sin, lengths, active, past_len)
                mask_i, cos_i, sin_i = sliced[active]
                past = None if cache is None else (cache.keys[i], cache.values[i])
                inputs = [streams[e] for e in layer_experts]
                layer_conds = [conds[e] for e in layer_experts]
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    outputs, (key, value) = checkpoint(
                        layer, inputs, cos_i, sin_i, mask_i, past, layer_conds, use_reentrant=False
                    )
                else:
                    outputs, (key, value) = layer(inputs, cos_i, sin_i, mask_i, past, layer_conds)
                for e, out in zip(layer_experts, outputs):
                    if out is not None:
                        streams[e] = out
                if return_cache and i in self.cached_layers:
                    keys[i], values[i] = key, value
            if output_layer_hidden_states:
                per_layer.append(tuple(streams))

        final = tuple(
            None if x is None else apply_norm(norm, x, cond)[0]
            for x, norm, cond in zip(streams, self.final_norms, conds)
        )
        return FusionOutput(
            hidden_states=final,
            cache=PrefixCache(tuple(keys), tuple(values)) if return_cache else None,
            layer_hidden_states=tuple(per_layer) if output_layer_hidden_states else None,
        )

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


def _describe(x: torch.Tensor | None) -> str:
    return "None" if x is None else f"a tensor of shape {list(x.shape)}"


def _slice_tokens(
    mask: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    lengths: Sequence[int],
    active: tuple[int, ...],
    past_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Restrict the mask rows/columns and RoPE tables to the tokens of the ``active`` experts.

    Tokens of experts without a layer at this depth neither attend nor are attended to.
    """
    present = [e for e, n in enumerate(lengths) if n > 0]
    if list(active) == present:
        return mask, cos, sin
    starts = [sum(lengths[:e]) for e in range(len(lengths))]
    rows = torch.cat([torch.arange(starts[e], starts[e] + lengths[e], device=mask.device) for e in active])
    cols = torch.cat([torch.arange(past_len, device=mask.device), rows + past_len])
    return mask[:, rows][:, :, cols], cos[:, rows], sin[:, rows]
