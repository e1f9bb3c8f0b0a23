"""What a checkpoint holds beyond the policy to resume a run exactly: the optimizer state and
every process's RNG states, in ``trainer_state.safetensors`` and ``trainer_state.json``.

``trainer_state.safetensors``::

    optimizer.{param}.{key}    AdamW tensors (exp_avg, exp_avg_sq, step) by parameter name
    rng.torch_cpu              [P, n] uint8: torch's CPU RNG state of each of the P processes
    rng.torch_cuda             [P, n] uint8: the CUDA RNG states (when training on CUDA)
    data.loader_generator      the DataLoader generator at the start of the current epoch

``trainer_state.json``: ``format`` (:data:`STATE_FORMAT`), ``step``, ``guard_hits``,
``elapsed_s``, ``num_processes``, ``data`` (epoch, consumed global micro-batches), ``scheduler``,
``optimizer`` (param groups, non-tensor state), ``rng`` (python / numpy states per process) and
``config``. Tensors gathered across processes travel as tensors, JSON as UTF-8 bytes: no pickle.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from vlablocks.io.manifest import read_safetensors, verify_manifest
from vlablocks.policy.vla import WEIGHTS_FILE
from vlablocks.recipes.lora import ADAPTER_WEIGHTS_FILE, is_lora_checkpoint
from vlablocks.train.checkpoint import FULL_STATE

STATE_TENSORS_FILE = "trainer_state.safetensors"
STATE_JSON_FILE = "trainer_state.json"
STATE_FORMAT = "vlablocks.trainer_state/1"


def read_trainer_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(trainer_state.json, trainer_state.safetensors)`` of a checkpoint, after checking that
    it is a trainer checkpoint of this format whose files match its manifest."""
    weights = ADAPTER_WEIGHTS_FILE if is_lora_checkpoint(directory) else WEIGHTS_FILE
    required = (weights, STATE_TENSORS_FILE, STATE_JSON_FILE)
    for name in required:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: not a trainer checkpoint")
    verify_manifest(directory, required=required)
    meta = json.loads((directory / STATE_JSON_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{directory / STATE_JSON_FILE}: format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
    return meta, read_safetensors(directory / STATE_TENSORS_FILE)


# ----------------------------------------------------------------------------------- optimizer


def capture_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state by parameter name (every process joins; under FSDP only the
    main process gets it, the others an empty dict)."""
    return get_optimizer_state_dict(model, optimizer, options=FULL_STATE)


def split_optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A full optimizer state as ``optimizer.{param}.{key}`` tensors and JSON
    ``{"param_groups", "scalars"}`` (``scalars``: its non-tensor per-parameter values)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{name}.{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                      saved: Mapping[str, Any]) -> None:
    """Load what :func:`split_optimizer_state` returned (``saved``: its JSON part) into ``optimizer``."""
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            name, field = key.removeprefix("optimizer.").rsplit(".", 1)
            state.setdefault(name, {})[field] = value
    for name, scalars in saved["scalars"].items():
        state.setdefault(name, {}).update(scalars)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in saved["param_groups"]]
    # strict=False: parameters that never had a gradient have no optimizer state.
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True, strict=False))


# ----------------------------------------------------------------------------------------- RNG


def capture_rng(accelerator: Accelerator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every process's RNG states: torch as ``[P, n]`` uint8 tensors, python / numpy as JSON
    lists ``{"per_process": [...]}`` (every process joins; each gets all of them)."""
    tensors = {"rng.torch_cpu": gather_rows(accelerator, torch.get_rng_state())}
    if accelerator.device.type == "cuda":
        tensors["rng.torch_cuda"] = gather_rows(accelerator, torch.cuda.get_rng_state(accelerator.device))
    python_state = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    local = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
    }
    return tensors, {"per_process": gather_json(accelerator, local)}


def restore_rng(tensors: Mapping[str, torch.Tensor], states: Mapping[str, Any], rank: int,
                device: torch.device) -> None:
    """This process's torch / python / numpy RNG states (``rank``: its row in the checkpoint)."""
    # clone: set_rng_state misreads a row view that does not start its storage
    torch.set_rng_state(tensors["rng.torch_cpu"][rank].clone())
    if device.type == "cuda" and "rng.torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"][rank].clone(), device)
    python, numpy = states["python"], states["numpy"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state((numpy[0], np.asarray(numpy[1], dtype=np.uint32), *numpy[2:]))


def gather_rows(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor [...]`` of every process stacked on the CPU: ``[P, ...]`` (equal shapes only)."""
    if accelerator.num_processes == 1:
        return tensor[None]
    return accelerator.gather(tensor.to(accelerator.device)[None]).cpu()


def gather_json(accelerator: Accelerator, data: Any) -> list[Any]:
    """``data`` of every process (JSON-encoded bytes gathered, no pickle)."""
    if accelerator.num_processes == 1:
        return [data]
    encoded = torch.tensor(list(json.dumps(data).encode()), dtype=torch.uint8)
    lengths = gather_rows(accelerator, torch.tensor([encoded.numel()]))[:, 0].tolist()
    padded = torch.zeros(max(lengths), dtype=torch.uint8)
    padded[: encoded.numel()] = encoded
    rows = gather_rows(accelerator, padded)
    return [json.loads(bytes(row[:n].tolist()).decode()) for row, n in zip(rows, lengths)]
