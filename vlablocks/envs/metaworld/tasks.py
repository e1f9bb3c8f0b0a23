"""Meta-World (v3) task tables: instructions, difficulty buckets, MT10, state layouts and layout seeds.

Pure data and checks: importing this module needs neither Meta-World nor MuJoCo.

Layouts: ``metaworld.MT1(task, seed=s)`` gives 50 fixed object/goal layouts. The training
layouts of ``seed`` are those of ``MT1(task, seed=seed)``; the held-out layouts are those of
``MT1(task, seed=seed + 1)`` (:func:`layout_seed`). Demos made with ``seed=s`` and an evaluation
with ``seed=s`` therefore never share a layout (do not train on demos of ``seed=s + 1`` and
evaluate with ``seed=s``).
"""

from __future__ import annotations

from collections.abc import Sequence

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
BUCKETS = ("easy", "medium", "hard", "very_hard")

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


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """``tasks`` as a list; ValueError listing the valid names if one is unknown or none is given."""
    unknown = [t for t in tasks if t not in INSTRUCTIONS]
    if unknown or not tasks:
        raise ValueError(f"unknown Meta-World task(s) {unknown or list(tasks)}; valid names: {sorted(INSTRUCTIONS)}")
    return list(tasks)


def check_state(state: str) -> tuple[int, ...]:
    """The raw-observation indices of the :data:`STATE_LAYOUTS` entry ``state`` (ValueError if unknown)."""
    if state not in STATE_LAYOUTS:
        raise ValueError(f"state must be one of {list(STATE_LAYOUTS)}; got {state!r}")
    return STATE_LAYOUTS[state][0]


def check_camera(camera: str) -> str:
    """``camera`` if it is one of :data:`CAMERAS` (ValueError otherwise)."""
    if camera not in CAMERAS:
        raise ValueError(f"camera must be one of {list(CAMERAS)}; got {camera!r}")
    return camera


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
