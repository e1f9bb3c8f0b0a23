"""Meta-World (v3) glue: task tables, a fast-rendering environment, scripted demos and evaluation.

- :data:`INSTRUCTIONS` (one sentence per task, written for vlablocks: Meta-World ships none),
  :data:`DIFFICULTY` (task -> ``easy`` / ``medium`` / ``hard`` / ``very_hard``) and :data:`MT10`.
- :class:`MetaWorldEnv`: one task, one camera, rendered offscreen without shadows, reflections
  or multisampling (11-17 ms per step + render at 96 or 128 px on a 2-core CPU; ~110 ms by default).
- :func:`generate_demos`: scripted-expert episodes written as a LeRobot dataset
  (:mod:`vlablocks.data.lerobot`).
- :func:`evaluate`: closed-loop rollouts of an action-chunk policy on held-out layouts.

Layouts: ``metaworld.MT1(task, seed=s)`` gives 50 fixed object/goal layouts. The training
layouts of ``seed`` are those of ``MT1(task, seed=seed)``; the held-out layouts are those of
``MT1(task, seed=seed + 1)`` (:func:`layout_seed`). Demos made with ``seed=s`` and an evaluation
with ``seed=s`` therefore never share a layout (do not train on demos of ``seed=s + 1`` and
evaluate with ``seed=s``). Everything is deterministic: a layout and a policy give the same
episode, image for image.

Rendering needs an offscreen OpenGL: ``MUJOCO_GL`` defaults to ``egl`` here (``osmesa`` also
works); the GL context is made from ``MUJOCO_GL`` even when MuJoCo was imported first.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import importlib.util  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import pickle  # noqa: E402
import queue  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import Future, ProcessPoolExecutor  # noqa: E402
from collections.abc import Callable, Iterator, Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from types import TracebackType  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
# Mesa's software GL (llvmpipe, behind EGL/OSMesa) and triton (loaded by torch's compiler stack,
# e.g. when diffusers is imported) each bring their own LLVM: importing triton after a GL context
# exists segfaults the process. Load it first.
import torch._dynamo  # noqa: E402, F401
from tqdm.auto import tqdm  # noqa: E402

try:
    import metaworld
    import mujoco
    from metaworld.policies import ENV_POLICY_MAP
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "vlablocks.envs.metaworld.legacy needs Meta-World: pip install 'vlablocks[sim]' (metaworld, mujoco, packaging, imageio)"
    ) from error

from vlablocks.policy import batch as keys  # noqa: E402
from vlablocks.data.lerobot import DatasetWriter, camera_columns  # noqa: E402
from vlablocks.io.atomic import atomic_path  # noqa: E402

logger = logging.getLogger(__name__)

FPS = 80  # 5 physics steps of 2.5 ms per action (Meta-World's render_fps)
MAX_STEPS = 500  # Meta-World's episode cap (max_path_length)
NUM_LAYOUTS = 50  # layouts per MT1 seed
ACTION_DIM = 4  # dx, dy, dz, gripper effort
# What a policy's ``state`` holds, by name: the raw-observation indices and the feature names written
# into the dataset (``meta/info.json``), from which an evaluation finds the layout a run was trained on.
# ``proprio_goal`` adds the goal position, which Meta-World's own MT benchmarks put in the observation
# (``partially_observable=False``) and which the camera shows as a 1-2 px marker for reach, push and
# pick-place.
STATE_LAYOUTS: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
    "proprio": ((0, 1, 2, 3), ("hand_x", "hand_y", "hand_z", "gripper")),
    "proprio_goal": ((0, 1, 2, 3, 36, 37, 38), ("hand_x", "hand_y", "hand_z", "gripper", "goal_x", "goal_y", "goal_z")),
}
CAMERAS = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")
MAX_DEPTH_M = 10.0  # farther pixels are the skybox (rendered at ~70-110 m): reported as 0 (no depth)
RAW_STATE = "raw_state"  # evaluate(): the privileged 39-d observation [1, 39], for scripted/state baselines
BUCKETS = ("easy", "medium", "hard", "very_hard")
GIF_MAX_FPS = 25  # browsers slow down GIF frames shorter than 20 ms: GIFs keep every k-th frame

INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the nut and fit it onto the peg",
    "basketball-v3": "pick up the ball and dunk it into the hoop",
    "bin-picking-v3": "move the puck from one bin into the other bin",
    "box-close-v3": "pick up the lid and put it on the box",
    "button-press-topdown-v3": "press the button down from the top",
    "button-press-topdown-wall-v3": "reach over the wall and press the button down from the top",
    "button-press-v3": "press the button in from the front",
    "button-press-wall-v3": "reach past the wall and press the button in from the front",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial half a turn",
    "disassemble-v3": "pick the nut up and off the peg",
    "door-close-v3": "push the door closed",
    "door-lock-v3": "turn the door lock down to lock it",
    "door-open-v3": "pull the door open by its handle",
    "door-unlock-v3": "turn the door lock up to unlock it",
    "hand-insert-v3": "move the puck into the hole in the table",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "turn the faucet counter-clockwise to open it",
    "faucet-close-v3": "turn the faucet clockwise to close it",
    "hammer-v3": "pick up the hammer and drive the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up a quarter turn",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the puck up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate forward into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-back-v3": "slide the plate back out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate sideways out of the cabinet",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "pull the peg sideways out of the hole",
    "soccer-v3": "push the ball into the goal",
    "stick-push-v3": "grab the stick and push the bottle with it to the goal",
    "stick-pull-v3": "grab the stick and pull the bottle with it to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "move the gripper to the goal",
    "reach-wall-v3": "move the gripper over the wall to the goal",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the edge of the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}

# The easy / medium / hard / very hard split of Seo et al. (Masked World Models) used by DP3 and
# by LeRobot's Meta-World evaluation (28 / 11 / 6 / 5 tasks), cross-checked against a public copy
# of LeRobot's table.
_BUCKET_TASKS = {
    "easy": (
        "button-press", "button-press-topdown", "button-press-topdown-wall", "button-press-wall", "coffee-button",
        "dial-turn", "door-close", "door-lock", "door-open", "door-unlock", "drawer-close", "drawer-open",
        "faucet-close", "faucet-open", "handle-press", "handle-press-side", "handle-pull", "handle-pull-side",
        "lever-pull", "plate-slide", "plate-slide-back", "plate-slide-back-side", "plate-slide-side", "reach",
        "reach-wall", "window-close", "window-open", "peg-unplug-side",
    ),
    "medium": (
        "basketball", "bin-picking", "box-close", "coffee-pull", "coffee-push", "hammer", "peg-insert-side",
        "push-wall", "soccer", "sweep", "sweep-into",
    ),
    "hard": ("assembly", "hand-insert", "pick-out-of-hole", "pick-place", "push", "push-back"),
    "very_hard": ("shelf-place", "disassemble", "stick-pull", "stick-push", "pick-place-wall"),
}
DIFFICULTY: dict[str, str] = {f"{task}-v3": bucket for bucket, tasks in _BUCKET_TASKS.items() for task in tasks}

MT10: list[str] = [
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
    "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
]


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    unknown = [t for t in tasks if t not in INSTRUCTIONS]
    if unknown or not tasks:
        raise ValueError(f"unknown Meta-World task(s) {unknown or list(tasks)}; valid names: {sorted(INSTRUCTIONS)}")
    return list(tasks)


def _check_state(state: str) -> tuple[int, ...]:
    if state not in STATE_LAYOUTS:
        raise ValueError(f"state must be one of {list(STATE_LAYOUTS)}; got {state!r}")
    return STATE_LAYOUTS[state][0]


def state_layout(names: Sequence[str] | None) -> str:
    """The :data:`STATE_LAYOUTS` entry whose feature names are ``names`` (``None``, as in datasets
    written before names were recorded: ``proprio``)."""
    if names is None:
        return "proprio"
    for layout, (_, layout_names) in STATE_LAYOUTS.items():
        if tuple(names) == layout_names:
            return layout
    known = {layout: list(layout_names) for layout, (_, layout_names) in STATE_LAYOUTS.items()}
    raise ValueError(f"state feature names {list(names)} match no Meta-World state layout; expected one of {known}")


def layout_seed(seed: int, train: bool) -> int:
    """The ``MT1`` seed whose 50 layouts are the training (``seed``) or held-out (``seed + 1``) ones."""
    return seed if train else seed + 1


def _gl_context_class() -> type:
    """The offscreen GL context of ``MUJOCO_GL``, picked now: MuJoCo picks its default
    ``mujoco.GLContext`` when first imported, which may have happened before this module set egl."""
    backend = os.environ.get("MUJOCO_GL", "egl").lower()
    if backend == "egl":
        from mujoco.egl import GLContext
    elif backend == "osmesa":
        from mujoco.osmesa import GLContext
    else:
        GLContext = mujoco.GLContext
    return GLContext


class OffscreenCamera:
    """One camera of a MuJoCo model rendered offscreen: RGB and metric z-depth from one render pass.

    Fast settings: no shadows, no reflections, no multisampling (``offsamples = 0`` is written
    into ``model`` before the GL context is made). Images are upright; the ``corner*`` cameras,
    which MuJoCo renders upside down, are rotated 180 degrees and their pose with them.
    Depth: the depth buffer (reversed z, 1 at the near plane, 0 at the far one) is converted to
    metric z-depth with the model's clip planes ``near = znear * extent``, ``far = zfar * extent``:
    ``z = near * far / (near + d * (far - near))``; pixels farther than :data:`MAX_DEPTH_M`
    (the skybox) become 0.
    """

    def __init__(self, model: mujoco.MjModel, camera: str, size: int, depth: bool) -> None:
        limit = min(model.vis.global_.offwidth, model.vis.global_.offheight)
        if not 1 <= size <= limit:
            raise ValueError(f"image size must be in [1, {limit}] (the model's offscreen buffer); got {size}")
        self.camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if self.camera_id < 0:
            names = [model.camera(i).name for i in range(model.ncam)]
            raise ValueError(f"camera {camera!r} is not in the model; cameras: {names}")
        self.size, self.depth = size, depth
        model.vis.quality.offsamples = 0
        model.vis.quality.shadowsize = 0
        self._model = model
        try:
            self._gl = _gl_context_class()(size, size)
            self._gl.make_current()
            self._context: mujoco.MjrContext | None = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_50)
        except (ImportError, mujoco.FatalError) as error:
            raise RuntimeError(
                f"no offscreen OpenGL context with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: use egl (the default "
                "here) or osmesa (apt-get install libosmesa6)"
            ) from error
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        self._context.readDepthMap = mujoco.mjtDepthMap.mjDEPTH_ZEROFAR
        self._scene = mujoco.MjvScene(model, maxgeom=10_000)
        self._scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._camera.fixedcamid = self.camera_id
        self._option = mujoco.MjvOption()
        self._rect = mujoco.MjrRect(0, 0, size, size)
        self._rotated = camera.startswith("corner")
        self.near = float(model.vis.map.znear * model.stat.extent)
        self.far = float(model.vis.map.zfar * model.stat.extent)
        self._rgb = np.empty((size, size, 3), dtype=np.uint8)
        self._depth = np.empty((size, size), dtype=np.float32)

    def render(self, data: mujoco.MjData) -> tuple[np.ndarray, np.ndarray | None]:
        """-> image ``[H, W, 3]`` uint8 and, if ``depth``, z-depth ``[H, W]`` float32 metres."""
        if self._context is None:
            raise RuntimeError("render() after close()")
        self._gl.make_current()
        mujoco.mjv_updateScene(self._model, data, self._option, None, self._camera, mujoco.mjtCatBit.mjCAT_ALL, self._scene)
        mujoco.mjr_render(self._rect, self._scene, self._context)
        mujoco.mjr_readPixels(self._rgb, self._depth if self.depth else None, self._rect, self._context)
        # OpenGL rows run bottom-up: flip rows to get an upright image; the corner cameras also
        # need a 180-degree turn, which leaves only a column flip.
        view = (slice(None), slice(None, None, -1)) if self._rotated else (slice(None, None, -1),)
        image = np.ascontiguousarray(self._rgb[view])
        if not self.depth:
            return image, None
        buffer = self._depth[view].astype(np.float64)
        z = self.near * self.far / (self.near + buffer * (self.far - self.near))
        return image, np.where(z <= MAX_DEPTH_M, z, 0.0).astype(np.float32)

    def intrinsics(self) -> np.ndarray:
        """Pinhole ``K [3, 3]`` (float32) from the camera's vertical field of view; pixel centres at +0.5."""
        fovy = math.radians(float(self._model.cam_fovy[self.camera_id]))
        focal = 0.5 * self.size / math.tan(0.5 * fovy)
        centre = 0.5 * self.size
        return np.array([[focal, 0.0, centre], [0.0, focal, centre], [0.0, 0.0, 1.0]], dtype=np.float32)

    def cam_to_world(self, data: mujoco.MjData) -> np.ndarray:
        """The camera pose ``[4, 4]`` (float32), OpenCV axes (x right, y down, z forward) of the image."""
        rotation = data.cam_xmat[self.camera_id].reshape(3, 3) @ np.diag([1.0, -1.0, -1.0])  # MuJoCo looks along -z, y up
        if self._rotated:
            rotation = rotation @ np.diag([-1.0, -1.0, 1.0])
        pose = np.eye(4)
        pose[:3, :3], pose[:3, 3] = rotation, data.cam_xpos[self.camera_id]
        return pose.astype(np.float32)

    def close(self) -> None:
        """Free the GL resources (idempotent)."""
        if self._context is not None:
            self._gl.make_current()
            self._context.free()
            self._gl.free()
            self._context = None


class MetaWorldEnv:
    """One Meta-World v3 task seen through one camera, on the training or held-out layouts.

    Observations (dicts): ``image [H, W, 3]`` uint8, ``depth [H, W]`` float32 metres (with
    ``depth``; 0 = skybox), ``intrinsics [3, 3]``, ``cam_to_world [4, 4]``, ``state [S]`` (float32,
    the :data:`STATE_LAYOUTS` entry ``state``: hand xyz + gripper opening, with ``proprio_goal``
    also the goal xyz) and ``raw_state [39]`` (Meta-World's full observation,
    float64, privileged: object and goal positions). An episode is done on success or after
    ``max_steps`` steps (Meta-World's cap is 500). Use as a context manager or call :meth:`close`.
    """

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
    ) -> None:
        _check_tasks([task])
        self._state_indices = list(_check_state(state))
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {list(CAMERAS)}; got {camera!r}")
        if not 1 <= max_steps <= MAX_STEPS:
            raise ValueError(f"max_steps must be in [1, {MAX_STEPS}] (Meta-World's cap); got {max_steps}")
        self.task, self.instruction, self.max_steps = task, INSTRUCTIONS[task], max_steps
        benchmark = metaworld.MT1(task, seed=layout_seed(seed, train))
        self._layouts = benchmark.train_tasks
        self._env = benchmark.train_classes[task]()
        self._env.set_task(self._layouts[0])
        self._camera = OffscreenCamera(self._env.model, camera, image_size, depth)
        self._intrinsics = self._camera.intrinsics()
        self._steps = 0
        self._done = True

    @property
    def num_layouts(self) -> int:
        """How many layouts :meth:`reset` accepts (50)."""
        return len(self._layouts)

    def reset(self, layout: int) -> dict[str, np.ndarray]:
        """Start an episode on layout ``layout`` (``0 <= layout < num_layouts``); returns the first observation."""
        if not 0 <= layout < self.num_layouts:
            raise ValueError(f"layout must be in [0, {self.num_layouts}); got {layout}")
        self._env.set_task(self._layouts[layout])
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
        return obs

    def close(self) -> None:
        """Free the renderer and the simulator."""
        self._camera.close()
        self._env.close()

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def expert_policy(task: str) -> Callable[[np.ndarray], np.ndarray]:
    """Meta-World's scripted expert for ``task``: ``raw_state [39] -> action [4]`` clipped to [-1, 1]."""
    policy = ENV_POLICY_MAP[_check_tasks([task])[0]]()
    return lambda raw_state: np.clip(policy.get_action(raw_state), -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Episodes in worker processes
# --------------------------------------------------------------------------------------------
_progress: Any = None  # in a worker: the queue that counts finished episodes (set by _init_worker)


def _init_worker(progress: Any, threads: int) -> None:
    global _progress
    _progress = progress
    torch.set_num_threads(threads)


def _collect(job: Callable[..., Iterator[Any]], args: tuple[Any, ...]) -> list[Any]:
    """Run a job in a worker: its per-episode results, each also counted on the progress queue."""
    results = []
    for result in job(*args):
        results.append(result)
        _progress.put(1)
    return results


def _layout_chunks(tasks: Sequence[str], layouts: int, workers: int) -> list[tuple[str, range]]:
    """``(task, layouts)`` jobs: each task's layouts in ``min(workers, layouts)`` contiguous parts."""
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1; got {workers!r}")
    parts = min(workers, layouts)
    bounds = [round(i * layouts / parts) for i in range(parts + 1)]
    return [(task, range(lo, hi)) for task in tasks for lo, hi in zip(bounds[:-1], bounds[1:])]


def _run_episode_jobs(
    job: Callable[..., Iterator[Any]],
    jobs: Sequence[tuple[Any, ...]],
    workers: int,
    bar: tqdm,
) -> Iterator[list[Any]]:
    """``list(job(*args))`` for each of ``jobs``, yielded in order; ``bar`` advances per episode.

    ``job`` is a module-level generator function yielding one result per episode. With
    ``workers > 1`` the jobs run in that many spawned processes (each with
    ``cpu_count // workers`` torch threads and its own GL context); results come back in job
    order, so the output does not depend on ``workers``.
    """
    if workers == 1:
        for args in jobs:
            results = []
            for result in job(*args):
                results.append(result)
                bar.update(1)
            yield results
        return
    context = multiprocessing.get_context("spawn")  # a forked GL / OpenMP state is not safe
    progress = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(progress, threads)) as pool:
        futures: list[Future] = [pool.submit(_collect, job, args) for args in jobs]
        for future in futures:
            while not future.done():
                try:
                    bar.update(progress.get(timeout=0.2))
                except queue.Empty:
                    pass
            yield future.result()
        while True:  # count what is left on the queue
            try:
                bar.update(progress.get(timeout=0.05))
            except queue.Empty:
                break


# --------------------------------------------------------------------------------------------
# Scripted demonstrations
# --------------------------------------------------------------------------------------------
def _demo_episodes(
    task: str, layouts: range, image_size: int, camera: str, depth: bool, seed: int, max_steps: int, state: str
) -> Iterator[tuple[dict[str, np.ndarray] | None, str]]:
    """The scripted expert on ``layouts`` of ``task``: ``(frames or None if it failed, instruction)`` each."""
    expert = expert_policy(task)
    columns = camera_columns(camera)
    with MetaWorldEnv(task, image_size, camera, depth, seed, train=True, max_steps=max_steps, state=state) as env:
        for layout in layouts:
            steps: list[tuple[dict[str, np.ndarray], np.ndarray]] = []
            obs, success, done = env.reset(layout), False, False
            while not done:
                with warnings.catch_warnings():  # the scripted policies warn about their own gains
                    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)
                    action = expert(obs[RAW_STATE])
                steps.append((obs, action))
                obs, success, done = env.step(action)
            if not success:
                yield None, env.instruction
                continue
            frames = {
                "observation.state": np.stack([o["state"] for o, _ in steps]),
                "action": np.stack([a for _, a in steps]),
                columns["image"]: np.stack([o["image"] for o, _ in steps]),
                columns["intrinsics"]: np.stack([o["intrinsics"] for o, _ in steps]),
                columns["cam_to_world"]: np.stack([o["cam_to_world"] for o, _ in steps]),
            }
            if depth:
                frames[columns["depth"]] = np.stack([o["depth"] for o, _ in steps])
            yield frames, env.instruction


def generate_demos(
    tasks: Sequence[str],
    episodes_per_task: int,
    out: str | Path,
    image_size: int = 128,
    camera: str = "corner",
    depth: bool = False,
    seed: int = 0,
    max_steps: int = MAX_STEPS,
    overwrite: bool = False,
    workers: int = 1,
    state: str = "proprio",
) -> Path:
    """Scripted-expert demos on training layouts ``0 .. episodes_per_task - 1`` of each task -> a LeRobot dataset.

    Only successful episodes are kept (failures are logged). Each frame holds the observation
    and the expert's action taken from it; an episode ends with the action that reached success.
    Features: ``observation.state [S]`` (the :data:`STATE_LAYOUTS` entry ``state``, its names in
    ``meta/info.json``), ``action [4]``, the camera's image, intrinsics, pose and (with ``depth``)
    depth; fps 80, robot_type ``sawyer``, the task's instruction as its task.
    ``workers`` processes simulate in parallel; the dataset is the same for any number.
    """
    tasks = _check_tasks(tasks)
    state_indices = _check_state(state)
    if not 1 <= episodes_per_task <= NUM_LAYOUTS:
        raise ValueError(
            f"episodes_per_task must be in [1, {NUM_LAYOUTS}] (the layouts of one MT1 seed); got {episodes_per_task}"
        )
    writer = DatasetWriter(
        out, fps=FPS, cameras=[camera], state_dim=len(state_indices), action_dim=ACTION_DIM, depth=depth,
        cam_to_world=True, robot_type="sawyer", overwrite=overwrite, state_names=STATE_LAYOUTS[state][1],
    )
    jobs = [(task, layouts, image_size, camera, depth, seed, max_steps, state)
            for task, layouts in _layout_chunks(tasks, episodes_per_task, workers)]
    failures: dict[str, int] = {}
    with tqdm(total=len(tasks) * episodes_per_task, desc="expert demos", unit="episode") as bar:
        for args, episodes in zip(jobs, _run_episode_jobs(_demo_episodes, jobs, workers, bar)):
            for frames, instruction in episodes:
                if frames is None:
                    failures[args[0]] = failures.get(args[0], 0) + 1
                else:
                    writer.add_episode(frames, instruction)
            bar.set_postfix(failed=sum(failures.values()))
    for task, count in failures.items():
        logger.warning(
            "%s: %d of %d expert episodes failed within %d steps and were dropped", task, count, episodes_per_task, max_steps
        )
    total = len(tasks) * episodes_per_task
    logger.info("%d of %d expert episodes kept", total - sum(failures.values()), total)
    return writer.finalize()


def observation_batch(obs: Mapping[str, np.ndarray], instruction: str, depth: bool) -> dict[str, Any]:
    """One observation -> a policy batch of size 1 (keys of :mod:`vlablocks.policy.batch` + ``raw_state``).

    ``images [1, 1, 3, H, W]`` in [0, 1], ``task [instruction]``, ``state [1, S]``,
    ``raw_state [1, 39]`` (privileged; image policies ignore it) and, with ``depth``,
    ``depth [1, 1, H, W]``, ``intrinsics [1, 1, 3, 3]`` and ``cam_to_world [1, 1, 4, 4]``.
    """
    batch: dict[str, Any] = {
        keys.IMAGES: torch.from_numpy(obs["image"]).permute(2, 0, 1).float().div_(255.0)[None, None],
        keys.TASK: [instruction],
        keys.STATE: torch.from_numpy(obs["state"])[None],
        RAW_STATE: torch.from_numpy(obs[RAW_STATE].astype(np.float32))[None],
    }
    if depth:
        batch[keys.DEPTH] = torch.from_numpy(obs["depth"])[None, None]
        batch[keys.INTRINSICS] = torch.from_numpy(obs["intrinsics"])[None, None]
        batch[keys.CAM_TO_WORLD] = torch.from_numpy(obs["cam_to_world"])[None, None]
    return batch


def evaluate(
    policy: Callable[[dict[str, Any]], torch.Tensor],
    tasks: Sequence[str],
    episodes: int,
    image_size: int = 128,
    camera: str = "corner",
    depth: bool = False,
    seed: int = 0,
    execute_steps: int = 8,
    max_steps: int = MAX_STEPS,
    video_dir: str | Path | None = None,
    workers: int = 1,
    state: str = "proprio",
) -> dict[str, Any]:
    """Closed-loop success rates on held-out layouts ``0 .. episodes - 1`` of each task.

    ``policy(batch) -> actions [1, H, 4]`` gets :func:`observation_batch`'s batch; the first
    ``min(execute_steps, H)`` actions of each chunk are executed, then it re-plans. ``state``
    is the :data:`STATE_LAYOUTS` entry the policy was trained on. Each episode
    starts from torch's global seed ``seed * 1000 + layout`` (restored afterwards), so its outcome
    depends only on the policy, the task, the layout and ``seed``; ``workers`` processes give the
    same results (the policy must then be picklable: a module-level callable, or
    :class:`vlablocks.eval.run.CheckpointPolicy`, which ships only a checkpoint path).
    Returns ``{"per_task": {task: rate}, "per_bucket": {bucket: mean rate of its evaluated
    tasks}, "mean": mean over tasks, "episodes": episodes}``. With ``video_dir``, one video per
    episode, ``<task>_<episode>_<success|failure>.mp4`` (``.gif`` without imageio-ffmpeg).
    """
    tasks = _check_tasks(tasks)
    _check_state(state)
    if not 1 <= episodes <= NUM_LAYOUTS:
        raise ValueError(f"episodes must be in [1, {NUM_LAYOUTS}] (the held-out layouts); got {episodes}")
    if execute_steps < 1:
        raise ValueError(f"execute_steps must be >= 1; got {execute_steps}")
    if workers != 1:
        try:
            pickle.dumps(policy)
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            raise ValueError(
                f"policy must be picklable with workers={workers} (got {policy!r}: {error}); pass a module-level "
                "callable or vlablocks.eval.run.CheckpointPolicy(checkpoint_dir), or use workers=1"
            ) from error
    if video_dir is not None:
        Path(video_dir).mkdir(parents=True, exist_ok=True)
    jobs = [(policy, task, layouts, image_size, camera, depth, seed, execute_steps, max_steps, video_dir, state)
            for task, layouts in _layout_chunks(tasks, episodes, workers)]
    successes = {task: 0 for task in tasks}
    with tqdm(total=len(tasks) * episodes, desc="evaluate", unit="episode") as bar:
        for args, outcomes in zip(jobs, _run_episode_jobs(_eval_episodes, jobs, workers, bar)):
            successes[args[1]] += sum(outcomes)
            bar.set_postfix(last=f"{args[1]} {successes[args[1]] / episodes:.0%} so far")
    per_task = {task: count / episodes for task, count in successes.items()}
    per_bucket = {
        bucket: float(np.mean([rate for task, rate in per_task.items() if DIFFICULTY[task] == bucket]))
        for bucket in BUCKETS
        if any(DIFFICULTY[task] == bucket for task in per_task)
    }
    mean = float(np.mean(list(per_task.values())))
    return {"per_task": per_task, "per_bucket": per_bucket, "mean": mean, "episodes": episodes}


def _eval_episodes(
    policy: Callable[[dict[str, Any]], torch.Tensor],
    task: str,
    layouts: range,
    image_size: int,
    camera: str,
    depth: bool,
    seed: int,
    execute_steps: int,
    max_steps: int,
    video_dir: str | Path | None,
    state: str,
) -> Iterator[bool]:
    """Closed-loop episodes on held-out ``layouts`` of ``task``: success of each (videos written here)."""
    with MetaWorldEnv(task, image_size, camera, depth, seed, train=False, max_steps=max_steps, state=state) as env:
        for layout in layouts:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1000 + layout)
                success, frames = _rollout(policy, env, layout, depth, execute_steps, record=video_dir is not None)
            if video_dir is not None:
                outcome = "success" if success else "failure"
                write_video(frames, Path(video_dir) / f"{task}_{layout:02d}_{outcome}", FPS)
            yield success


def _rollout(
    policy: Callable[[dict[str, Any]], torch.Tensor],
    env: MetaWorldEnv,
    layout: int,
    depth: bool,
    execute_steps: int,
    record: bool,
) -> tuple[bool, list[np.ndarray]]:
    """One episode; returns (success, the images seen if ``record``)."""
    obs = env.reset(layout)
    frames = [obs["image"]] if record else []
    success, done = False, False
    while not done:
        with torch.no_grad():
            chunk = policy(observation_batch(obs, env.instruction, depth))
        if not isinstance(chunk, torch.Tensor) or chunk.dim() != 3 or chunk.shape[0] != 1 or chunk.shape[2] != ACTION_DIM:
            got = list(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
            raise ValueError(f"{env.task}: the policy must return actions [1, H, {ACTION_DIM}]; got {got}")
        for action in chunk[0, :execute_steps].detach().float().cpu().numpy():
            obs, success, done = env.step(action)
            if record:
                frames.append(obs["image"])
            if done:
                break
    return success, frames


def write_video(frames: Sequence[np.ndarray], stem: Path, fps: float) -> Path:
    """Frames ``[H, W, 3]`` uint8 -> ``stem.mp4`` (needs imageio-ffmpeg) or else ``stem.gif``.

    The GIF keeps every k-th frame so that it plays at most :data:`GIF_MAX_FPS` frames per second
    (real time). Written atomically; returns the path.
    """
    frames = list(frames)
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        import imageio_ffmpeg

        path = stem.with_name(stem.name + ".mp4")
        height, width = frames[0].shape[:2]
        with atomic_path(path) as tmp:
            writer = imageio_ffmpeg.write_frames(
                str(tmp), (width, height), fps=fps, codec="libx264", macro_block_size=2,
                output_params=["-f", "mp4"], ffmpeg_log_level="error",
            )
            try:
                writer.send(None)  # start ffmpeg
                for frame in frames:
                    writer.send(np.ascontiguousarray(frame))
            finally:
                writer.close()
        return path
    import imageio.v2 as imageio

    stride = max(1, math.ceil(fps / GIF_MAX_FPS))
    path = stem.with_name(stem.name + ".gif")
    with atomic_path(path) as tmp:
        imageio.mimwrite(tmp, frames[::stride], format="GIF", duration=1000.0 * stride / fps, loop=0)
    return path
