"""Who trains at which learning rate: the AdamW parameter groups from the blocks a policy
declares (:meth:`~vlablocks.policy.vla.VLA.param_groups`), and the policy's normalisation from
LeRobot-style dataset statistics."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlablocks.policy.normalize import check_quantile_range
from vlablocks.policy.vla import VLA
from vlablocks.recipes.lora import has_lora, inject_lora, is_adapter_key, lora_config
from vlablocks.train.config import TrainConfig

logger = logging.getLogger(__name__)

#: ``dataset.stats`` feature name -> ``vla.normalizer`` key.
STATS_FEATURES = {"observation.state": "state", "action": "action"}


@dataclass(frozen=True)
class ParameterGroup:
    """Trainable parameters sharing a learning rate (an AdamW group named ``name``)."""

    name: str
    lr: float
    params: dict[str, nn.Parameter]


def parameter_groups(vla: VLA, config: TrainConfig) -> list[ParameterGroup]:
    """The trainable parameters by block, with their learning rates (empty groups left out),
    from the groups the policy declares (:meth:`~vlablocks.policy.vla.VLA.param_groups`).

    ``vision``: vision encoder, projector, geometry encoder (``lr``). ``backbone``: the fusion
    stack's base expert and the text embedding (``lr * backbone_lr_scale``; with
    ``freeze_backbone`` only the top ``backbone_unfreeze_layers`` base layers and the base final
    norm). ``experts``: the stack's other experts (``lr * expert_lr_scale``). ``other``:
    everything else, e.g. suffix encoder, DiT, ``state_proj`` (``lr``), in the model's order.
    Frozen parameters are in no group. ``finetune: expert_only`` freezes as ``freeze_vision`` and
    ``freeze_backbone`` do; ``finetune: lora`` has one group, ``lora``: the adapters (``lr``),
    injected by :func:`apply_finetune`.
    """
    if config.finetune == "lora":
        adapters = {n: p for n, p in vla.named_parameters() if is_adapter_key(n)}
        if not adapters:
            raise ValueError("TrainConfig.finetune='lora' but the policy holds no adapters; apply_finetune(vla, config) injects them")
        return [ParameterGroup("lora", config.lr, adapters)]
    declared = vla.param_groups()
    layers = [name for name in declared if name.startswith("backbone.layers.")]
    k = config.backbone_unfreeze_layers
    num_layers = vla.backbone.num_layers
    if k > num_layers:
        raise ValueError(f"TrainConfig.backbone_unfreeze_layers={k} exceeds the base expert's {num_layers} layers")
    top = {f"backbone.layers.{i}" for i in range(num_layers - k, num_layers)} | ({"backbone.final_norm"} if k else set())
    kinds = {"vision": ("vision", "projector", "geometry"), "backbone": (*layers, "backbone.final_norm", "text"),
             "experts": tuple(name for name in declared if name.startswith("experts."))}
    frozen = {"vision": config.vision_frozen, "backbone": config.backbone_frozen, "experts": False}
    scales = {"vision": 1.0, "backbone": config.backbone_lr_scale, "experts": config.expert_lr_scale}
    groups, claimed = [], set()
    for kind, members in kinds.items():
        trainable = {n: p for name in members if name in declared and (not frozen[kind] or name in top)
                     for n, p in declared[name].items()}
        claimed.update(n for name in members for n in declared.get(name, {}))
        if trainable:
            groups.append(ParameterGroup(kind, config.lr * scales[kind], trainable))
    other = {n: p for n, p in vla.named_parameters() if n not in claimed}
    if other:
        groups.append(ParameterGroup("other", config.lr, other))
    return groups


def apply_finetune(vla: VLA, config: TrainConfig) -> list[ParameterGroup]:
    """Make ``vla`` train as ``config.finetune`` says: inject the LoRA adapters (``lora``; also
    on the meta device), set ``requires_grad`` and return the parameter groups."""
    if config.finetune == "lora" and not has_lora(vla):
        assert config.lora is not None  # TrainConfig sets the default settings
        inject_lora(vla, lora_config(vla, config.lora))
    elif config.finetune != "lora" and has_lora(vla):
        raise ValueError(f"the policy holds LoRA adapters but TrainConfig.finetune is {config.finetune!r}; expected 'lora', "
                         "or merge the adapters first (vlablocks export)")
    groups = parameter_groups(vla, config)
    set_trainable(vla, groups)
    return groups


def set_normalization(vla: VLA, stats: Mapping[str, Mapping[str, Any]]) -> None:
    """Set ``vla.normalizer`` from LeRobot-style ``stats`` (feature -> {mean, std, q01, q99}).

    Features ``"observation.state"`` and ``"action"`` are used; a feature the policy has but
    ``stats`` lacks keeps its statistics (with a warning).

    Raises:
        ValueError: naming the feature, when its statistics are not finite, ``std < 0`` or ``q01 > q99``,
            or (quantile mode, with ``min`` and ``max``) the quantile range is degenerate.
    """
    for feature, key in STATS_FEATURES.items():
        if key not in vla.normalizer:
            continue
        if feature not in stats:
            logger.warning("dataset stats lack %r: vla.normalizer[%r] keeps its statistics", feature, key)
            continue
        values = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in stats[feature].items()
                  if k in ("mean", "std", "q01", "q99")}
        try:
            if vla.normalizer[key].mode == "quantile" and {"q01", "q99", "min", "max"} <= set(stats[feature]):
                check_quantile_range(*(torch.as_tensor(stats[feature][k], dtype=torch.float32)
                                       for k in ("q01", "q99", "min", "max")))
            vla.normalizer[key].set_stats(**values)
        except ValueError as err:
            raise ValueError(f"dataset statistics of {feature!r} (meta/stats.json) cannot normalise: {err}") from err


def set_trainable(vla: VLA, groups: Sequence[ParameterGroup]) -> None:
    """``requires_grad`` of every parameter of ``vla``: True exactly for those in ``groups``."""
    trainable = {id(p) for g in groups for p in g.params.values()}
    for p in vla.parameters():
        p.requires_grad_(id(p) in trainable)


def make_optimizer(groups: Sequence[ParameterGroup], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with one optimizer group per :class:`ParameterGroup` (its ``name`` and ``lr`` kept)."""
    return torch.optim.AdamW(
        [{"params": list(g.params.values()), "lr": g.lr, "name": g.name} for g in groups],
        lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
    )
