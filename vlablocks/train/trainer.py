"""One trainer for every recipe, on HF accelerate: single process, DDP and FSDP alike.

::

    dataset ── ShardedEpochSampler (seed, epoch, offset) ── DataLoader(collate) ── micro-batches
        │                                                                      │
    stats ─┴─ set_normalization(vla)               accelerator.accumulate(model) x grad_accumulation
                                                   loss = vla(batch, generator=noise(step, micro, rank))
                                                                               │
    clip_grad_norm ── guard (skip non-finite / too large) ── AdamW(named groups) ── scheduler ── EMA
                                                                               │
    metrics.csv · TensorBoard · curves.png · tqdm        checkpoints/step_{N:07d}/ (+ checkpoints/latest)

Run the same script with ``python train.py``, ``torchrun --nproc_per_node N train.py`` or
``accelerate launch --config_file docs/accelerate/<setup>.yaml train.py`` (``ddp_cpu``,
``ddp_gpu``, ``fsdp_gpu``; see the comments in each file)::

    trainer = Trainer(build("llava3d_deepfusion"), dataset, TrainConfig(steps=30_000, freeze_backbone=True), "runs/e1")
    trainer.train()

Batches: ``batch_size`` is per process and per micro-batch; one optimizer step sees
``batch_size * num_processes * grad_accumulation`` samples. Global micro-batch ``j`` of an epoch
is ``permutation(seed, epoch)[j * batch_size : (j + 1) * batch_size]`` and process ``r`` takes the
``j = c * num_processes + r``; the flow-matching noise of the run's ``n``-th global micro-batch
comes from a generator seeded by ``(seed, n)``. So 2 processes with accumulation 1 and 1 process
with accumulation 2 see the same samples with the same noise (their gradients agree up to
rounding), and a resumed run continues exactly where the interrupted one stopped.

Checkpoint ``out_dir/checkpoints/step_{N:07d}/`` (written into a hidden temporary directory,
each file atomically, then renamed into place; never pickled)::

    model.safetensors, recipe.yaml   the policy (``vlablocks.recipes.from_pretrained(dir)``), live weights
    ema.safetensors                  with ``ema_decay``: the policy's full state dict with the EMA
                                     weights (``load_ema_policy(dir)``); also the EMA state on resume
    trainer_state.safetensors        optimizer tensors (``optimizer.{param}.{key}``), torch RNG
                                     states per process, the DataLoader generator at the epoch start
    trainer_state.json               step, epoch position, scheduler, guard hits, optimizer groups,
                                     python / numpy RNG states per process, the config
    manifest.json                    sizes and sha256 checksums of the files above (per tensor for
                                     safetensors), written last; checked by ``resume`` and
                                     ``from_pretrained`` (:mod:`vlablocks.io.manifest`)

The EMA (of the trainable parameters, updated after every applied step) is what you deploy:
``load_ema_policy(checkpoint)`` or, on the live model, ``with trainer.ema_weights(): evaluate()``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, send_to_device, set_seed
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from tqdm.auto import tqdm

from vlablocks.policy.batch import collate
from vlablocks.io.manifest import read_safetensors, verify_manifest, write_manifest
from vlablocks.io.atomic import atomic_path, write_json
from vlablocks.policy.vla import RECIPE_FILE, VLA, WEIGHTS_FILE
from vlablocks.train.checkpoint import (
    CHECKPOINTS_DIR,
    EMA_FILE,
    LATEST_FILE,
    STATE_FORMAT,
    STATE_JSON_FILE,
    STATE_TENSORS_FILE,
    latest_checkpoint,
    load_ema_policy,
    publish_directory,
    recover_checkpoints,
    save_tensors,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"

#: ``dataset.stats`` feature name -> ``vla.normalizer`` key.
STATS_FEATURES = {"observation.state": "state", "action": "action"}

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_NOISE_STREAM, _EPOCH_STREAM, _LOADER_STREAM = 1, 2, 3


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


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
        ema_decay: EMA decay of the trainable weights (``None``: no EMA); warmed up as
            ``min(ema_decay, (1 + step) / (10 + step))`` so that a short run's EMA is not half
            its random initialisation (0.999 ** 700 = 0.5).
        mixed_precision: ``"no"`` or ``"bf16"`` (accelerate's autocast; weights, optimizer and
            losses stay fp32).
        gradient_checkpointing: recompute fusion-stack layers, DiT blocks and vision blocks in the backward.
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
    ema_decay: float | None = None
    mixed_precision: Literal["no", "bf16"] = "no"
    gradient_checkpointing: bool = False
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
        if self.save_every is not None and (not isinstance(self.save_every, int) or self.save_every < 1):
            raise ValueError(f"TrainConfig.save_every must be an integer >= 1 or None; got {self.save_every!r}")
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
        if self.backbone_unfreeze_layers and not self.freeze_backbone:
            raise ValueError(
                f"TrainConfig.backbone_unfreeze_layers={self.backbone_unfreeze_layers} needs freeze_backbone=True "
                "(without freezing, every backbone layer trains already)"
            )

    def to_json(self) -> dict[str, Any]:
        """The config as JSON-ready values."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA decay used after optimizer step ``step`` (0-based): warmed up from 0.1 towards ``decay``."""
    return min(decay, (1.0 + step) / (10.0 + step))


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


# ---------------------------------------------------------------------------------------------
# Parameter groups, normalisation, data
# ---------------------------------------------------------------------------------------------


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
    Frozen parameters are in no group.
    """
    declared = vla.param_groups()
    layers = [name for name in declared if name.startswith("backbone.layers.")]
    k = config.backbone_unfreeze_layers
    num_layers = vla.backbone.num_layers
    if k > num_layers:
        raise ValueError(f"TrainConfig.backbone_unfreeze_layers={k} exceeds the base expert's {num_layers} layers")
    top = {f"backbone.layers.{i}" for i in range(num_layers - k, num_layers)} | ({"backbone.final_norm"} if k else set())
    kinds = {"vision": ("vision", "projector", "geometry"), "backbone": (*layers, "backbone.final_norm", "text"),
             "experts": tuple(name for name in declared if name.startswith("experts."))}
    frozen = {"vision": config.freeze_vision, "backbone": config.freeze_backbone, "experts": False}
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


def set_normalization(vla: VLA, stats: Mapping[str, Mapping[str, Any]]) -> None:
    """Set ``vla.normalizer`` from LeRobot-style ``stats`` (feature -> {mean, std, q01, q99}).

    Features ``"observation.state"`` and ``"action"`` are used; a feature the policy has but
    ``stats`` lacks keeps its statistics (with a warning).
    """
    for feature, key in STATS_FEATURES.items():
        if key not in vla.normalizer:
            continue
        if feature not in stats:
            logger.warning("dataset stats lack %r: vla.normalizer[%r] keeps its statistics", feature, key)
            continue
        values = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in stats[feature].items()
                  if k in ("mean", "std", "q01", "q99")}
        vla.normalizer[key].set_stats(**values)


class ShardedEpochSampler(Sampler[list[int]]):
    """One process's micro-batches of a seeded per-epoch permutation, resumable mid-epoch.

    Epoch ``e`` permutes the dataset with a generator seeded by ``(seed, e)`` and cuts it into
    global micro-batches of ``batch_size`` (the incomplete tail, and micro-batches that would
    leave the processes unequal, are dropped); process ``rank`` takes ``j = c * num_replicas +
    rank`` for ``c = start, start + 1, ...``.
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int, rank: int, seed: int) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.batches_per_epoch = num_samples // (batch_size * num_replicas)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global micro-batch "
                f"(batch_size {batch_size} x {num_replicas} processes)"
            )
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from this process's micro-batch ``start``."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, _EPOCH_STREAM, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        for c in range(self.start, self.batches_per_epoch):
            j = c * self.num_replicas + self.rank
            yield order[j * self.batch_size : (j + 1) * self.batch_size]


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for the stream ``keys`` of ``seed``."""
    low, high = np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint32)
    return (int(high) << 31) ^ int(low)


# ---------------------------------------------------------------------------------------------
# Checkpoint helpers
# ---------------------------------------------------------------------------------------------


class StopSignal:
    """Turns SIGTERM into a request to stop after the current step (while entered).

    A second SIGTERM goes to the previous handler (by default: terminate now; the checkpoint
    writes are atomic, so the last complete checkpoint survives). Outside the main thread no
    handler can be installed and ``requested`` stays False.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGTERM, self._previous)
        logger.warning("SIGTERM: stopping after this step and writing a checkpoint (send it again to stop now)")

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None and not self.requested:
            signal.signal(signal.SIGTERM, self._previous)


def _window_mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _window_max(values: Sequence[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else max(values)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StepStats:
    loss: float
    vel_cosine: float
    grad_total_norm: float
    grad_max_abs: float
    lrs: dict[str, float]
    seconds: float


class Trainer:
    """Trains a :class:`~vlablocks.policy.vla.VLA` on a map-style dataset (see the module docstring).

    The trainer owns trainability: it sets ``requires_grad`` of every parameter from the
    config's freezing options, sets the policy's normalisation from ``dataset.stats`` (unless
    the policy has statistics already) and switches gradient checkpointing on the fusion stack
    and the DiT.

    Args:
        vla: the policy (moved to the accelerator's device; trained in place).
        dataset: a map-style dataset of dicts with the batch keys (:mod:`vlablocks.policy.batch`);
            optional ``stats`` (LeRobot ``meta/stats``: feature -> {mean, std, q01, q99}) and
            ``collate`` (default :func:`collate`).
        config: the training settings.
        out_dir: where metrics, plots, TensorBoard logs and checkpoints go.
    """

    def __init__(self, vla: VLA, dataset: Dataset, config: TrainConfig, out_dir: str | Path) -> None:
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"the dataset must be map-style (with __len__ and __getitem__); got {type(dataset).__name__}"
            )
        self.config = config
        self.out_dir = Path(out_dir)
        self.accelerator = _make_accelerator(config)
        accel = self.accelerator
        set_seed(config.seed, device_specific=True)

        stats = getattr(dataset, "stats", None)
        if stats is not None and not vla.has_normalization_stats():
            set_normalization(vla, stats)
        elif stats is None and not vla.has_normalization_stats():
            logger.warning("neither the dataset nor the policy has normalisation statistics: training on raw units")
        if config.gradient_checkpointing:
            vla.set_gradient_checkpointing(True)

        groups = parameter_groups(vla, config)
        trainable = {id(p) for g in groups for p in g.params.values()}
        for p in vla.parameters():
            p.requires_grad_(id(p) in trainable)
        optimizer = torch.optim.AdamW(
            [{"params": list(g.params.values()), "lr": g.lr, "name": g.name} for g in groups],
            lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
        )
        self.group_names = [g.name for g in groups]
        self.vla = vla
        self.model, self.optimizer = accel.prepare(vla, optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, lambda step: lr_factor(config, step)
        )
        self._sharded = accel.distributed_type == DistributedType.FSDP
        self._trainable = [(n, p) for n, p in accel.unwrap_model(self.model).named_parameters() if p.requires_grad]
        self._ema = [p.detach().clone() for _, p in self._trainable] if config.ema_decay is not None else None

        self.sampler = ShardedEpochSampler(len(dataset), config.batch_size, accel.num_processes,
                                           accel.process_index, config.seed)
        self._loader_generator = torch.Generator().manual_seed(derive_seed(config.seed, _LOADER_STREAM))
        self.loader = DataLoader(
            dataset, batch_sampler=self.sampler, collate_fn=getattr(dataset, "collate", collate),
            num_workers=config.num_workers, generator=self._loader_generator,
            pin_memory=accel.device.type == "cuda",
        )
        self._noise = torch.Generator(device=accel.device)

        self.step = 0
        self.guard_hits = 0
        self._epoch = 0
        self._batch_in_epoch = 0
        self._epoch_generator_state: torch.Tensor | None = None
        self._elapsed = 0.0
        self._rows: list[dict[str, float]] = []
        self._resumed = False
        self.interrupted = False
        frozen = sum(p.numel() for p in vla.parameters() if not p.requires_grad)
        for g in groups:
            logger.info("group %-8s lr %.3g, %d parameters", g.name, g.lr, sum(p.numel() for p in g.params.values()))
        logger.info(
            "%d frozen parameters; %d processes x batch %d x accumulation %d = %d samples per step",
            frozen, accel.num_processes, config.batch_size, config.grad_accumulation, self.samples_per_step,
        )

    @property
    def samples_per_step(self) -> int:
        """Samples per optimizer step, over all processes."""
        return self.config.batch_size * self.accelerator.num_processes * self.config.grad_accumulation

    # ----------------------------------------------------------------------------- training

    def train(self) -> dict[str, float]:
        """Train until ``config.steps``; return the last metrics row (see ``metrics.csv``).

        On SIGTERM (a scheduler's pre-emption, ``kill``) the current step finishes, a checkpoint
        is written and ``train`` returns early with ``self.interrupted`` set; ``resume`` continues
        from that checkpoint without losing a step.
        """
        config, accel = self.config, self.accelerator
        main = accel.is_main_process
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if main and (self.out_dir / CHECKPOINTS_DIR).is_dir():
            recover_checkpoints(self.out_dir / CHECKPOINTS_DIR)
        writer = self._tensorboard() if main else None
        clock = (time.perf_counter(), self._elapsed)
        bar = tqdm(total=config.steps, initial=self.step, disable=not main, desc="train", dynamic_ncols=True)
        stream = self._micro_batches()
        window: list[_StepStats] = []
        self.model.train()
        self.interrupted = False
        try:
            with StopSignal() as stop:
                while self.step < config.steps:
                    window.append(self._train_step(stream))
                    self.step += 1
                    bar.update(1)
                    self.interrupted = self._agree(stop.requested)
                    if self._end_of_step(window, writer, clock, bar):
                        window = []
                    if self.interrupted:
                        logger.warning("stopped by SIGTERM at step %d of %d", self.step, config.steps)
                        break
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return dict(self._rows[-1]) if self._rows else {}

    def _agree(self, requested: bool) -> bool:
        """Whether any process was asked to stop (every process must stop at the same step)."""
        if self.accelerator.num_processes == 1:
            return requested
        flag = torch.tensor([float(requested)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _end_of_step(self, window: list[_StepStats], writer: Any, clock: tuple[float, float], bar: Any) -> bool:
        """Log (and checkpoint) after a step as the config says; True if ``window`` was logged."""
        config = self.config
        last = self.step == config.steps or self.interrupted
        logged = self.step % config.log_every == 0 or last
        if logged:
            row = self._log(window, writer, clock)
            bar.set_postfix(loss=f"{row['loss']:.4f}", vel_cos=f"{row['vel_cosine']:.3f}",
                            lr=f"{max(window[-1].lrs.values()):.2e}", samples_s=f"{row['samples_per_s']:.1f}")
        if (config.save_every and self.step % config.save_every == 0) or last:
            self.save_checkpoint()
        return logged

    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches on the device, epoch after epoch, from the recorded position."""
        while True:
            if self._batch_in_epoch >= self.sampler.batches_per_epoch:
                self._epoch, self._batch_in_epoch, self._epoch_generator_state = self._epoch + 1, 0, None
            if self._epoch_generator_state is None:
                self._epoch_generator_state = self._loader_generator.get_state()
            else:  # resumed mid-epoch: the loader draws its worker seed as the original epoch did
                self._loader_generator.set_state(self._epoch_generator_state)
            self.sampler.set_epoch(self._epoch, self._batch_in_epoch)
            for batch in self.loader:
                self._batch_in_epoch += 1
                yield send_to_device(batch, self.accelerator.device, non_blocking=True)

    def _noise_generator(self, micro: int) -> torch.Generator:
        """The flow-matching noise of global micro-batch ``(step * accumulation + micro) * P + rank``."""
        accel = self.accelerator
        index = (self.step * self.config.grad_accumulation + micro) * accel.num_processes + accel.process_index
        return self._noise.manual_seed(derive_seed(self.config.seed, _NOISE_STREAM, index))

    def _train_step(self, stream: Iterator[dict[str, Any]]) -> _StepStats:
        """One optimizer step over ``grad_accumulation`` micro-batches, with the gradient guard."""
        config, accel = self.config, self.accelerator
        start = time.perf_counter()
        losses, cosines = [], []
        for micro in range(config.grad_accumulation):
            batch = next(stream)
            with accel.accumulate(self.model):
                out = self.model(batch, generator=self._noise_generator(micro))
                accel.backward(out.loss)
            losses.append(out.loss.detach().float())
            cosines.append(out.vel_cosine.detach().float())
        if not accel.sync_gradients:
            raise RuntimeError("gradients were not synchronised at the end of the accumulation window")
        if self.step == 0 and accel.is_main_process:
            self._warn_gradient_free()
        grad_norm = accel.clip_grad_norm_(self.model.parameters(), config.clip_grad_norm or math.inf)
        metrics = torch.stack([torch.stack(losses).mean(), torch.stack(cosines).mean()])
        metrics = accel.reduce(metrics, reduction="mean")
        stats = torch.cat([metrics, torch.as_tensor(grad_norm, dtype=torch.float32, device=metrics.device).reshape(1),
                           self._grad_max_abs().reshape(1)])
        loss, vel_cosine, norm, max_abs = stats.tolist()
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        if math.isfinite(norm) and (config.guard_max_grad_norm is None or norm <= config.guard_max_grad_norm):
            self.optimizer.step()
            self._update_ema()
        else:
            self.guard_hits += 1
            logger.warning("step %d: gradient guard skipped the update (total grad norm %s)", self.step + 1, norm)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # the schedule advances on skipped steps too
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        return _StepStats(loss, vel_cosine, norm, max_abs, lrs, time.perf_counter() - start)

    def _grad_max_abs(self) -> torch.Tensor:
        grads = [p.grad for _, p in self._trainable if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        if not grads:
            return torch.zeros((), device=self.accelerator.device)
        value = torch.stack(torch._foreach_norm(grads, math.inf)).max().float()
        if self._sharded:
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return value

    def _warn_gradient_free(self) -> None:
        missing = [n for n, p in self._trainable if p.grad is None]
        if missing:
            logger.warning(
                "%d trainable parameters got no gradient in the first step, so they will not change: %s%s. "
                "The flow-matching loss does not reach them (in deep fusion: base-layer parts above the "
                "expert's last layer and the base final norm).",
                len(missing), ", ".join(missing[:8]), " ..." if len(missing) > 8 else "",
            )

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self._ema is not None:
            params = [p.detach() for _, p in self._trainable]
            torch._foreach_lerp_(self._ema, params, 1.0 - ema_decay_at(self.config.ema_decay, self.step))

    @torch.no_grad()
    def _reset_ema(self) -> None:
        """EMA := the current trainable weights."""
        if self._ema is not None:
            torch._foreach_copy_(self._ema, [p.detach() for _, p in self._trainable])

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the block the model's trainable parameters hold the EMA weights."""
        if self._ema is None:
            raise ValueError("this trainer keeps no EMA: set TrainConfig.ema_decay")
        params = [p.detach() for _, p in self._trainable]
        with torch.no_grad():
            live = [p.clone() for p in params]
            torch._foreach_copy_(params, self._ema)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, live)

    # ----------------------------------------------------------------------------- metrics

    def _log(self, window: list[_StepStats], writer: Any, clock: tuple[float, float]) -> dict[str, float]:
        """Append the metrics row of ``window`` (``clock``: this session's start and the run's time then)."""
        seconds = sum(s.seconds for s in window)
        self._elapsed = clock[1] + time.perf_counter() - clock[0]
        row: dict[str, float] = {
            "step": self.step,
            "loss": _window_mean([s.loss for s in window]),
            "vel_cosine": _window_mean([s.vel_cosine for s in window]),
            "grad_total_norm": _window_mean([s.grad_total_norm for s in window]),
            "grad_max_abs": _window_max([s.grad_max_abs for s in window]),
            "guard_hits": self.guard_hits,
            **{f"lr_{name}": lr for name, lr in window[-1].lrs.items()},
            "samples_per_s": len(window) * self.samples_per_step / max(seconds, 1e-9),
            "wall_time_s": self._elapsed,
        }
        self._rows.append(row)
        if writer is not None:
            for key, value in row.items():
                if key != "step":
                    tag = f"lr/{key.removeprefix('lr_')}" if key.startswith("lr_") else f"train/{key}"
                    writer.add_scalar(tag, value, self.step)
            self._write_metrics()
        return row

    def _columns(self) -> list[str]:
        return ["step", "loss", "vel_cosine", "grad_total_norm", "grad_max_abs", "guard_hits",
                *[f"lr_{name}" for name in self.group_names], "samples_per_s", "wall_time_s"]

    def _write_metrics(self) -> None:
        with atomic_path(self.out_dir / METRICS_FILE) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=self._columns(), extrasaction="ignore", restval="")
                writer.writeheader()
                writer.writerows(self._rows)

    def _tensorboard(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        purge = self.step + 1 if self._resumed else None  # drop events logged past the checkpoint
        return SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=purge)

    def write_curves(self) -> Path:
        """Plot the metrics so far into ``out_dir/curves.png`` (main process)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = self._rows
        steps = [r["step"] for r in rows]
        fig = Figure(figsize=(12, 7))
        FigureCanvasAgg(fig)
        panels = [("loss", ["loss"], "log"), ("vel_cosine", ["vel_cosine"], "linear"),
                  ("grad_total_norm", ["grad_total_norm"], "log"), ("grad_max_abs", ["grad_max_abs"], "log"),
                  ("learning rate", [f"lr_{n}" for n in self.group_names], "linear"),
                  ("samples/s", ["samples_per_s"], "linear")]
        hits = [r["step"] for prev, r in zip([{"guard_hits": 0}, *rows], rows) if r["guard_hits"] > prev["guard_hits"]]
        for index, (title, keys, scale) in enumerate(panels):
            ax = fig.add_subplot(2, 3, index + 1)
            for key in keys:
                ax.plot(steps, [r.get(key, math.nan) for r in rows], label=key.removeprefix("lr_"))
            positive = all(r.get(k, 1.0) > 0 for r in rows for k in keys)
            ax.set_yscale(scale if positive else "linear")
            for step in hits:
                ax.axvline(step, color="red", alpha=0.3, linewidth=0.8)
            ax.set_title(title)
            ax.set_xlabel("step")
            if len(keys) > 1:
                ax.legend(fontsize="small")
        fig.suptitle(f"{self.out_dir.name}: step {self.step}, guard hits {self.guard_hits} (red lines)")
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.9, wspace=0.3, hspace=0.4)
        path = self.out_dir / CURVES_FILE
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        return path

    # ----------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/step_{N:07d}/`` and point ``latest`` at it (all processes call)."""
        accel = self.accelerator
        root = self.out_dir / CHECKPOINTS_DIR
        final = root / f"step_{self.step:07d}"
        tmp: Path | None = None
        if accel.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
            tmp.chmod(0o755)
        try:
            self._save_policy(tmp)
            if self._ema is not None:
                with self.ema_weights():
                    self._save_model_state(None if tmp is None else tmp / EMA_FILE)
            tensors, meta = self._trainer_state()
            if tmp is not None:
                save_tensors(tmp / STATE_TENSORS_FILE, tensors)
                write_json(tmp / STATE_JSON_FILE, meta)
                write_manifest(tmp)
                publish_directory(tmp, final)
                tmp = None
                with atomic_path(root / LATEST_FILE) as pointer:
                    pointer.write_text(final.name + "\n", encoding="utf-8")
                self.write_curves()
                logger.info("checkpoint %s", final)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        accel.wait_for_everyone()
        return final

    def _trainer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``trainer_state.safetensors`` and ``trainer_state.json`` contents (every process joins;
        only the main process gets them)."""
        optimizer = get_optimizer_state_dict(self.model, self.optimizer.optimizer, options=_FULL)
        tensors, rng = self._rng_states()
        if not self.accelerator.is_main_process:
            return {}, {}
        scalars: dict[str, dict[str, Any]] = {}
        for name, state in optimizer["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{name}.{key}"] = value
                else:
                    scalars.setdefault(name, {})[key] = value
        if self._epoch_generator_state is not None:
            tensors["data.loader_generator"] = self._epoch_generator_state
        meta = {
            "format": STATE_FORMAT,
            "step": self.step,
            "guard_hits": self.guard_hits,
            "elapsed_s": self._elapsed,
            "num_processes": self.accelerator.num_processes,
            "data": {
                "epoch": self._epoch,
                "consumed_micro_batches": self._batch_in_epoch * self.accelerator.num_processes,
            },
            "scheduler": self.scheduler.state_dict(),
            "optimizer": {"param_groups": optimizer["param_groups"], "scalars": scalars},
            "rng": rng,
            "config": self.config.to_json(),
        }
        return tensors, meta

    def _save_policy(self, directory: Path | None) -> None:
        if not self._sharded:
            if directory is not None:
                self.vla.save_pretrained(directory, manifest=False)
            return
        self._save_model_state(None if directory is None else directory / WEIGHTS_FILE)
        if directory is not None:
            with atomic_path(directory / RECIPE_FILE) as tmp:
                tmp.write_text(yaml.safe_dump(self.vla.export_recipe(directory), sort_keys=False), encoding="utf-8")

    def _save_model_state(self, path: Path | None) -> None:
        """The full model state dict into ``path`` (main process; every process joins under FSDP)."""
        if self._sharded:
            state = get_model_state_dict(self.model, options=_FULL)
        else:
            state = self.vla.state_dict() if path is not None else {}
        if path is not None:
            save_tensors(path, state)

    def _rng_states(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every process's RNG states: torch as ``[P, n]`` uint8 tensors, python / numpy as JSON lists."""
        accel = self.accelerator
        tensors = {"rng.torch_cpu": self._gather(torch.get_rng_state())}
        if accel.device.type == "cuda":
            tensors["rng.torch_cuda"] = self._gather(torch.cuda.get_rng_state(accel.device))
        python_state = random.getstate()
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
        local = {
            "python": [python_state[0], list(python_state[1]), python_state[2]],
            "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        }
        return tensors, {"per_process": self._gather_json(local)}

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor[None]
        return self.accelerator.gather(tensor.to(self.accelerator.device)[None]).cpu()

    def _gather_json(self, data: Any) -> list[Any]:
        """``data`` of every process (JSON-encoded bytes gathered, no pickle)."""
        if self.accelerator.num_processes == 1:
            return [data]
        encoded = torch.tensor(list(json.dumps(data).encode()), dtype=torch.uint8)
        lengths = self._gather(torch.tensor([encoded.numel()]))[:, 0].tolist()
        padded = torch.zeros(max(lengths), dtype=torch.uint8)
        padded[: encoded.numel()] = encoded
        rows = self._gather(padded)
        return [json.loads(bytes(row[:n].tolist()).decode()) for row, n in zip(rows, lengths)]

    def resume(self, checkpoint_dir: str | Path) -> None:
        """Restore weights, EMA, optimizer, scheduler, counters, RNGs and the data position.

        ``train()`` then continues exactly as the uninterrupted run would have (same process
        count and config; a different process count keeps the data position by samples).
        """
        directory = Path(checkpoint_dir)
        for name in (WEIGHTS_FILE, STATE_TENSORS_FILE, STATE_JSON_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: not a trainer checkpoint")
        verify_manifest(directory, required=(WEIGHTS_FILE, STATE_TENSORS_FILE, STATE_JSON_FILE))
        meta = json.loads((directory / STATE_JSON_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{directory / STATE_JSON_FILE}: format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
        if meta["step"] > self.config.steps:
            raise ValueError(f"checkpoint step {meta['step']} is beyond TrainConfig.steps={self.config.steps}")
        differ = {k: (v, meta["config"].get(k)) for k, v in self.config.to_json().items() if meta["config"].get(k) != v}
        if differ:
            logger.warning("resuming with a different config (now, checkpoint): %s", differ)
        tensors = read_safetensors(directory / STATE_TENSORS_FILE)
        self._restore_weights(directory)
        self._restore_optimizer(tensors, meta)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step, self.guard_hits, self._elapsed = meta["step"], meta["guard_hits"], meta["elapsed_s"]
        accel = self.accelerator
        rank = accel.process_index
        if meta["num_processes"] != accel.num_processes:
            logger.warning("checkpoint written by %d processes, resuming with %d: data order and random streams "
                           "differ from an uninterrupted run", meta["num_processes"], accel.num_processes)
            rank = rank % meta["num_processes"]
        self._epoch = meta["data"]["epoch"]
        self._batch_in_epoch = meta["data"]["consumed_micro_batches"] // accel.num_processes
        self._epoch_generator_state = tensors.get("data.loader_generator")
        self._restore_rng(tensors, meta["rng"]["per_process"][rank], rank)
        self._rows = self._read_metrics(self.step)
        self._resumed = True
        logger.info("resumed from %s at step %d", directory, self.step)

    def _restore_weights(self, directory: Path) -> None:
        """Live weights, and the EMA (its weights pass through the model into the EMA tensors)."""
        ema_saved = (directory / EMA_FILE).is_file()
        if self._ema is not None and ema_saved:
            self._load_model_state(read_safetensors(directory / EMA_FILE))
            self._reset_ema()
        self._load_model_state(read_safetensors(directory / WEIGHTS_FILE))
        if self._ema is not None and not ema_saved:
            logger.warning("%s has no %s: the EMA starts from the checkpoint's weights", directory, EMA_FILE)
            self._reset_ema()

    def _restore_optimizer(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        state: dict[str, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                name, field = key.removeprefix("optimizer.").rsplit(".", 1)
                state.setdefault(name, {})[field] = value
        for name, scalars in meta["optimizer"]["scalars"].items():
            state.setdefault(name, {}).update(scalars)
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in meta["optimizer"]["param_groups"]]
        # strict=False: parameters that never had a gradient have no optimizer state.
        set_optimizer_state_dict(self.model, self.optimizer.optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True, strict=False))

    def _restore_rng(self, tensors: Mapping[str, torch.Tensor], states: Mapping[str, Any], rank: int) -> None:
        """This process's torch / python / numpy RNG states (``rank``: its row in the checkpoint)."""
        # clone: set_rng_state misreads a row view that does not start its storage
        torch.set_rng_state(tensors["rng.torch_cpu"][rank].clone())
        device = self.accelerator.device
        if device.type == "cuda" and "rng.torch_cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.torch_cuda"][rank].clone(), device)
        python, numpy = states["python"], states["numpy"]
        random.setstate((python[0], tuple(python[1]), python[2]))
        np.random.set_state((numpy[0], np.asarray(numpy[1], dtype=np.uint32), *numpy[2:]))

    def _load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))

    def _read_metrics(self, up_to_step: int) -> list[dict[str, float]]:
        path = self.out_dir / METRICS_FILE
        if not path.is_file():
            return []
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]
        for row in rows:
            row["step"], row["guard_hits"] = int(row["step"]), int(row["guard_hits"])
        return [row for row in rows if row["step"] <= up_to_step]


def _make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator for ``config``.

    DDP is told to expect parameters without gradient (see ``_warn_gradient_free``). Processes
    launched by torchrun on a machine without an accelerator use gloo on the CPU (accelerate
    would otherwise make each of them a separate single-process run).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs: dict[str, Any] = {
        "mixed_precision": config.mixed_precision,
        "gradient_accumulation_steps": config.grad_accumulation,
        "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)],
        "cpu": launched > 1 and not torch.accelerator.is_available(),
    }
    try:
        accelerator = Accelerator(**kwargs)
    except ValueError as err:
        # A single process may train several times with different precisions (notebooks, tests):
        # accelerate keeps its state per process, so start it afresh.
        if "already been initialized" not in str(err) or launched > 1:
            raise
        AcceleratorState._reset_state()
        accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched as WORLD_SIZE={launched} processes, but accelerate set up {accelerator.num_processes}: "
            "to train on CPUs set ACCELERATE_USE_CPU=1"
        )
    return accelerator


__all__ = [
    "ParameterGroup",
    "ShardedEpochSampler",
    "StopSignal",
    "TrainConfig",
    "Trainer",
    "collate",
    "derive_seed",
    "latest_checkpoint",
    "load_ema_policy",
    "lr_factor",
    "parameter_groups",
    "recover_checkpoints",
    "set_normalization",
]
