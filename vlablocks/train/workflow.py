"""The ``vlablocks train`` workflow: recipe + LeRobot-layout dataset -> a run directory.

A run directory holds ``metrics.csv``, ``curves.png``, ``tensorboard/`` (:mod:`vlablocks.train.metrics`),
``checkpoints/`` (:mod:`vlablocks.train.checkpoint`), ``data.json`` (what the policy was trained on:
dataset path, camera, image size, depth) and, after ``vlablocks eval``, ``eval/results.json`` and
``eval/videos/``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vlablocks.data import DataSelection, LeRobotDataset
from vlablocks.io.atomic import write_json
from vlablocks.io.hub import resolve_dataset
from vlablocks.policy.vla import RECIPE_FILE, VLA
from vlablocks.recipes.builder import build, from_pretrained
from vlablocks.recipes.loader import bundled_recipes, load_recipe
from vlablocks.recipes.lora import is_lora_checkpoint
from vlablocks.train.checkpoint import (
    CHECKPOINTS_DIR,
    latest_checkpoint,
    recover_checkpoints,
)
from vlablocks.train.config import split_overrides, train_config
from vlablocks.train.metrics import METRICS_FILE
from vlablocks.train.trainer import Trainer

logger = logging.getLogger(__name__)

DATA_INFO_FILE = "data.json"
#: what makes a directory hold a run (training into it again would mix two runs).
RUN_MARKERS = (METRICS_FILE, CHECKPOINTS_DIR, DATA_INFO_FILE)


class RunExistsError(FileExistsError):
    """The run directory already holds a run, and neither ``--resume`` nor ``--move-aside`` was given."""


@dataclass(frozen=True)
class RunResult:
    """What :func:`train_from_recipe` produced."""

    out_dir: Path
    metrics: dict[str, float]
    checkpoint: Path | None
    interrupted: bool = False  # stopped early by SIGTERM (after writing ``checkpoint``)


def check_data_fits(vla: VLA, sample: dict[str, Any], data: Path) -> None:
    """Clear errors when a dataset cannot feed a policy (depth, widths; images are resized to fit)."""
    config = vla.config
    problems = []
    if vla.geometry is not None and "depth" not in sample:
        problems.append("the recipe has a geometry encoder but the dataset has no depth (generate it with --depth)")
    if sample["actions"].shape[-1] > config.action_dim:
        problems.append(f"actions have {sample['actions'].shape[-1]} dims but policy.action_dim is {config.action_dim}")
    if config.state_dim is not None and sample["state"].shape[-1] > config.state_dim:
        problems.append(f"state has {sample['state'].shape[-1]} dims but policy.state_dim is {config.state_dim}")
    if problems:
        raise ValueError(f"dataset {data} does not fit the recipe: " + "; ".join(problems))


def open_dataset(vla: VLA, data: str | Path, skip_bad_episodes: bool = False,
                 selection: DataSelection = DataSelection()) -> LeRobotDataset:
    """The dataset at ``data`` as ``vla`` reads it: its horizon, its image size (frames of another
    size are resized with padding), depth only when it has a geometry encoder, the features
    ``selection`` names."""
    return LeRobotDataset(data, horizon=vla.config.horizon, load_depth=vla.geometry is not None,
                          image_size=None if vla.vision is None else vla.vision.image_size,
                          skip_bad_episodes=skip_bad_episodes, cameras=selection.cameras, state_key=selection.state_key,
                          action_key=selection.action_key, recompute_stats=selection.recompute_stats)


def data_info(dataset: LeRobotDataset, source: str, sample: dict[str, Any], selection: DataSelection) -> dict[str, Any]:
    """The ``data.json`` of a run: the dataset (as given, and its local directory), its format,
    cameras, image size, depth, state names, the feature selection and the episodes left out
    (``sample``: the dataset's first item)."""
    return {"data": str(dataset.root.resolve()), "source": source, "format": dataset.meta.version,
            "cameras": list(dataset.cameras), "image_size": int(sample["images"].shape[-1]), "depth": "depth" in sample,
            "state_names": dataset.features[selection.state_key].get("names"), "selection": asdict(selection),
            "skipped_episodes": [{"episode": e, "problem": problem} for e, problem in dataset.skipped]}


def init_directory(recipe: str | Path) -> Path | None:
    """The checkpoint directory a run starts from when ``recipe`` is a directory (``None``: a recipe
    name or file; a bundled name wins over a directory of that name unless written as a path,
    ``./NAME``). ValueError for a directory that is not a plain vlablocks checkpoint."""
    directory = Path(recipe)
    if not directory.is_dir() or ("/" not in str(recipe) and str(recipe) in bundled_recipes()):
        return None
    if not (directory / RECIPE_FILE).is_file():
        raise ValueError(f"recipe {str(recipe)!r} is a directory without {RECIPE_FILE}; expected a vlablocks checkpoint "
                         "directory (recipe.yaml, model.safetensors, manifest.json), a recipe file or a bundled recipe name")
    if is_lora_checkpoint(directory):
        raise ValueError(f"{directory} holds LoRA adapters; to train from it, merge them first: "
                         f"vlablocks export {directory} OUT, then vlablocks train OUT ...")
    return directory


def holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a run (any of :data:`RUN_MARKERS`)."""
    return any((out_dir / marker).exists() for marker in RUN_MARKERS)


def launch_rank() -> int:
    """This process's rank under ``accelerate launch`` / ``torchrun`` (0 when run alone): only rank 0
    checks, moves aside and writes the run directory's own files, so the ranks do not race on it."""
    return int(os.environ.get("RANK", "0"))


def check_run_dir(out_dir: Path, resume: bool, move_aside: bool) -> Path | None:
    """Refuse a run directory that training would spoil; returns the checkpoint to resume from.

    ``resume``: ``out_dir`` must have a checkpoint (FileNotFoundError). Otherwise a directory
    holding a run is refused (:class:`RunExistsError`) unless ``move_aside`` (see
    :func:`move_run_aside`, called once the run is known to start). Only an interrupted
    checkpoint write is tidied (:func:`~vlablocks.train.checkpoint.recover_checkpoints`).
    """
    if resume and move_aside:
        raise ValueError("--resume continues the run in the directory and --move-aside starts a new one; pass one of them")
    if resume:
        if launch_rank() == 0 and (out_dir / CHECKPOINTS_DIR).is_dir():  # a checkpoint write killed half-way
            recover_checkpoints(out_dir / CHECKPOINTS_DIR)
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: {out_dir} has no checkpoint to resume from ({out_dir / CHECKPOINTS_DIR / 'latest'} "
                                    "not found); train without --resume to start a run there")
        return checkpoint
    if holds_run(out_dir) and not move_aside and launch_rank() == 0:
        raise RunExistsError(f"{out_dir} already holds a run; pass --resume to continue it, or --move-aside to rename it "
                             f"to {out_dir.name}.old-<timestamp> and start a new one (or choose another --out)")
    return None


def move_run_aside(out_dir: Path) -> Path | None:
    """Rename a run directory to ``<name>.old-<timestamp>`` (nothing is deleted); returns the new path."""
    if not holds_run(out_dir):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = out_dir.with_name(f"{out_dir.name}.old-{stamp}"), 1
    while target.exists():
        target, n = out_dir.with_name(f"{out_dir.name}.old-{stamp}-{n}"), n + 1
    os.replace(out_dir, target)
    logger.warning("moved the earlier run %s aside to %s", out_dir, target)
    return target


def train_from_recipe(
    recipe: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    steps: int | None = None,
    resume: bool = False,
    skip_bad_episodes: bool = False,
    move_aside: bool = False,
    selection: DataSelection = DataSelection(),
) -> RunResult:
    """Build a recipe, load a LeRobot-layout dataset, train, and return the run.

    ``overrides``: ``key=value`` recipe overrides and ``train.FIELD=value`` training settings.
    The initial weights are drawn after ``torch.manual_seed(train.seed)``, so a run is
    reproducible from its recipe and data (torch seeds a fresh process at random). A bad episode
    stops the run before training (:class:`~vlablocks.data.reader.EpisodeError`) unless
    ``skip_bad_episodes``: then it is left out and listed in ``data.json``. A directory that
    already holds a run is refused (:class:`RunExistsError`) unless ``resume`` (continue it) or
    ``move_aside`` (rename it to ``<out>.old-<timestamp>`` first); an empty one is fine. ``data``
    is a directory or a Hub dataset id (:func:`~vlablocks.io.hub.resolve_dataset`);
    ``selection`` picks its cameras, state and action features.

    ``recipe`` may be a checkpoint directory (``recipe.yaml``, ``model.safetensors``,
    ``manifest.json``, e.g. written by ``VLA.save_pretrained``): the run starts from its weights
    (loaded strictly and manifest-verified by :func:`~vlablocks.recipes.builder.from_pretrained`,
    with the recipe overrides applied) and ``data.json`` records it as ``init``.
    """
    recipe_overrides, train_overrides = split_overrides(overrides)
    init = init_directory(recipe)
    loaded = load_recipe(recipe if init is None else init / RECIPE_FILE, recipe_overrides)
    config = train_config(loaded, train_overrides, steps)
    out_dir = Path(out) if out is not None else Path("runs") / (loaded.name if init is None else init.resolve().name)
    checkpoint = check_run_dir(out_dir, resume, move_aside)
    torch.manual_seed(config.seed)
    vla = build(loaded) if init is None else from_pretrained(init, overrides=recipe_overrides)
    source = str(data)
    data = resolve_dataset(data)
    dataset = open_dataset(vla, data, skip_bad_episodes, selection)
    sample = dataset[0]
    check_data_fits(vla, sample, data)
    if launch_rank() == 0:
        if move_aside:
            move_run_aside(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        info = data_info(dataset, source, sample, selection)
        write_json(out_dir / DATA_INFO_FILE, {**info, "init": None if init is None else str(init.resolve())})
    trainer = Trainer(vla, dataset, config, out_dir, init_dir=init)
    if checkpoint is not None:
        trainer.resume(checkpoint)
    metrics = trainer.train()
    return RunResult(out_dir, metrics, latest_checkpoint(out_dir), trainer.interrupted)
