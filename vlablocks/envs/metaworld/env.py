"""The Meta-World environment of the evaluation protocol (:class:`vlablocks.eval.protocol.Env`).

:class:`MetaWorldEnv` is one task seen through one camera, rendered offscreen without shadows,
reflections or multisampling (11-17 ms per step + render at 96 or 128 px on a 2-core CPU;
~110 ms with Meta-World's default renderer); episode ``i`` is layout ``i`` of the training or
held-out layouts (:func:`~vlablocks.envs.metaworld.tasks.layout_seed`). Everything is
deterministic: a layout and a policy give the same episode, image for image. Video frames come
from a second render of the same camera at ``video_size`` px (256 by default), so what people
see does not depend on the policy's input resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

import numpy as np
import torch

from vlablocks.envs.metaworld import INSTALL_HINT
from vlablocks.envs.metaworld.render import OffscreenCamera
from vlablocks.envs.metaworld.tasks import (
    ACTION_DIM, BUCKETS, DIFFICULTY, FPS, INSTRUCTIONS, MAX_STEPS, NUM_LAYOUTS, check_camera, check_state,
    check_tasks, layout_seed, state_layout,
)
from vlablocks.eval.video import VIDEO_SIZE
from vlablocks.policy import batch as keys

try:
    import metaworld
    from metaworld.policies import ENV_POLICY_MAP
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(INSTALL_HINT) from error

RAW_STATE = "raw_state"  # the privileged 39-d observation; in the policy batch [1, 39], for scripted/state baselines


class MetaWorldEnv:
    """One Meta-World v3 task seen through one camera, on the training or held-out layouts.

    Observations (dicts): ``image [H, W, 3]`` uint8, ``depth [H, W]`` float32 metres (with
    ``depth``; 0 = skybox), ``intrinsics [3, 3]``, ``cam_to_world [4, 4]``, ``state [S]`` (float32,
    the :data:`~vlablocks.envs.metaworld.tasks.STATE_LAYOUTS` entry ``state``: hand xyz + gripper
    opening, with ``proprio_goal`` also the goal xyz) and ``raw_state [39]`` (Meta-World's full
    observation, float64, privileged: object and goal positions). An episode is done on success
    or after ``max_steps`` steps (Meta-World's cap is 500). Use as a context manager or call
    :meth:`close`.
    """

    action_dim: int = ACTION_DIM
    fps: float = FPS

    def __init__(
        self,
        task: str,
        image_size: int = 128,
        camera: str = "corner",
        depth: bool = False,
        seed: int = 0,
        train: bool = True,
        max_steps: int = MAX_STEPS,
        state: str = "proprio",
        video_size: int = VIDEO_SIZE,
    ) -> None:
        check_tasks([task])
        self._state_indices = list(check_state(state))
        self._camera_name = check_camera(camera)
        if not 1 <= max_steps <= MAX_STEPS:
            raise ValueError(f"max_steps must be in [1, {MAX_STEPS}] (Meta-World's cap); got {max_steps}")
        self.task, self.instruction, self.max_steps = task, INSTRUCTIONS[task], max_steps
        self.bucket: str | None = DIFFICULTY[task]
        self.depth, self.video_size = depth, video_size
        benchmark = metaworld.MT1(task, seed=layout_seed(seed, train))
        self._layouts = benchmark.train_tasks
        self._env = benchmark.train_classes[task]()
        self._env.set_task(self._layouts[0])
        self._camera = OffscreenCamera(self._env.model, camera, image_size, depth)
        self._video_camera: OffscreenCamera | None = None  # made on the first frame() call
        self._intrinsics = self._camera.intrinsics()
        self._latest: Mapping[str, Any] | None = None
        self._steps = 0
        self._done = True

    @property
    def num_layouts(self) -> int:
        """How many layouts :meth:`reset` accepts (50)."""
        return len(self._layouts)

    def reset(self, episode: int) -> dict[str, np.ndarray]:
        """Start an episode on layout ``episode`` (``0 <= episode < num_layouts``); returns the first observation."""
        if not 0 <= episode < self.num_layouts:
            raise ValueError(f"layout must be in [0, {self.num_layouts}); got {episode}")
        self._env.set_task(self._layouts[episode])
        raw, _ = self._env.reset()
        self._steps, self._done = 0, False
        return self._observation(raw)

    def step(self, action: np.ndarray | Sequence[float]) -> tuple[dict[str, np.ndarray], bool, bool]:
        """Apply ``action [4]`` (clipped to [-1, 1]) -> ``(observation, success, done)``."""
        if self._done:
            raise RuntimeError(f"{self.task}: the episode is over (or was never started); call reset(layout)")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,) or not np.isfinite(action).all():
            raise ValueError(f"{self.task}: the action must be {ACTION_DIM} finite numbers; got {action.tolist()}")
        raw, _, _, _, info = self._env.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        success = bool(info["success"])
        self._done = success or self._steps >= self.max_steps
        return self._observation(raw), success, self._done

    def _observation(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        image, depth = self._camera.render(self._env.data)
        obs = {
            "image": image,
            "intrinsics": self._intrinsics.copy(),
            "cam_to_world": self._camera.cam_to_world(self._env.data),
            "state": raw[self._state_indices].astype(np.float32),
            RAW_STATE: raw,
        }
        if depth is not None:
            obs["depth"] = depth
        self._latest = obs
        return obs

    def to_batch(self, observation: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """One observation -> a policy batch of size 1 (keys of :mod:`vlablocks.policy.batch` + ``raw_state``).

        ``images [1, 1, 3, H, W]`` in [0, 1], ``task [instruction]``, ``state [1, S]``,
        ``raw_state [1, 39]`` (privileged; image policies ignore it) and, with ``depth``,
        ``depth [1, 1, H, W]``, ``intrinsics [1, 1, 3, 3]`` and ``cam_to_world [1, 1, 4, 4]``.
        """
        batch: dict[str, Any] = {
            keys.IMAGES: torch.from_numpy(observation["image"]).permute(2, 0, 1).float().div_(255.0)[None, None],
            keys.TASK: [self.instruction],
            keys.STATE: torch.from_numpy(observation["state"])[None],
            RAW_STATE: torch.from_numpy(observation[RAW_STATE].astype(np.float32))[None],
        }
        if self.depth:
            batch[keys.DEPTH] = torch.from_numpy(observation["depth"])[None, None]
            batch[keys.INTRINSICS] = torch.from_numpy(observation["intrinsics"])[None, None]
            batch[keys.CAM_TO_WORLD] = torch.from_numpy(observation["cam_to_world"])[None, None]
        return batch

    def frame(self, observation: Mapping[str, np.ndarray]) -> np.ndarray:
        """The video frame ``[video_size, video_size, 3]`` uint8 of the latest observation: the same
        camera rendered again at ``video_size`` px (the policy's ``image`` is left as it is)."""
        if observation is not self._latest:
            raise ValueError(f"{self.task}: frame() renders the simulator now: pass the latest observation")
        if self.video_size == self._camera.size:
            return observation["image"]
        if self._video_camera is None:
            self._video_camera = OffscreenCamera(self._env.model, self._camera_name, self.video_size, depth=False)
        return self._video_camera.render(self._env.data)[0]

    def close(self) -> None:
        """Free the renderers and the simulator."""
        self._camera.close()
        if self._video_camera is not None:
            self._video_camera.close()
        self._env.close()

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True)
class MetaWorldEnvFactory:
    """Picklable settings -> :class:`MetaWorldEnv` of a task (an :class:`vlablocks.eval.protocol.EnvFactory`).

    ``train=False`` (evaluation) gives the held-out layouts of ``seed``; the settings are checked here.
    """

    image_size: int = 128
    camera: str = "corner"
    depth: bool = False
    seed: int = 0
    train: bool = False
    max_steps: int = MAX_STEPS
    state: str = "proprio"
    video_size: int = VIDEO_SIZE
    buckets: ClassVar[tuple[str, ...]] = BUCKETS

    def __post_init__(self) -> None:
        check_state(self.state)
        check_camera(self.camera)
        if not 1 <= self.max_steps <= MAX_STEPS:
            raise ValueError(f"max_steps must be in [1, {MAX_STEPS}] (Meta-World's cap); got {self.max_steps}")
        if self.video_size < 1:
            raise ValueError(f"video_size must be >= 1; got {self.video_size}")

    def __call__(self, task: str) -> MetaWorldEnv:
        return MetaWorldEnv(task, self.image_size, self.camera, self.depth, self.seed, self.train, self.max_steps,
                            self.state, self.video_size)

    def check(self, tasks: Sequence[str], episodes: int) -> None:
        """Known tasks, and ``episodes`` within the 50 layouts of one ``MT1`` seed."""
        check_tasks(tasks)
        which = "the training layouts" if self.train else "the held-out layouts"
        if not 1 <= episodes <= NUM_LAYOUTS:
            raise ValueError(f"episodes must be in [1, {NUM_LAYOUTS}] ({which}); got {episodes}")

    def describe(self) -> dict[str, Any]:
        """The camera and the state layout fed to the policy."""
        return {"camera": self.camera, "state": self.state}


def eval_env_factory(
    data_info: Mapping[str, Any], image_size: int | None, depth: bool, seed: int, video_size: int = VIDEO_SIZE
) -> MetaWorldEnvFactory:
    """The held-out environments a run trained on ``data_info`` (its ``data.json``) is evaluated in:
    its camera, its image size (``image_size`` when the policy has a vision encoder) and the state
    layout found from the state names its dataset recorded (:func:`~vlablocks.envs.metaworld.tasks.state_layout`)."""
    camera = (data_info.get("cameras") or ["corner"])[0]
    size = image_size if image_size is not None else int(data_info.get("image_size", 128))
    state = state_layout(data_info.get("state_names"))
    return MetaWorldEnvFactory(image_size=size, camera=camera, depth=depth, seed=seed, train=False, state=state,
                               video_size=video_size)


def expert_policy(task: str) -> Callable[[np.ndarray], np.ndarray]:
    """Meta-World's scripted expert for ``task``: ``raw_state [39] -> action [4]`` clipped to [-1, 1]."""
    policy = ENV_POLICY_MAP[check_tasks([task])[0]]()
    return lambda raw_state: np.clip(policy.get_action(raw_state), -1.0, 1.0).astype(np.float32)


__all__ = ["RAW_STATE", "MetaWorldEnv", "MetaWorldEnvFactory", "eval_env_factory",
           "expert_policy"]
