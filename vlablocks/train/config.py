"""Training settings: :class:`TrainConfig`, the learning-rate schedule, and the config of a
recipe's ``train:`` section (plus ``train.FIELD=value`` overrides)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from vlablocks.recipes.loader import (
    OVERRIDE_SOURCE,
    Recipe,
    RecipeError,
    parse_override_value,
)
from vlablocks.recipes.lora import LoraSettings
from vlablocks.recipes.schema import MAX_SETTING_INT, call_with

#: command-line overrides of a training setting start with this (``train.lr=5e-4``).
TRAIN_PREFIX = "train."


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (the keys a user sets; saved in every checkpoint).

    Attributes:
        steps: optimizer steps to train for.
        batch_size: samples per micro-batch and process.
        lr: peak AdamW learning rate of the ``vision`` and ``other`` groups.
        weight_decay: AdamW decoupled weight decay.
        betas: AdamW betas.
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr`` (both schedules).
        schedule: after the warm-up, ``"cosine"`` (to 0 at ``steps``) or ``"constant"``.
        grad_accumulation: micro-batches accumulated per optimizer step.
        clip_grad_norm: clip the total gradient norm to this (``None``: no clipping).
        guard_max_grad_norm: the gradient guard skips the optimizer step (and counts it) when the
            total gradient norm is non-finite, or above this (``None``: non-finite only).
        max_guard_hits_in_a_row: stop the run with an error (no checkpoint written; the last good
            one stays ``latest``) after this many consecutive steps the guard skipped: a diverged
            run or NaN inputs (``None``: never stop).
        ema_decay: EMA decay of the trainable weights (``None``: no EMA); warmed up as
            ``min(ema_decay, (1 + step) / (10 + step))`` so that a short run's EMA is not half
            its random initialisation (0.999 ** 700 = 0.5).
        mixed_precision: ``"no"`` or ``"bf16"`` (accelerate's autocast; weights, optimizer and
            losses stay fp32).
        gradient_checkpointing: recompute fusion-stack layers, DiT blocks and vision blocks in the backward.
        finetune: what trains (see docs/training.md, "Fine-tuning a loaded policy"): ``"full"``
            (every parameter, less what the ``freeze_*`` options freeze), ``"expert_only"`` (the
            VLM frozen: as ``freeze_vision`` and ``freeze_backbone`` together) or ``"lora"``
            (every weight frozen; peft LoRA adapters on the fusion stack's experts train).
        lora: the adapters of ``finetune: lora`` (default :class:`LoraSettings`); an error with
            another mode.
        freeze_vision: freeze the vision encoder, projector and geometry encoder.
        freeze_backbone: freeze the base expert of the fusion stack and the text embedding.
        backbone_unfreeze_layers: with ``freeze_backbone``, still train the top ``k`` base
            layers and the base final norm.
        backbone_lr_scale: learning-rate multiple of the trainable backbone parameters.
        expert_lr_scale: learning-rate multiple of the non-base experts of the fusion stack.
        seed: seeds the data order, the flow-matching noise and the global RNGs.
        log_every: steps per metrics row (CSV, TensorBoard, progress bar; averaged over the rows' steps).
        save_every: steps between checkpoints (``None``: only at the end).
        num_workers: DataLoader worker processes.
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_accumulation: int = 1
    clip_grad_norm: float | None = 1.0
    guard_max_grad_norm: float | None = None
    max_guard_hits_in_a_row: int | None = 5
    ema_decay: float | None = None
    mixed_precision: Literal["no", "bf16"] = "no"
    gradient_checkpointing: bool = False
    finetune: Literal["full", "expert_only", "lora"] = "full"
    lora: LoraSettings | None = None
    freeze_vision: bool = False
    freeze_backbone: bool = False
    backbone_unfreeze_layers: int = 0
    backbone_lr_scale: float = 1.0
    expert_lr_scale: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int | None = 1000
    num_workers: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        at_least = {"steps": 1, "batch_size": 1, "grad_accumulation": 1, "log_every": 1, "warmup_steps": 0,
                    "backbone_unfreeze_layers": 0, "seed": 0, "num_workers": 0}
        for name, low in at_least.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {low}; got {value!r}")
        for name in ("save_every", "max_guard_hits_in_a_row"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1 or None; got {value!r}")
        for name in ("lr", "backbone_lr_scale", "expert_lr_scale"):
            if not getattr(self, name) > 0:
                hint = " (to keep parameters fixed, freeze them)" if name.endswith("scale") else ""
                raise ValueError(f"TrainConfig.{name} must be > 0{hint}; got {getattr(self, name)!r}")
        for name in ("clip_grad_norm", "guard_max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0 or None; got {value!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0; got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1); got {self.betas!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1) or None; got {self.ema_decay!r}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"TrainConfig.warmup_steps ({self.warmup_steps}) must be <= steps ({self.steps})")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"TrainConfig.schedule must be 'cosine' or 'constant'; got {self.schedule!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"TrainConfig.mixed_precision must be 'no' or 'bf16'; got {self.mixed_precision!r}")
        if self.backbone_unfreeze_layers and not self.backbone_frozen:
            raise ValueError(
                f"TrainConfig.backbone_unfreeze_layers={self.backbone_unfreeze_layers} needs freeze_backbone=True "
                "(without freezing, every backbone layer trains already)"
            )
        self._check_finetune()

    def _check_finetune(self) -> None:
        if self.finetune not in ("full", "expert_only", "lora"):
            raise ValueError(f"TrainConfig.finetune must be 'full', 'expert_only' or 'lora'; got {self.finetune!r}")
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraSettings(**self.lora))
        if self.lora is not None and self.finetune != "lora":
            raise ValueError(f"TrainConfig.lora is set but finetune is {self.finetune!r}; expected finetune='lora' "
                             "(train.finetune=lora), or remove the lora settings")
        if self.finetune == "lora":
            object.__setattr__(self, "lora", self.lora or LoraSettings())
            extra = [f"{name}={getattr(self, name)!r}" for name in ("freeze_vision", "freeze_backbone") if getattr(self, name)]
            extra += [f"{name}={getattr(self, name)!r}" for name in ("backbone_lr_scale", "expert_lr_scale")
                      if getattr(self, name) != 1.0]
            if extra:
                raise ValueError(f"TrainConfig.finetune='lora' freezes every base weight itself and trains the adapters "
                                 f"at lr; expected no {', '.join(extra)}")

    @property
    def vision_frozen(self) -> bool:
        """Whether the vision encoder, projector and geometry encoder are frozen (``freeze_vision`` or ``expert_only``)."""
        return self.freeze_vision or self.finetune == "expert_only"

    @property
    def backbone_frozen(self) -> bool:
        """Whether the base expert and the text embedding are frozen (``freeze_backbone`` or ``expert_only``)."""
        return self.freeze_backbone or self.finetune == "expert_only"

    def to_json(self) -> dict[str, Any]:
        """The config as JSON-ready values."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def lr_factor(config: TrainConfig, step: int) -> float:
    """Learning-rate multiple of the update at 0-based ``step``.

    Warm-up ``(step + 1) / warmup_steps`` for ``step < warmup_steps``; then 1 (``constant``) or
    ``0.5 * (1 + cos(pi * (step - warmup) / (steps - warmup)))`` (``cosine``).
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(recipe overrides, train.* overrides)``."""
    recipe = [o for o in overrides if not o.startswith(TRAIN_PREFIX)]
    return recipe, [o for o in overrides if o.startswith(TRAIN_PREFIX)]


def train_config(recipe: Recipe, train_overrides: Sequence[str] = (), steps: int | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of a recipe's ``train:`` section plus ``train.FIELD=value``
    overrides (and ``steps``, when given); RecipeError naming the source of a bad value."""
    node = dict(recipe.data.get("train") or {})
    for override in train_overrides:
        key, sep, text = override[len(TRAIN_PREFIX) :].partition("=")
        parts = key.split(".")
        if not sep or not all(parts) or len(parts) > 2 or (len(parts) == 2 and parts[0] != "lora"):
            raise RecipeError(f"a training override must look like train.FIELD=value (or train.lora.FIELD=value); got {override!r}",
                              source=OVERRIDE_SOURCE)
        value = parse_override_value(text, OVERRIDE_SOURCE, f"train.{key}")
        if len(parts) == 2:
            lora = node.get("lora")
            node["lora"] = {**(lora if isinstance(lora, dict) else {}), parts[1]: value}
        else:
            node[key] = value
        recipe.sources[f"train.{key}"] = OVERRIDE_SOURCE
        recipe.record_override(f"train.{key}", override)
    if steps is not None:
        node["steps"] = steps
    return call_with(TrainConfig, node, "train", recipe, max_int=MAX_SETTING_INT, converters={
        "lora": lambda value, path: None if value is None else call_with(LoraSettings, value, path, recipe),
    })
