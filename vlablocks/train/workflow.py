"""The ``vlablocks train`` / ``vlablocks eval`` workflows: recipe + dataset -> run -> success rates.

A run directory holds ``metrics.csv``, ``curves.png``, ``tensorboard/``, ``checkpoints/`` (see
:mod:`vlablocks.train.trainer`), ``data.json`` (what the policy was trained on: dataset path, camera,
image size, depth) and, after evaluation, ``eval/results.json`` and ``eval/videos/``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from vlablocks.io.atomic import write_json
from vlablocks.recipes.loader import Recipe, RecipeError, load_recipe
from vlablocks.recipes.schema import MAX_SETTING_INT, call_with
from vlablocks.policy.vla import VLA
from vlablocks.recipes.builder import from_pretrained

logger = logging.getLogger(__name__)

DATA_INFO_FILE = "data.json"
TRAIN_PREFIX = "train."


@dataclass(frozen=True)
class RunResult:
    """What :func:`train_from_recipe` produced."""

    out_dir: Path
    metrics: dict[str, float]
    checkpoint: Path | None
    interrupted: bool = False  # stopped early by SIGTERM (after writing ``checkpoint``)


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(recipe overrides, train.* overrides)``."""
    recipe = [o for o in overrides if not o.startswith(TRAIN_PREFIX)]
    return recipe, [o for o in overrides if o.startswith(TRAIN_PREFIX)]


def train_config(recipe: Recipe, train_overrides: Sequence[str] = (), steps: int | None = None) -> Any:
    """The :class:`~vlablocks.train.trainer.TrainConfig` of a recipe's ``train:`` section plus overrides."""
    from vlablocks.train.trainer import TrainConfig

    node = dict(recipe.data.get("train") or {})
    for override in train_overrides:
        key, sep, text = override[len(TRAIN_PREFIX) :].partition("=")
        if not sep or not key or "." in key:
            raise RecipeError(f"a training override must look like train.FIELD=value; got {override!r}", source="<command-line override>")
        node[key] = yaml.safe_load(text)
        recipe.sources[f"train.{key}"] = "<command-line override>"
    if steps is not None:
        node["steps"] = steps
    return call_with(TrainConfig, node, "train", recipe, max_int=MAX_SETTING_INT)


def check_data_fits(vla: VLA, sample: dict[str, Any], data: Path) -> None:
    """Clear errors when a dataset cannot feed a policy (image size, depth, widths)."""
    config = vla.config
    problems = []
    if vla.vision is not None:
        size = tuple(sample["images"].shape[-2:])
        if size != (vla.vision.image_size, vla.vision.image_size):
            problems.append(f"images are {size[0]}x{size[1]} but vision.image_size is {vla.vision.image_size}")
    if vla.geometry is not None and "depth" not in sample:
        problems.append("the recipe has a geometry encoder but the dataset has no depth (generate it with --depth)")
    if sample["actions"].shape[-1] > config.action_dim:
        problems.append(f"actions have {sample['actions'].shape[-1]} dims but policy.action_dim is {config.action_dim}")
    if config.state_dim is not None and sample["state"].shape[-1] > config.state_dim:
        problems.append(f"state has {sample['state'].shape[-1]} dims but policy.state_dim is {config.state_dim}")
    if problems:
        raise ValueError(f"dataset {data} does not fit the recipe: " + "; ".join(problems))


def train_from_recipe(
    recipe: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    steps: int | None = None,
    resume: bool = False,
    skip_bad_episodes: bool = False,
) -> RunResult:
    """Build a recipe, load a LeRobot-layout dataset, train, and return the run.

    The initial weights are drawn after ``torch.manual_seed(train.seed)``, so a run is
    reproducible from its recipe and data (torch seeds a fresh process at random). A bad episode
    stops the run before training (:class:`~vlablocks.data.lerobot.EpisodeError`) unless
    ``skip_bad_episodes``: then it is left out and listed in ``data.json``.
    """
    from vlablocks.data.lerobot import LeRobotDataset
    from vlablocks.data.lerobot import STATE as STATE_FEATURE
    from vlablocks.recipes.builder import build
    from vlablocks.train.trainer import Trainer, latest_checkpoint

    recipe_overrides, train_overrides = split_overrides(overrides)
    loaded = load_recipe(recipe, recipe_overrides)
    config = train_config(loaded, train_overrides, steps)
    torch.manual_seed(config.seed)
    vla = build(loaded)
    data = Path(data)
    dataset = LeRobotDataset(data, horizon=vla.config.horizon, load_depth=vla.geometry is not None,
                             skip_bad_episodes=skip_bad_episodes)
    sample = dataset[0]
    check_data_fits(vla, sample, data)
    out_dir = Path(out) if out is not None else Path("runs") / loaded.name
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"data": str(data.resolve()), "cameras": list(dataset.cameras),
            "image_size": int(sample["images"].shape[-1]), "depth": "depth" in sample,
            "state_names": dataset.features[STATE_FEATURE].get("names"),
            "skipped_episodes": [{"episode": e, "problem": problem} for e, problem in dataset.skipped]}
    write_json(out_dir / DATA_INFO_FILE, info)
    trainer = Trainer(vla, dataset, config, out_dir)
    if resume:
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: {out_dir} has no checkpoint to resume from")
        trainer.resume(checkpoint)
    metrics = trainer.train()
    return RunResult(out_dir, metrics, latest_checkpoint(out_dir), trainer.interrupted)


def load_policy(run: str | Path, use_ema: bool = True) -> tuple[VLA, Path]:
    """The policy of a run (its latest checkpoint) or of a checkpoint directory; EMA weights when present."""
    from vlablocks.train.trainer import EMA_FILE, latest_checkpoint, load_ema_policy

    run = Path(run)
    checkpoint = latest_checkpoint(run) or run
    if use_ema and (checkpoint / EMA_FILE).is_file():
        return load_ema_policy(checkpoint).eval(), checkpoint
    if use_ema:
        logger.warning("%s has no EMA weights; evaluating the raw weights", checkpoint)
    return from_pretrained(checkpoint).eval(), checkpoint


@functools.lru_cache(maxsize=2)
def _loaded_policy(checkpoint: Path, use_ema: bool) -> VLA:
    return load_policy(checkpoint, use_ema)[0]


@dataclass(frozen=True)
class CheckpointPolicy:
    """A picklable policy callable for rollout workers: ``batch -> predict_action(batch)``.

    Only the checkpoint path travels to a worker; each process loads the policy once (cached).
    """

    checkpoint: Path
    use_ema: bool = True

    def __call__(self, batch: dict[str, Any]) -> Any:
        return _loaded_policy(self.checkpoint, self.use_ema).predict_action(batch)


def evaluate_run(
    run: str | Path,
    tasks: Sequence[str],
    episodes: int,
    execute_steps: int = 8,
    video: bool = False,
    use_ema: bool = True,
    seed: int = 0,
    workers: int = 1,
) -> dict[str, Any]:
    """Closed-loop Meta-World evaluation of a run; writes ``eval/results.json`` (and videos).

    ``workers`` rollout processes each get a copy of the policy; the results do not depend on it.
    The camera, image size and state layout (:data:`vlablocks.envs.metaworld.legacy.STATE_LAYOUTS`, found from
    the state names the training data recorded) come from the run's ``data.json``.
    """
    from vlablocks.envs.metaworld.legacy import evaluate, state_layout
    from vlablocks.train.trainer import EMA_FILE

    run = Path(run)
    policy, checkpoint = load_policy(run, use_ema)
    info_path = run / DATA_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    camera = (info.get("cameras") or ["corner"])[0]
    image_size = policy.vision.image_size if policy.vision is not None else int(info.get("image_size", 128))
    state = state_layout(info.get("state_names"))  # what the run's dataset held as the state
    eval_dir = run / "eval"
    act = policy.predict_action if workers == 1 else CheckpointPolicy(checkpoint, use_ema)
    results = evaluate(
        act, tasks, episodes, image_size=image_size, camera=camera, depth=policy.geometry is not None,
        seed=seed, execute_steps=execute_steps, video_dir=eval_dir / "videos" if video else None, workers=workers,
        state=state,
    )
    ema = use_ema and (checkpoint / EMA_FILE).is_file()  # what was evaluated, not what was asked for
    results = {**results, "checkpoint": str(checkpoint), "execute_steps": execute_steps, "ema": ema, "state": state}
    eval_dir.mkdir(parents=True, exist_ok=True)
    write_json(eval_dir / "results.json", results)
    return results


def format_results(results: dict[str, Any]) -> str:
    """A text table: success per task (with its difficulty bucket), per bucket, and the mean."""
    from vlablocks.envs.metaworld.legacy import DIFFICULTY

    lines = [f"{'task':34s} {'bucket':10s} {'success':>8s}"]
    for task, rate in results["per_task"].items():
        lines.append(f"{task:34s} {DIFFICULTY.get(task, '?'):10s} {100 * rate:7.1f}%")
    for bucket, rate in results["per_bucket"].items():
        lines.append(f"{'bucket ' + bucket:45s} {100 * rate:7.1f}%")
    lines.append(f"{'mean over tasks':45s} {100 * results['mean']:7.1f}%   ({results['episodes']} episodes per task)")
    return "\n".join(lines)
