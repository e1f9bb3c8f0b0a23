"""LoRA adapters on the fusion stack's expert linears, through peft (no hand-written adapters).

The adapters wrap the per-expert ``q_proj``/``k_proj``/``v_proj``/``o_proj`` of
:class:`~vlablocks.blocks.attention.MultiExpertAttention` and the ``gate_proj``/``up_proj``/
``down_proj`` of each expert's MLP, inside the policy itself
(``peft.inject_adapter_in_model``: no ``PeftModel`` wrapper, so ``vla(batch)``,
``predict_action`` and the trainer see the same module). The targets are full module names
(``head.denoiser.stack.layers.3.attention.experts.1.q_proj``) chosen through
``DeepFusionStack.expert_named_parameters``, so ``experts: [action]`` selects exactly the action
expert's linears whatever the stack's layer map.

A LoRA checkpoint directory (written by :func:`save_lora_policy`, read by
``vlablocks.recipes.from_pretrained``)::

    recipe.yaml                  the policy's recipe (as ``VLA.save_pretrained`` writes it)
    adapter_config.json          peft's LoraConfig (peft tooling reads it)
    adapter_model.safetensors    the adapter weights, peft's names (``...q_proj.lora_A.weight``)
    model.safetensors            the frozen base policy (plain vlablocks names), or, when the run
                                 started from a checkpoint directory and every base weight stayed frozen:
    base.json                    {"directory": the init checkpoint, "manifest_sha256": sha256 of its manifest.json}
    base_buffers.safetensors     the base's buffers (normalisation statistics set by the run)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from vlablocks.io.atomic import atomic_path, write_json
from vlablocks.io.manifest import (
    MANIFEST_FILE,
    CheckpointError,
    read_safetensors,
    verify_manifest,
)
from vlablocks.policy.vla import VLA, WEIGHTS_FILE

ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's CONFIG_NAME
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
BASE_REFERENCE_FILE = "base.json"
BASE_BUFFERS_FILE = "base_buffers.safetensors"
#: peft's adapter name inside the policy (its state-dict keys read ``lora_A.default.weight``).
ADAPTER_NAME = "default"
#: the linears of an expert that LoRA can wrap (attention projections and the gated MLP).
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters of a ``train.finetune: lora`` run (``train.lora`` in a recipe).

    Attributes:
        rank: the adapters' rank ``r`` (``A [r, in]``, ``B [out, r]``; B starts at zero).
        alpha: scale ``alpha / rank`` of the adapter's output.
        dropout: dropout on the adapter's input (0: none, outputs stay deterministic).
        experts: names of the fusion stack's experts to adapt (``None``: every expert).
        modules: which linears of those experts (a subset of :data:`LORA_MODULES`).
    """

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    experts: tuple[str, ...] | None = None
    modules: tuple[str, ...] = LORA_MODULES

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoraSettings.rank must be an integer >= 1; got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoraSettings.alpha must be > 0; got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings.dropout must be in [0, 1); got {self.dropout!r}")
        modules = tuple(self.modules)
        unknown = [m for m in modules if m not in LORA_MODULES]
        if not modules or unknown or len(set(modules)) != len(modules):
            raise ValueError(f"LoraSettings.modules must be distinct names from {list(LORA_MODULES)}; got {list(modules)!r}")
        object.__setattr__(self, "modules", modules)
        if self.experts is not None:
            experts = tuple(self.experts)
            if not experts or len(set(experts)) != len(experts):
                raise ValueError(f"LoraSettings.experts must be distinct expert names (or None: all); got {list(experts)!r}")
            object.__setattr__(self, "experts", experts)


def target_modules(vla: VLA, settings: LoraSettings) -> list[str]:
    """Full names of the ``nn.Linear`` modules the adapters wrap, in model order.

    Raises:
        ValueError: an expert name the stack does not have (the valid names listed).
    """
    stack = vla.backbone
    names = [spec.name for spec in stack.experts]
    wanted = names if settings.experts is None else list(settings.experts)
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise ValueError(f"train.lora.experts: unknown expert(s) {unknown}; this policy's fusion stack has {names}")
    prefix = next(name for name, module in vla.named_modules() if module is stack)
    owners = {id(p): name.rpartition(".")[0] for index in range(len(names)) if names[index] in wanted
              for name, p in stack.expert_named_parameters(index)}
    targets = [name for name, module in vla.named_modules()
               if isinstance(module, nn.Linear) and name.rpartition(".")[2] in settings.modules
               and name.startswith(f"{prefix}.") and id(module.weight) in owners]
    if not targets:
        raise ValueError(f"train.lora: no {list(settings.modules)} linears in experts {wanted}: nothing to adapt")
    return targets


def lora_config(vla: VLA, settings: LoraSettings) -> LoraConfig:
    """The peft ``LoraConfig`` of ``settings`` on ``vla`` (explicit target module names)."""
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=target_modules(vla, settings), bias="none")


def has_lora(vla: nn.Module) -> bool:
    """Whether peft adapters are injected into ``vla``."""
    return any(isinstance(module, LoraLayer) for module in vla.modules())


def inject_lora(vla: VLA, config: LoraConfig) -> VLA:
    """Wrap ``config.target_modules`` of ``vla`` with LoRA adapters, in place (also on the meta
    device); at initialisation the policy's outputs are unchanged (``B = 0``). Returns ``vla``."""
    if has_lora(vla):
        raise ValueError("the policy already holds LoRA adapters; merge them first (vlablocks export) to add new ones")
    inject_adapter_in_model(config, vla, adapter_name=ADAPTER_NAME)
    return vla


def is_adapter_key(name: str) -> bool:
    """Whether a ``state_dict`` / ``named_parameters`` name belongs to an adapter."""
    return any(part.startswith("lora_") for part in name.split("."))


def adapter_state_dict(vla: VLA) -> dict[str, torch.Tensor]:
    """The adapters' weights with peft's names (``...q_proj.lora_A.weight``), as peft saves them."""
    return get_peft_model_state_dict(vla, adapter_name=ADAPTER_NAME)


def base_state_dict(vla: VLA) -> dict[str, torch.Tensor]:
    """The state dict of the policy without adapters, with plain names (``q_proj.base_layer.weight``
    -> ``q_proj.weight``): what ``from_pretrained`` of the base policy loads."""
    return {name.replace(".base_layer.", "."): tensor for name, tensor in vla.state_dict().items()
            if not is_adapter_key(name)}


def to_policy_state(vla: VLA, base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full ``vla.state_dict()`` (adapters injected) from plain base names and peft adapter names."""
    wrapped = {name for name, module in vla.named_modules() if isinstance(module, LoraLayer)}
    state = {}
    for name, tensor in base.items():
        module, _, leaf = name.rpartition(".")
        state[f"{module}.base_layer.{leaf}" if module in wrapped else name] = tensor
    for name, tensor in adapters.items():
        head, _, leaf = name.rpartition(".")
        state[f"{head}.{ADAPTER_NAME}.{leaf}"] = tensor
    return state


def merge_lora(vla: VLA) -> VLA:
    """Merge every adapter into its base linear (``W += scale * B @ A``, peft's ``merge``) and put
    the plain ``nn.Linear`` back, in place; ``vla.state_dict()`` then has no adapter keys."""
    for name, module in list(vla.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(vla.get_submodule(parent) if parent else vla, child, module.get_base_layer())
    if hasattr(vla, "peft_config"):
        del vla.peft_config
    return vla


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def save_lora_policy(directory: Path, vla: VLA, init: Path | None = None) -> None:
    """The adapters (peft files) and the base of a LoRA policy into ``directory`` (no manifest:
    the caller writes it last); ``recipe.yaml`` is the caller's too.

    ``init``: the checkpoint directory the run started from. When given (with a manifest) and
    every base parameter is frozen, the base is referenced (``base.json``: its path and the
    sha256 of its manifest) with the buffers beside it; otherwise ``model.safetensors`` holds it.
    """
    config = vla.peft_config[ADAPTER_NAME]
    write_json(directory / ADAPTER_CONFIG_FILE, json.loads(json.dumps(config.to_dict(), default=sorted)))
    _save_tensors(directory / ADAPTER_WEIGHTS_FILE, adapter_state_dict(vla))
    base = base_state_dict(vla)
    frozen = all(not p.requires_grad for name, p in vla.named_parameters() if not is_adapter_key(name))
    if init is None or not frozen or not (init / MANIFEST_FILE).is_file():
        _save_tensors(directory / WEIGHTS_FILE, base)
        return
    parameters = {name.replace(".base_layer.", ".") for name, _ in vla.named_parameters()}
    _save_tensors(directory / BASE_BUFFERS_FILE, {k: v for k, v in base.items() if k not in parameters})
    write_json(directory / BASE_REFERENCE_FILE, {"directory": str(init.resolve()),
                                                 "manifest_sha256": sha256_of(init / MANIFEST_FILE)})


def read_lora_base(directory: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """The base state dict (plain names) of a LoRA checkpoint: its ``model.safetensors``, or the
    referenced init checkpoint's (checked against the recorded manifest sha256) plus the buffers.

    Raises:
        CheckpointError: no base weights, or a referenced base that is missing or changed.
    """
    if (directory / WEIGHTS_FILE).is_file():
        return read_safetensors(directory / WEIGHTS_FILE)
    reference_path = directory / BASE_REFERENCE_FILE
    if not reference_path.is_file():
        raise CheckpointError(f"{directory}: a LoRA checkpoint needs its base weights: expected {WEIGHTS_FILE} or "
                              f"{BASE_REFERENCE_FILE}; found neither")
    reference = json.loads(reference_path.read_text(encoding="utf-8"))
    init = Path(str(reference.get("directory")))
    if not (init / MANIFEST_FILE).is_file():
        raise CheckpointError(f"{reference_path}: the base checkpoint {init} (its {MANIFEST_FILE}) is missing; the adapters "
                              "need it (restore it there, or export merged checkpoints while it exists)")
    if verify and sha256_of(init / MANIFEST_FILE) != reference.get("manifest_sha256"):
        raise CheckpointError(f"{reference_path}: the base checkpoint {init} changed since the run (its {MANIFEST_FILE} "
                              "sha256 differs); expected the weights the adapters were trained on")
    verify_manifest(init, required=(WEIGHTS_FILE,), verify=verify)
    state = read_safetensors(init / WEIGHTS_FILE)
    buffers = read_safetensors(directory / BASE_BUFFERS_FILE)
    unknown = sorted(buffers.keys() - state.keys())
    if unknown:
        raise CheckpointError(f"{directory / BASE_BUFFERS_FILE}: tensors {unknown[:5]} are not in the base {init}")
    state.update(buffers)
    return state


def read_lora_config(directory: Path) -> LoraConfig:
    """The ``LoraConfig`` of a LoRA checkpoint (``adapter_config.json``; CheckpointError if not LoRA)."""
    path = directory / ADAPTER_CONFIG_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read as JSON ({err})") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: expected a peft LoRA config (peft_type 'LORA'); got {data.get('peft_type')!r}")
    return LoraConfig.from_peft_type(**data)


def is_lora_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a LoRA policy (``adapter_config.json``)."""
    return (directory / ADAPTER_CONFIG_FILE).is_file()
