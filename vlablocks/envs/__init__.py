"""Environments behind the evaluation protocol (:mod:`vlablocks.eval.protocol`); Meta-World is one.

:data:`ENVS` maps a name to the module that implements it; the module is imported only when the
environment is asked for (simulators are optional, heavy dependencies). Each such module has
``eval_env_factory(data_info, image_size, depth, seed, video_size) -> EnvFactory``: the
environments a training run (its ``data.json``) is evaluated in.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from vlablocks.eval.protocol import EnvFactory
from vlablocks.eval.video import VIDEO_SIZE

ENVS: dict[str, str] = {
    "metaworld": "vlablocks.envs.metaworld.env",
}


def eval_env_factory(
    name: str, data_info: Mapping[str, Any], image_size: int | None, depth: bool, seed: int, video_size: int = VIDEO_SIZE
) -> EnvFactory:
    """The factory of environment ``name`` for evaluating a run trained on ``data_info``.

    ``image_size``: the policy's camera resolution (None: the dataset's); ``depth``: whether the
    policy reads depth; ``seed``: picks the held-out episodes; ``video_size``: px of video frames.
    """
    if name not in ENVS:
        raise ValueError(f"unknown environment {name!r}; valid names: {sorted(ENVS)}")
    module = importlib.import_module(ENVS[name])
    return module.eval_env_factory(data_info, image_size=image_size, depth=depth, seed=seed, video_size=video_size)
