"""The assembled VLA: prefix builder + deep-fusion denoiser + flow-matching head + normalisation.

::

    images [B, N, 3, H, W] ── vision ── geometry? ── projector ──┐
    task (+ binned state, pi0.5) ── text embedding ─────────────┼─ prefix [B, P, D] ── prepare: prefix KV cache
    state (SmolVLA: a prefix token) ── state_proj ──────────────┘                              │
    state (pi0: a suffix token), x_t, t ── suffix encoder ── action expert ── velocity ── FlowMatchingHead

The policy contract: ``forward(batch)`` -> loss and metrics (training), ``predict_action(batch)``
-> an un-normalised action chunk ``[B, H, A]``, ``save_pretrained`` (safetensors weights + the
resolved recipe; normalisation statistics are buffers inside the weights; read back by
:func:`vlablocks.recipes.from_pretrained`, the factory side). Its structure, for the trainer,
the benchmarks and the converters: :attr:`VLA.backbone`, :meth:`VLA.encode` and
:meth:`VLA.param_groups`. Batch keys: :mod:`vlablocks.policy.batch`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from vlablocks.blocks.dit import DiT
from vlablocks.blocks.fusion import DeepFusionStack
from vlablocks.heads.denoiser import Prefix
from vlablocks.heads.flow_matching import FlowMatchingHead, FlowMatchingOutput
from vlablocks.io.atomic import atomic_path
from vlablocks.io.manifest import write_manifest
from vlablocks.policy import batch as keys
from vlablocks.policy.augment import random_shift
from vlablocks.policy.config import PolicyConfig, discretize_state_prompts
from vlablocks.policy.images import resize_with_pad
from vlablocks.policy.normalize import FeatureNormalizer
from vlablocks.policy.precision import apply_precision

WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.yaml"


class NonFiniteActionError(ValueError):
    """``predict_action`` computed NaN or infinite actions (a robot must never receive them)."""


class Encoded(NamedTuple):
    """What :meth:`VLA.encode` returns: the prefix, and the normalised state the suffix takes
    (``[B, state_dim]`` for pi0-style policies; ``None`` when the state is in the prefix or absent)."""

    prefix: Prefix
    state: torch.Tensor | None


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

    ``config.precision`` sets the parameter dtypes at the end of the constructor
    (:func:`~vlablocks.policy.precision.apply_precision`).
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
        if geometry is not None and config.resize_images != "none":
            raise ValueError(f"policy.resize_images={config.resize_images!r} with a geometry encoder: the policy would "
                             "resize images but not their depth and intrinsics; resize in the dataset reader instead")
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
        convention = config.norm_convention
        self.normalizer = nn.ModuleDict({"action": FeatureNormalizer(config.action_dim, config.action_norm,
                                                                     convention=convention)})
        if config.state_dim is not None:
            self.normalizer["state"] = FeatureNormalizer(config.state_dim, config.state_norm, convention=convention)
        self.recipe: dict[str, Any] = copy.deepcopy(dict(recipe or {}))
        #: the :class:`~vlablocks.policy.inference.InferenceOptions` this policy was optimised
        #: with (``None``: as built); an optimised policy cannot be saved.
        self.inference_options: Any = None
        apply_precision(self, config.precision)

    # ------------------------------------------------------------------ structure

    @property
    def backbone(self) -> DeepFusionStack:
        """The fusion stack: expert 0 is the base (the VLM's language model), the others the
        action path's experts (deep fusion) or none (DiT heads read the base)."""
        return self.head.denoiser.stack

    @property
    def denoiser(self) -> nn.Module:
        """The head's denoiser (``prepare(prefix)`` once per observation, ``velocity`` per ODE step)."""
        return self.head.denoiser

    def param_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """Every parameter in exactly one named group, as timm's ``group_matcher`` declares a
        model's structure; the trainer maps these groups to learning rates and freezing.

        Groups, in this order (absent parts left out; a parameter shared between parts belongs
        to the first): ``vision``, ``projector``, ``geometry``, ``backbone.layers.{i}`` (the
        base expert's weights in layer ``i``), ``backbone.final_norm``, ``text`` (the token
        embedding), ``experts.{name}`` (each other expert of the stack), ``state_proj``,
        ``suffix`` (the suffix encoder) and ``head`` (the rest: DiT blocks, feature projections).
        Values map ``named_parameters()`` names to parameters.
        """
        names = {id(p): n for n, p in self.named_parameters()}
        stack = self.backbone
        members: list[tuple[str, list[nn.Parameter]]] = [
            (name, list(module.parameters()))
            for name, module in (("vision", self.vision), ("projector", self.projector), ("geometry", self.geometry))
            if module is not None
        ]
        base: dict[str, list[nn.Parameter]] = {}
        for name, param in stack.expert_named_parameters(0):
            layer = name.split(".")[1] if name.startswith("layers.") else None
            base.setdefault(f"backbone.layers.{layer}" if layer else "backbone.final_norm", []).append(param)
        members += list(base.items())
        members.append(("text", list(self.text.parameters())))
        for index, spec in enumerate(stack.experts[1:], start=1):
            members.append((f"experts.{spec.name}", [p for _, p in stack.expert_named_parameters(index)]))
        if self.state_proj is not None:
            members.append(("state_proj", list(self.state_proj.parameters())))
        members.append(("suffix", list(self.head.denoiser.suffix_encoder.parameters())))
        members.append(("head", list(self.parameters())))
        claimed: set[int] = set()
        groups: dict[str, dict[str, nn.Parameter]] = {}
        for group, params in members:
            fresh = {names[id(p)]: p for p in params if id(p) not in claimed}
            claimed.update(id(p) for p in fresh.values())
            if fresh:
                groups[group] = fresh
        return groups

    def has_normalization_stats(self) -> bool:
        """Whether any normaliser holds statistics (not the identity defaults)."""
        return any(norm.has_stats for norm in self.normalizer.values())

    # ------------------------------------------------------------------ prefix

    def encode(self, batch: Mapping[str, Any]) -> Encoded:
        """The observation as the head takes it: ``Prefix [B, P, D]`` (image (+ geometry), text
        and, SmolVLA-style, state tokens) and the suffix's state (normalised once here)."""
        state = self._normalized_state(batch)
        tasks = list(batch[keys.TASK])
        if self.config.task_newline:
            tasks = [task if task.endswith("\n") else task + "\n" for task in tasks]
        if self.config.state_mode == "text":  # the data's dims only, not the zero padding
            tasks = discretize_state_prompts(tasks, state[:, : self.normalizer["state"].width], self.config.state_bins)
        embeds, pads = [], []
        if self.vision is not None:
            image_tokens, image_pad = self.embed_images(batch)
            embeds.append(image_tokens)
            pads.append(image_pad)
        text_embeds, text_pad = self.text(tasks)
        embeds.append(text_embeds)
        pads.append(text_pad)
        if self.state_proj is not None:
            embeds.append(self.state_proj(state.to(self.state_proj.weight.dtype))[:, None])
            pads.append(torch.ones_like(text_pad[:, :1]))
        embeds_t = torch.cat([e.to(text_embeds.dtype) for e in embeds], dim=1)
        pad = torch.cat(pads, dim=1)
        ar = torch.zeros_like(pad, dtype=torch.long)
        if self.state_proj is not None:
            ar[:, -1] = 1  # SmolVLA: the state token opens its own block at the end of the prefix
        return Encoded(Prefix(embeds_t, pad, ar), state if self.config.state_mode == "suffix" else None)

    def embed_images(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The image part of the prefix: ``images [B, N, 3, H, W]`` (+ geometry) -> tokens
        ``[B, N * T, D]`` and their validity ``[B, N * T]`` (geometry-less or masked cameras False)."""
        images = batch[keys.IMAGES]
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"batch['images'] must be [B, N, 3, H, W]; got {list(images.shape)}")
        b, n = images.shape[:2]
        images = images.flatten(0, 1)
        if self.config.resize_images != "none":
            images = resize_with_pad(images, self.vision.image_size, self.config.resize_images.removeprefix("pad_"))
        tokens = self.vision(images)
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

    def _normalized_state(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        if self.config.state_dim is None:
            return None
        if batch.get(keys.STATE) is None:
            raise ValueError(f"this policy uses the robot state (state_mode={self.config.state_mode!r}); batch['state'] is missing")
        return self.normalizer["state"].normalize(batch[keys.STATE])

    # ------------------------------------------------------------------ policy contract

    def forward(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None, t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None, reduction: str = "mean",
    ) -> FlowMatchingOutput:
        """Flow-matching loss of a batch (normalised actions; padded steps and dims masked).

        ``t [B]``: fixed flow times instead of the head's time sampler (diagnostics); ``noise``
        ``[K, B, H, A]`` (or ``[B, H, A]``) fixed noise in the normalised action space, and
        ``reduction="none"`` for the per-element squared errors: parity with another
        implementation (:meth:`FlowMatchingHead.loss <vlablocks.heads.flow_matching.FlowMatchingHead.loss>`).

        Raises:
            BatchError: the batch does not fit the policy (:meth:`check_batch`).
        """
        self.check_batch(batch, actions=True)
        if self.training and self.config.image_shift and batch.get(keys.IMAGES) is not None:
            images, depth, intrinsics = random_shift(
                batch[keys.IMAGES], self.config.image_shift, batch.get(keys.DEPTH), batch.get(keys.INTRINSICS), generator
            )
            batch = {**batch, keys.IMAGES: images, keys.DEPTH: depth, keys.INTRINSICS: intrinsics}
        prefix, state = self.encode(batch)
        actions_raw = batch[keys.ACTIONS]
        actions = self.normalizer["action"].normalize(actions_raw)
        dim_mask = torch.arange(self.config.action_dim, device=actions.device) < actions_raw.shape[-1]
        step_mask = batch.get(keys.ACTION_MASK)
        return self.head.loss(
            prefix,
            actions.to(prefix.embeds.device),
            state,
            step_mask=None if step_mask is None else step_mask.bool(),
            dim_mask=dim_mask,
            generator=generator,
            t=t,
            noise=noise,
            reduction=reduction,
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
            NonFiniteActionError: the chunk holds NaN or infinite values (never returned).
        """
        self.check_batch(batch, actions=False)
        prefix, state = self.encode(batch)
        chunk = self.head.sample(prefix, state, noise=noise, num_steps=num_steps, generator=generator)
        actions = self.normalizer["action"].unnormalize(chunk)
        self.check_actions(actions)
        return actions

    @staticmethod
    def check_actions(actions: torch.Tensor) -> None:
        """Raise :class:`NonFiniteActionError` unless every value of ``actions [B, H, A]`` is
        finite: one reduction on the device, read back once per chunk (``vlablocks bench`` times it)."""
        if not bool(torch.isfinite(actions).all()):
            bad = int((~torch.isfinite(actions)).sum())
            raise NonFiniteActionError(
                f"predict_action produced {bad} non-finite of {actions.numel()} action values: check the inputs "
                "(e.g. intrinsics with fx = 0, depth of 1e30) and the weights (a damaged checkpoint)"
            )

    def batch_spec(self, actions: bool) -> keys.BatchSpec:
        """What this policy reads from a batch (``actions``: the training loss's targets too)."""
        return keys.BatchSpec(
            image_size=None if self.vision is None else self.vision.image_size,
            any_image_size=self.config.resize_images != "none",
            geometry=self.geometry is not None,
            state_dim=self.config.state_dim,
            horizon=self.config.horizon,
            action_dim=self.config.action_dim,
            actions=actions,
        )

    def check_batch(self, batch: Mapping[str, Any], actions: bool) -> None:
        """Raise :class:`~vlablocks.policy.batch.BatchError` unless ``batch`` fits this policy: keys,
        shapes, batch sizes, dtypes, the device, finite values, images in [0, 1] (see
        :func:`vlablocks.policy.batch.check_batch`)."""
        device = next(self.parameters()).device
        keys.check_batch(batch, self.batch_spec(actions), device)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in the backward pass instead of keeping them: the layers of
        the fusion stack and of DiT heads, and the blocks of the vision backbone."""
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
        if self.inference_options is not None:
            raise ValueError(f"this policy was optimised for inference ({self.inference_options.name}): its parameters "
                             "were fused or quantised; save the policy as loaded instead")
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
