"""``vlablocks eval``: closed-loop evaluation of a trained run; writes ``RUN/eval/results.json``
(and videos) and formats the success table.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlablocks.io.atomic import write_json
from vlablocks.policy.vla import VLA
from vlablocks.train.checkpoint import EMA_FILE, load_policy
from vlablocks.train.workflow import DATA_INFO_FILE

logger = logging.getLogger(__name__)


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
