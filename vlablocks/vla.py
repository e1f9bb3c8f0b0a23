"""The assembled VLA: prefix builder + deep-fusion denoiser + flow-matching head + normalisation.

::

    images [B, N, 3, H, W] ── vision ── geometry? ── projector ──┐
    task (+ binned state, pi0.5) ── text embedding ─────────────┼─ prefix [B, P, D] ── prepare: prefix KV cache
    state (SmolVLA: a prefix token) ── state_proj ──────────────┘                              │
    state (pi0: a suffix token), x_t, t ── suffix encoder ── action expert ── velocity ── FlowMatchingHead

The policy contract: ``forward(batch)`` -> loss and metrics (training), ``predict_action(batch)``
-> an un-normalised action chunk ``[B, H, A]``, ``save_pretrained`` / ``from_pretrained``
(safetensors weights + the resolved recipe; normalisation statistics are buffers inside the
weights). Batch keys: :mod:`vlablocks.batch`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from vlablocks import batch as keys
from vlablocks.augment import random_shift
from vlablocks.checkpoint import load_weights, read_safetensors, verify_manifest, write_manifest
from vlablocks.heads.denoiser import Prefix
from vlablocks.heads.flow_matching import FlowMatchingHead, FlowMatchingOutput
from vlablocks.io import atomic_path
from vlablocks.normalize import FeatureNormalizer, NormMode

WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.yaml"


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
        image_embed_scale: multiplies the projected image tokens (SmolVLA: ``sqrt(width)``; pi0: 1).
        image_shift: training-time augmentation: shift each sample's images (with its depth and
            principal point) by up to this many pixels (DrQ); 0 turns it off.
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

    def __post_init__(self) -> None:
        if (self.state_dim is None) != (self.state_mode == "none"):
            raise ValueError(
                f"state_mode={self.state_mode!r} with state_dim={self.state_dim}: give a state_dim "
                "exactly when the state enters the model (state_mode 'none' means no state)"
            )
        for name in ("horizon", "action_dim", "state_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")


def discretize_state_prompt(task: str, state: torch.Tensor, bins: int) -> str:
    """pi0.5's prompt: ``"Task: {task}, State: {b_1 ... b_S};\\nAction: "`` with the normalised
    state (``[S]`` in [-1, 1]) cut into ``bins`` equal bins."""
    edges = torch.linspace(-1.0, 1.0, bins + 1, device=state.device)[1:-1]
    digits = torch.bucketize(state.float().clamp(-1.0, 1.0), edges)
    cleaned = task.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {cleaned}, State: {' '.join(str(int(d)) for d in digits)};\nAction: "


class VLA(nn.Module):
    """A complete vision-language-action policy assembled from blocks (see the module docstring).

    Args:
        config: the policy section.
        head: the flow-matching head (its denoiser holds the fusion stack).
        text: a text encoder ``texts -> (embeds [B, L, D], pad [B, L])``.
        vision: a vision backbone ``images [B', 3, H, W] -> [B', T, Dv]`` with a ``grid``, or ``None``.
        projector: vision width -> base width (``None``: identity).
        geometry: a geometry encoder fused with the vision tokens, or ``None``.
        recipe: the resolved recipe mapping, saved with the weights.
    """

    def __init__(
        self,
        config: PolicyConfig,
        head: FlowMatchingHead,
        text: nn.Module,
        vision: nn.Module | None = None,
        projector: nn.Module | None = None,
        geometry: nn.Module | None = None,
        recipe: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if geometry is not None and vision is None:
            raise ValueError("a geometry encoder needs a vision encoder: geometry is fused with vision tokens")
        if head.horizon != config.horizon or head.action_dim != config.action_dim:
            raise ValueError(
                f"head chunk [H={head.horizon}, A={head.action_dim}] differs from the policy's "
                f"[H={config.horizon}, A={config.action_dim}]"
            )
        self.config = config
        self.head = head
        self.text = text
        self.vision = vision
        self.geometry = geometry
        self.projector = projector if projector is not None else nn.Identity()
        width = text.width
        self.state_proj = nn.Linear(config.state_dim, width) if config.state_mode == "prefix" else None
        self.normalizer = nn.ModuleDict({"action": FeatureNormalizer(config.action_dim, config.action_norm)})
        if config.state_dim is not None:
            self.normalizer["state"] = FeatureNormalizer(config.state_dim, config.state_norm)
        self.recipe: dict[str, Any] = copy.deepcopy(dict(recipe or {}))

    # ------------------------------------------------------------------ prefix

    def embed_prefix(self, batch: Mapping[str, Any]) -> Prefix:
        """Image (+ geometry), text and (SmolVLA) state tokens: ``-> Prefix [B, P, D]``."""
        tasks = list(batch[keys.TASK])
        state = self._state(batch)
        if self.config.state_mode == "text":
            tasks = [discretize_state_prompt(t, s, self.config.state_bins) for t, s in zip(tasks, state)]
        embeds, pads = [], []
        if self.vision is not None:
            image_tokens, image_pad = self._embed_images(batch)
            embeds.append(image_tokens)
            pads.append(image_pad)
        text_embeds, text_pad = self.text(tasks)
        embeds.append(text_embeds)
        pads.append(text_pad)
        if self.state_proj is not None:
            embeds.append(self.state_proj(state.to(text_embeds.dtype))[:, None])
            pads.append(torch.ones_like(text_pad[:, :1]))
        embeds_t = torch.cat([e.to(text_embeds.dtype) for e in embeds], dim=1)
        pad = torch.cat(pads, dim=1)
        ar = torch.zeros_like(pad, dtype=torch.long)
        if self.state_proj is not None:
            ar[:, -1] = 1  # SmolVLA: the state token opens its own block at the end of the prefix
        return Prefix(embeds_t, pad, ar)

    def _embed_images(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch[keys.IMAGES]
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"batch['images'] must be [B, N, 3, H, W]; got {list(images.shape)}")
        b, n = images.shape[:2]
        tokens = self.vision(images.flatten(0, 1))
        valid = None
        if self.geometry is not None:
            geometry = {k: batch[k].flatten(0, 1) for k in keys.GEOMETRY_KEYS if batch.get(k) is not None}
            if not geometry:
                raise ValueError(
                    "this policy has a geometry encoder: the batch needs depth + intrinsics (+ cam_to_world), "
                    "points, or ray_directions + depth_along_ray"
                )
            tokens, valid = self.geometry(tokens, self.vision.grid, **geometry)
        tokens = self.projector(tokens) * self.config.image_embed_scale
        if valid is None:
            valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        elif valid.shape[1] != tokens.shape[1]:
            raise ValueError(
                f"the projector maps {valid.shape[1]} geometry-fused tokens to {tokens.shape[1]}: with a geometry "
                "encoder use a projector that keeps one token per input token (linear, mlp2x_gelu)"
            )
        image_mask = batch.get(keys.IMAGE_MASK)
        if image_mask is not None:
            valid = valid & image_mask.reshape(b * n, 1).to(valid.device)
        return tokens.reshape(b, -1, tokens.shape[-1]), valid.reshape(b, -1)

    def _state(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        if self.config.state_dim is None:
            return None
        if batch.get(keys.STATE) is None:
            raise ValueError(f"this policy uses the robot state (state_mode={self.config.state_mode!r}); batch['state'] is missing")
        return self.normalizer["state"].normalize(batch[keys.STATE])

    # ------------------------------------------------------------------ policy contract

    def forward(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None, t: torch.Tensor | None = None
    ) -> FlowMatchingOutput:
        """Flow-matching loss of a batch (normalised actions; padded steps and dims masked).

        ``t [B]``: fixed flow times instead of the head's time sampler (diagnostics).

        Raises:
            BatchError: the batch does not fit the policy (:meth:`check_batch`).
        """
        self.check_batch(batch, actions=True)
        if self.training and self.config.image_shift and batch.get(keys.IMAGES) is not None:
            images, depth, intrinsics = random_shift(
                batch[keys.IMAGES], self.config.image_shift, batch.get(keys.DEPTH), batch.get(keys.INTRINSICS), generator
            )
            batch = {**batch, keys.IMAGES: images, keys.DEPTH: depth, keys.INTRINSICS: intrinsics}
        prefix = self.embed_prefix(batch)
        actions_raw = batch[keys.ACTIONS]
        actions = self.normalizer["action"].normalize(actions_raw)
        dim_mask = torch.arange(self.config.action_dim, device=actions.device) < actions_raw.shape[-1]
        step_mask = batch.get(keys.ACTION_MASK)
        return self.head.loss(
            prefix,
            actions.to(prefix.embeds.device),
            self._suffix_state(batch),
            step_mask=None if step_mask is None else step_mask.bool(),
            dim_mask=dim_mask,
            generator=generator,
            t=t,
        )

    @torch.no_grad()
    def predict_action(
        self,
        batch: Mapping[str, Any],
        noise: torch.Tensor | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """An action chunk ``[B, H, A_data]`` in raw units (un-normalised, padding dims dropped).

        Raises:
            BatchError: the batch does not fit the policy (:meth:`check_batch`).
        """
        self.check_batch(batch, actions=False)
        prefix = self.embed_prefix(batch)
        chunk = self.head.sample(prefix, self._suffix_state(batch), noise=noise, num_steps=num_steps, generator=generator)
        return self.normalizer["action"].unnormalize(chunk)

    def batch_spec(self, actions: bool) -> keys.BatchSpec:
        """What this policy reads from a batch (``actions``: the training loss's targets too)."""
        return keys.BatchSpec(
            image_size=None if self.vision is None else self.vision.image_size,
            geometry=self.geometry is not None,
            state_dim=self.config.state_dim,
            horizon=self.config.horizon,
            action_dim=self.config.action_dim,
            actions=actions,
        )

    def check_batch(self, batch: Mapping[str, Any], actions: bool) -> None:
        """Raise :class:`~vlablocks.batch.BatchError` unless ``batch`` fits this policy: keys,
        shapes, batch sizes, dtypes, the device, finite values, images in [0, 1] (see
        :func:`vlablocks.batch.check_batch`)."""
        device = next(self.parameters()).device
        keys.check_batch(batch, self.batch_spec(actions), device)

    def _suffix_state(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        return self._state(batch) if self.config.state_mode == "suffix" else None

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in the backward pass instead of keeping them: the layers of
        the fusion stack and of DiT heads, and the blocks of the vision backbone."""
        from vlablocks.blocks.dit import DiT
        from vlablocks.blocks.fusion import DeepFusionStack

        for module in self.modules():
            if isinstance(module, (DeepFusionStack, DiT)):
                module.gradient_checkpointing = enabled
        if self.vision is not None:
            self.vision.set_gradient_checkpointing(enabled)

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | Path, manifest: bool = True) -> Path:
        """Write ``model.safetensors``, ``recipe.yaml`` and ``manifest.json`` (their checksums)
        into ``directory``, each file atomically.

        ``manifest=False`` leaves the manifest to a caller that adds files of its own (the trainer).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "producer": "vlablocks"})
        recipe = self.export_recipe(directory)
        with atomic_path(directory / RECIPE_FILE) as tmp:
            tmp.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        if manifest:
            write_manifest(directory)
        return directory

    def export_recipe(self, directory: Path) -> dict[str, Any]:
        """The recipe to save beside the weights: self-contained, nothing to load from elsewhere.

        Pretrained-weight sources are dropped (the weights are in ``model.safetensors``);
        components built from a local directory write what they need into ``directory``.
        """
        recipe = copy.deepcopy(self.recipe)
        recipe.pop("pretrained", None)
        for section, module in (("vision", self.vision), ("text", self.text)):
            export = getattr(module, "export_recipe", None)
            if export is not None and isinstance(recipe.get(section), dict):
                recipe[section] = export(recipe[section], directory)
        return recipe

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> VLA:
        """Rebuild from ``recipe.yaml`` and load ``model.safetensors``.

        The files are checked against ``manifest.json`` first (when there is one); the recipe is
        parsed by the recipe loader (plain YAML values only) and the weights are safetensors, so
        loading executes nothing from the directory.

        Raises:
            FileNotFoundError: ``recipe.yaml`` or ``model.safetensors`` is missing.
            CheckpointError: a file listed in the manifest is missing, truncated or corrupted, or the weights do not
                fit the recipe.
            RecipeError: ``recipe.yaml`` is not a valid recipe.
        """
        from vlablocks.recipes.builder import build
        from vlablocks.recipes.loader import parse_yaml, recipe_from_dict

        directory = Path(directory)
        recipe_path, weights_path = directory / RECIPE_FILE, directory / WEIGHTS_FILE
        for path in (recipe_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: not a vlablocks checkpoint directory")
        verify_manifest(directory, required=(RECIPE_FILE, WEIGHTS_FILE))
        data = parse_yaml(recipe_path.read_text(encoding="utf-8"), source=str(recipe_path))
        recipe = recipe_from_dict(data, name=directory.name, source=str(recipe_path))
        model = build(recipe, load_weights=False, base_dir=directory)
        load_weights(model, read_safetensors(weights_path, map_location), weights_path)
        return model.to(map_location)

