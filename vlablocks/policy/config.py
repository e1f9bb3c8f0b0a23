"""The ``policy:`` section of a recipe and pi0.5's discretised-state prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from vlablocks.policy.normalize import NormConvention, NormMode

#: how images of another size reach the vision encoder's square input (``policy.resize_images``).
ResizeMode = Literal["none", "pad_center", "pad_top_left"]
#: parameter dtypes (``policy.precision``; :mod:`vlablocks.policy.precision`).
Precision = Literal["float32", "bfloat16"]


@dataclass(frozen=True)
class PolicyConfig:
    """The ``policy:`` section of a recipe.

    Attributes:
        horizon: actions per chunk ``H``.
        action_dim: model action width ``A`` (data with fewer dims is zero-padded and masked).
        state_dim: model state width (``None``: no state).
        state_mode: where the state enters: ``"suffix"`` (pi0: a suffix token), ``"prefix"``
            (SmolVLA: a token at the end of the prefix), ``"text"`` (pi0.5: binned into the
            prompt) or ``"none"``.
        state_bins: number of bins for ``state_mode="text"`` (normalised state in [-1, 1]).
        state_norm, action_norm: normalisation modes (``mean_std``, ``quantile``, ``identity``).
        image_embed_scale: multiplies the projected image tokens (SmolVLA: ``sqrt(width)``, which
            a recipe writes as ``sqrt_width``; pi0: 1).
        image_shift: training-time augmentation: shift each sample's images (with its depth and
            principal point) by up to this many pixels (DrQ); 0 turns it off.
        resize_images: ``"none"``: images must already have the vision encoder's size;
            ``"pad_center"`` (pi0 / pi0.5, openpi) or ``"pad_top_left"`` (SmolVLA): any size is
            resized keeping its aspect ratio and zero-padded inside the policy
            (:func:`~vlablocks.policy.images.resize_with_pad`).
        task_newline: end each task text with ``"\\n"`` when it has none (LeRobot's pi0 and SmolVLA
            processors do so before tokenising).
        norm_convention: ``"vlablocks"`` or ``"lerobot"`` (:class:`~vlablocks.policy.normalize.FeatureNormalizer`).
        precision: parameter dtypes, set when the policy is built and kept by checkpoints:
            ``"float32"``, or ``"bfloat16"``: LeRobot's pi0 / pi0.5 policy, the fusion stack's
            attention and MLP weights and the token embedding in bf16, the vision encoder,
            projector, geometry encoder, every norm and the state / suffix projections in fp32
            (:mod:`~vlablocks.policy.precision`; deep-fusion denoisers only).
    """

    horizon: int
    action_dim: int
    state_dim: int | None = None
    state_mode: Literal["suffix", "prefix", "text", "none"] = "suffix"
    state_bins: int = 256
    state_norm: NormMode = "mean_std"
    action_norm: NormMode = "mean_std"
    image_embed_scale: float = 1.0
    image_shift: int = 0
    resize_images: ResizeMode = "none"
    task_newline: bool = False
    norm_convention: NormConvention = "vlablocks"
    precision: Precision = "float32"

    def __post_init__(self) -> None:
        if (self.state_dim is None) != (self.state_mode == "none"):
            raise ValueError(
                f"state_mode={self.state_mode!r} with state_dim={self.state_dim}: give a state_dim "
                "exactly when the state enters the model (state_mode 'none' means no state)"
            )
        for name in ("horizon", "action_dim", "state_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.precision not in get_args(Precision):
            raise ValueError(f"precision must be one of {list(get_args(Precision))}; got {self.precision!r}")


def discretize_state_prompts(tasks: Sequence[str], state: torch.Tensor, bins: int) -> list[str]:
    """pi0.5's prompts: ``"Task: {task}, State: {b_1 ... b_S};\\nAction: "`` per sample, with the
    normalised state ``[B, S]`` cut into ``bins`` equal bins of [-1, 1], as openpi and LeRobot
    do (``np.digitize(state, np.linspace(-1, 1, bins + 1)[:-1]) - 1``): values below -1 give
    ``-1``, values from 1 up give ``bins - 1``.

    The bins are found on the state's device (float64 edges, as numpy's) and read back once for
    the whole batch.
    """
    edges = torch.linspace(-1.0, 1.0, bins + 1, dtype=torch.float64, device=state.device)[:-1]
    digits = (torch.bucketize(state.double(), edges, right=True) - 1).tolist()
    prompts = []
    for task, row in zip(tasks, digits):
        cleaned = task.strip().replace("_", " ").replace("\n", " ")
        prompts.append(f"Task: {cleaned}, State: {' '.join(str(d) for d in row)};\nAction: ")
    return prompts
