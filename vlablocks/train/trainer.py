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

The pieces, one module each: settings and schedule (:mod:`.config`), parameter groups and
normalisation (:mod:`.groups`), data order and seeds (:mod:`.sampler`), the EMA (:mod:`.ema`),
metrics (:mod:`.metrics`), SIGTERM (:mod:`.signals`), the checkpoint directory and the policy's
weights (:mod:`.checkpoint`), the optimizer and RNG state of a resume (:mod:`.state`).

The EMA (of the trainable parameters, updated after every applied step) is what you deploy:
``load_ema_policy(checkpoint)`` or, on the live model, ``with trainer.ema_weights(): evaluate()``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, send_to_device, set_seed
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from vlablocks.io.atomic import write_json
from vlablocks.io.manifest import write_manifest
from vlablocks.policy.batch import collate
from vlablocks.policy.vla import VLA
from vlablocks.recipes.lora import is_lora_checkpoint
from vlablocks.train.accelerator import make_accelerator
from vlablocks.train.checkpoint import (
    CHECKPOINTS_DIR,
    EMA_FILE,
    latest_checkpoint,
    load_model_state,
    read_policy_state,
    recover_checkpoints,
    save_lora_checkpoint,
    save_model_state,
    save_policy,
    save_tensors,
    set_latest,
    staged_directory,
)
from vlablocks.train.config import TrainConfig, lr_factor
from vlablocks.train.ema import EMA
from vlablocks.train.groups import apply_finetune, make_optimizer, set_normalization
from vlablocks.train.metrics import (
    CURVES_FILE,
    METRICS_FILE,
    TENSORBOARD_DIR,
    StepStats,
    add_scalars,
    metrics_row,
    open_tensorboard,
    plot_curves,
    read_metrics,
    write_metrics,
)
from vlablocks.train.sampler import (
    LOADER_STREAM,
    NOISE_STREAM,
    ShardedEpochSampler,
    derive_seed,
)
from vlablocks.train.signals import StopSignal, any_process_stopping
from vlablocks.train.state import (
    STATE_FORMAT,
    STATE_JSON_FILE,
    STATE_TENSORS_FILE,
    capture_optimizer,
    capture_rng,
    read_trainer_state,
    restore_optimizer,
    restore_rng,
    split_optimizer_state,
)

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Training stopped: too many consecutive optimizer steps were skipped by the gradient guard."""


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
            ``collate`` (default :func:`~vlablocks.policy.batch.collate`).
        config: the training settings.
        out_dir: where metrics, plots, TensorBoard logs and checkpoints go.
        init_dir: the checkpoint directory ``vla`` was loaded from, if any: a LoRA run's
            checkpoints reference its weights instead of copying them (:mod:`vlablocks.recipes.lora`).
    """

    def __init__(self, vla: VLA, dataset: Dataset, config: TrainConfig, out_dir: str | Path,
                 init_dir: str | Path | None = None) -> None:
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"the dataset must be map-style (with __len__ and __getitem__); got {type(dataset).__name__}"
            )
        self.config = config
        self.out_dir = Path(out_dir)
        self.init_dir = None if init_dir is None else Path(init_dir)
        self.accelerator = accel = make_accelerator(config.mixed_precision, config.grad_accumulation)
        if config.finetune == "lora" and accel.distributed_type == DistributedType.FSDP:
            raise ValueError("TrainConfig.finetune='lora' is not supported under FSDP yet; expected a single process or DDP")
        set_seed(config.seed, device_specific=True)
        self._prepare_policy(vla, getattr(dataset, "stats", None))

        groups = apply_finetune(vla, config)
        self.group_names = [g.name for g in groups]
        self.vla = vla
        self.model, self.optimizer = accel.prepare(vla, make_optimizer(groups, config))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, lambda step: lr_factor(config, step)
        )
        self._sharded = accel.distributed_type == DistributedType.FSDP
        self._trainable = [(n, p) for n, p in accel.unwrap_model(self.model).named_parameters() if p.requires_grad]
        self._ema = EMA([p for _, p in self._trainable], config.ema_decay) if config.ema_decay is not None else None

        self.sampler = ShardedEpochSampler(len(dataset), config.batch_size, accel.num_processes,
                                           accel.process_index, config.seed)
        self._loader_generator = torch.Generator().manual_seed(derive_seed(config.seed, LOADER_STREAM))
        self.loader = DataLoader(
            dataset, batch_sampler=self.sampler, collate_fn=getattr(dataset, "collate", collate),
            num_workers=config.num_workers, generator=self._loader_generator,
            pin_memory=accel.device.type == "cuda",
        )
        self._noise = torch.Generator(device=accel.device)

        self.step = 0
        self.guard_hits = 0
        self._hits_in_a_row = 0  # consecutive guard hits, for the divergence stop (not checkpointed)
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

    def _prepare_policy(self, vla: VLA, stats: Any) -> None:
        """Normalisation from the dataset ``stats`` (unless the policy has its own: a run starting
        from a checkpoint takes the dataset's, as LeRobot's fine-tuning does; a resumed run gets
        its checkpoint's back) and gradient checkpointing."""
        if stats is not None and (not vla.has_normalization_stats() or self.init_dir is not None):
            if vla.has_normalization_stats():
                logger.info("normalising with the dataset's statistics, not those of %s", self.init_dir)
            set_normalization(vla, stats)
        elif stats is None and not vla.has_normalization_stats():
            logger.warning("neither the dataset nor the policy has normalisation statistics: training on raw units")
        if self.config.gradient_checkpointing:
            vla.set_gradient_checkpointing(True)

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
        # a resumed run drops the TensorBoard events logged past its checkpoint
        writer = open_tensorboard(self.out_dir / TENSORBOARD_DIR, self.step + 1 if self._resumed else None) if main else None
        clock = (time.perf_counter(), self._elapsed)
        bar = tqdm(total=config.steps, initial=self.step, disable=not main, desc="train", dynamic_ncols=True)
        stream = self._micro_batches()
        window: list[StepStats] = []
        self.model.train()
        self.interrupted = False
        try:
            with StopSignal() as stop:
                while self.step < config.steps:
                    window.append(self._train_step(stream))
                    self.step += 1
                    bar.update(1)
                    self._stop_if_diverged(window, writer, clock)
                    self.interrupted = any_process_stopping(accel, stop.requested)
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

    def _stop_if_diverged(self, window: list[StepStats], writer: Any, clock: tuple[float, float]) -> None:
        """Log the steps so far and raise :class:`TrainingDiverged` after ``max_guard_hits_in_a_row``
        skipped steps in a row (the same on every process: the guard reads the global grad norm)."""
        limit = self.config.max_guard_hits_in_a_row
        if limit is None or self._hits_in_a_row < limit:
            return
        row = self._log(window, writer, clock)
        latest = latest_checkpoint(self.out_dir)
        raise TrainingDiverged(
            f"step {self.step}: the gradient guard skipped {self._hits_in_a_row} optimizer steps in a row (loss "
            f"{row['loss']:.4g}, total grad norm {row['grad_total_norm']:.4g}): the run diverged or its inputs hold "
            f"NaN; no checkpoint was written, the last good one is {latest or 'none (no checkpoint yet)'} "
            f"(metrics: {self.out_dir / METRICS_FILE}; raise train.max_guard_hits_in_a_row to allow more)"
        )

    def _end_of_step(self, window: list[StepStats], writer: Any, clock: tuple[float, float], bar: Any) -> bool:
        """Log (and checkpoint) after a step as the config says; True if ``window`` was logged."""
        config = self.config
        last = self.step == config.steps or self.interrupted
        logged = self.step % config.log_every == 0 or last
        if logged:
            row = self._log(window, writer, clock)
            bar.set_postfix(loss=f"{row['loss']:.4f}", vel_cos=f"{row['vel_cosine']:.3f}",
                            lr=f"{max(window[-1].lrs.values()):.2e}", samples_s=f"{row['samples_per_s']:.1f}")
        # no periodic checkpoint inside a run of skipped steps: the last good one stays `latest`
        if (config.save_every and self.step % config.save_every == 0 and not self._hits_in_a_row) or last:
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
        return self._noise.manual_seed(derive_seed(self.config.seed, NOISE_STREAM, index))

    def _train_step(self, stream: Iterator[dict[str, Any]]) -> StepStats:
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
            if self._ema is not None:
                self._ema.update(self.step)
            self._hits_in_a_row = 0
        else:
            self.guard_hits += 1
            self._hits_in_a_row += 1
            logger.warning("step %d: gradient guard skipped the update (total grad norm %s)", self.step + 1, norm)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # the schedule advances on skipped steps too
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        return StepStats(loss, vel_cosine, norm, max_abs, lrs, time.perf_counter() - start)

    def _grad_max_abs(self) -> torch.Tensor:
        """The largest absolute gradient element over the trainable parameters (all processes): ``[]``."""
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

    def ema_weights(self) -> AbstractContextManager[None]:
        """Within the block the model's trainable parameters hold the EMA weights."""
        if self._ema is None:
            raise ValueError("this trainer keeps no EMA: set TrainConfig.ema_decay")
        return self._ema.applied()

    # ----------------------------------------------------------------------------- metrics

    def _log(self, window: list[StepStats], writer: Any, clock: tuple[float, float]) -> dict[str, float]:
        """Append the metrics row of ``window`` (``clock``: this session's start and the run's time then)."""
        self._elapsed = clock[1] + time.perf_counter() - clock[0]
        row = metrics_row(window, self.step, self.guard_hits, self.samples_per_step, self._elapsed)
        self._rows.append(row)
        if writer is not None:
            add_scalars(writer, row)
            write_metrics(self.out_dir / METRICS_FILE, self._rows, self.group_names)
        return row

    def write_curves(self) -> Path:
        """Plot the metrics so far into ``out_dir/curves.png`` (main process)."""
        title = f"{self.out_dir.name}: step {self.step}, guard hits {self.guard_hits} (red lines)"
        return plot_curves(self.out_dir / CURVES_FILE, self._rows, self.group_names, title)

    # ----------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/step_{N:07d}/`` and point ``latest`` at it (all processes call)."""
        accel = self.accelerator
        final = self.out_dir / CHECKPOINTS_DIR / f"step_{self.step:07d}"
        staged = staged_directory(final) if accel.is_main_process else nullcontext(None)
        with staged as tmp:
            if self.config.finetune == "lora":  # never sharded (refused in __init__)
                if tmp is not None:
                    save_lora_checkpoint(tmp, self.vla, self.init_dir, None if self._ema is None else self._ema.applied())
            else:
                save_policy(tmp, self.model, self.vla, self._sharded)
                if self._ema is not None:
                    with self._ema.applied():
                        save_model_state(None if tmp is None else tmp / EMA_FILE, self.model, self.vla, self._sharded)
            tensors, meta = self._trainer_state()
            if tmp is not None:
                save_tensors(tmp / STATE_TENSORS_FILE, tensors)
                write_json(tmp / STATE_JSON_FILE, meta)
                write_manifest(tmp)
        if accel.is_main_process:
            set_latest(final)
            self.write_curves()
            logger.info("checkpoint %s", final)
        accel.wait_for_everyone()
        return final

    def _trainer_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``trainer_state.safetensors`` and ``trainer_state.json`` contents (every process joins;
        only the main process gets them)."""
        optimizer_state = capture_optimizer(self.model, self.optimizer.optimizer)
        tensors, rng = capture_rng(self.accelerator)
        if not self.accelerator.is_main_process:
            return {}, {}
        optimizer_tensors, optimizer = split_optimizer_state(optimizer_state)
        tensors.update(optimizer_tensors)
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
            "optimizer": optimizer,
            "rng": rng,
            "config": self.config.to_json(),
        }
        return tensors, meta

    def resume(self, checkpoint_dir: str | Path) -> None:
        """Restore weights, EMA, optimizer, scheduler, counters, RNGs and the data position.

        ``train()`` then continues exactly as the uninterrupted run would have (same process
        count and config; a different process count keeps the data position by samples).
        """
        directory = Path(checkpoint_dir)
        meta, tensors = read_trainer_state(directory)
        if meta["step"] > self.config.steps:
            raise ValueError(f"checkpoint step {meta['step']} is beyond TrainConfig.steps={self.config.steps}")
        differ = {k: (v, meta["config"].get(k)) for k, v in self.config.to_json().items() if meta["config"].get(k) != v}
        if differ:
            logger.warning("resuming with a different config (now, checkpoint): %s", differ)
        self._restore_weights(directory)
        restore_optimizer(self.model, self.optimizer.optimizer, tensors, meta["optimizer"])
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
        restore_rng(tensors, meta["rng"]["per_process"][rank], rank, accel.device)
        self._rows = read_metrics(self.out_dir / METRICS_FILE, up_to_step=self.step)
        self._resumed = True
        logger.info("resumed from %s at step %d", directory, self.step)

    def _restore_weights(self, directory: Path) -> None:
        """Live weights, and the EMA (its weights pass through the model into the EMA tensors)."""
        if is_lora_checkpoint(directory) != (self.config.finetune == "lora"):
            kind = "a LoRA run" if is_lora_checkpoint(directory) else "a run without LoRA"
            raise ValueError(f"{directory} was written by {kind} but train.finetune is {self.config.finetune!r}; "
                             "expected the run's own finetune setting to resume it")
        ema_saved = (directory / EMA_FILE).is_file()
        if self._ema is not None and ema_saved:
            load_model_state(self.model, read_policy_state(self.vla, directory, ema=True))
            self._ema.reset()
        load_model_state(self.model, read_policy_state(self.vla, directory))
        if self._ema is not None and not ema_saved:
            logger.warning("%s has no %s: the EMA starts from the checkpoint's weights", directory, EMA_FILE)
            self._ema.reset()
