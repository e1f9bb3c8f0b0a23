"""Build a :class:`~vlablocks.policy.vla.VLA` from a recipe.

Sections (every key of each is a constructor argument of the block it names; sizes that
link blocks are derived here, once, and setting them in a recipe is an error):

| section | builds | derived by the builder |
| --- | --- | --- |
| ``policy`` | :class:`~vlablocks.policy.vla.PolicyConfig` | |
| ``backbone`` (``type: deep_fusion``) | :class:`~vlablocks.blocks.fusion.DeepFusionStack`; ``experts`` items via :func:`~vlablocks.recipes.components.expert` | ``experts[i].num_layers`` |
| ``vision`` (``type:``) | a vision backbone | |
| ``geometry`` | :class:`~vlablocks.encoders.geometry.GeometryEncoder` (``encoding: {type: ...}``) | ``vision_dim``, ``encoding.dim`` |
| ``projector`` (``type:``) | vision -> base width | ``in_dim``, ``out_dim`` |
| ``text`` | :class:`~vlablocks.encoders.text.TextEncoder` (``tokenizer: {type: ...}``) | ``width`` |
| ``suffix`` | :class:`~vlablocks.encoders.suffix.SuffixEncoder` (``time_fusion: {type: ...}``) | ``action_dim``, ``horizon``, ``state_dim``, ``time_fusion.width``; ``width`` for deep-fusion denoisers (the expert's) |
| ``denoiser`` (``type:``, default ``deep_fusion``) | a denoiser over the backbone and the suffix encoder | ``stack``, ``suffix_encoder`` |
| ``head`` | :class:`~vlablocks.heads.flow_matching.FlowMatchingHead` (``time_sampler: {type: ...}``) | ``denoiser``, ``horizon``, ``action_dim`` |
| ``pretrained`` | weights to load: ``{llm: DIR, layout: transformers \\| llava \\| paligemma}`` | |
| ``train`` | training defaults for ``vlablocks train``, validated by :mod:`vlablocks.train` (not here) | |

Scales written ``sqrt_width`` (``text.embed_scale``, ``policy.image_embed_scale``) are derived
here as ``sqrt`` of the base expert's width (Gemma, pi0 and SmolVLA scale their embeddings so).

:func:`from_pretrained` rebuilds a policy saved by ``VLA.save_pretrained`` (or a trainer checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import vlablocks.recipes.components  # noqa: F401  (registers every block type)
from vlablocks.blocks.attention import HeadSpace
from vlablocks.encoders.geometry import GeometryEncoder
from vlablocks.encoders.suffix import SuffixEncoder
from vlablocks.encoders.text import TextEncoder
from vlablocks.heads.flow_matching import FlowMatchingHead
from vlablocks.recipes.components import expert
from vlablocks.recipes.loader import Recipe, load_recipe, parse_yaml, recipe_from_dict
from vlablocks.recipes.lora import (
    ADAPTER_WEIGHTS_FILE,
    inject_lora,
    is_lora_checkpoint,
    read_lora_base,
    read_lora_config,
    to_policy_state,
)
from vlablocks.recipes.pretrained import load_pretrained
from vlablocks.recipes.registry import REGISTRIES
from vlablocks.recipes.schema import call_with, check_value

from vlablocks.io.hub import resolve_policy
from vlablocks.io.manifest import CheckpointError, read_safetensors, verify_manifest
from vlablocks.io.manifest import load_weights as load_state
from vlablocks.policy.config import PolicyConfig
from vlablocks.policy.vla import RECIPE_FILE, VLA, WEIGHTS_FILE

SECTIONS = (
    "description", "policy", "backbone", "vision", "geometry", "projector", "text", "suffix", "denoiser", "head", "pretrained",
    "train",
)
REQUIRED_SECTIONS = ("policy", "backbone", "text", "suffix")
PATH_KEYS = ("path", "weights_path")
#: a scale written so in a recipe is ``sqrt(base width)``, derived by the builder.
SQRT_WIDTH = "sqrt_width"


def build(
    recipe: Recipe | str | Path,
    overrides: Iterable[str] = (),
    load_weights: bool = True,
    base_dir: str | Path | None = None,
    device: torch.device | str | None = None,
) -> VLA:
    """Build the VLA a recipe describes.

    Args:
        recipe: a :class:`Recipe`, a bundled recipe name or a path to a YAML file.
        overrides: ``key.path=value`` strings applied after loading (names/paths only).
        load_weights: load the ``pretrained:`` weights (and pretrained encoders' weights).
        base_dir: directory that relative ``path`` / ``weights_path`` values are resolved in.
        device: where to create the parameters (``"meta"`` builds full-size recipes for free).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise ValueError("overrides apply when loading a recipe; pass a name or path with overrides")
    return _Builder(recipe, load_weights, None if base_dir is None else Path(base_dir), device).build()


class _Builder:
    def __init__(self, recipe: Recipe, load_weights: bool, base_dir: Path | None, device: torch.device | str | None):
        self.recipe, self.load_weights, self.base_dir, self.device = recipe, load_weights, base_dir, device
        self.data = recipe.data

    def build(self) -> VLA:
        for key in self.data:
            if key not in SECTIONS:
                raise self.recipe.error(f"unknown section {key!r}; valid sections: {list(SECTIONS)}", str(key))
        for key in REQUIRED_SECTIONS:
            if self.data.get(key) is None:
                raise self.recipe.error(f"missing required section {key!r}", key)
        with torch.device(self.device) if self.device is not None else nullcontext():
            return self._build()

    def _build(self) -> VLA:
        stack = self.typed("backbone", self.data["backbone"], "backbone", converters={
            "experts": lambda value, path: self.experts(value, path, self.data["backbone"].get("num_layers")),
        })
        base_width = stack.experts[0].width
        config = call_with(PolicyConfig, self.data["policy"], "policy", self.recipe,
                           converters={"image_embed_scale": self.scale(base_width, float)})
        denoiser_node = self.data.get("denoiser") or {"type": "deep_fusion"}
        denoiser_cls = self.lookup("denoiser", denoiser_node, "denoiser")
        suffix_width = self.suffix_width(denoiser_cls, denoiser_node, stack)

        vision = self.typed("vision", self.data.get("vision"), "vision") if self.data.get("vision") else None
        geometry = None
        if self.data.get("geometry"):
            if vision is None:
                raise self.recipe.error("geometry is fused with vision tokens: it needs a vision section", "geometry")
            geometry = call_with(GeometryEncoder, self.data["geometry"], "geometry", self.recipe,
                                 derived={"vision_dim": vision.out_dim},
                                 converters={"encoding": lambda value, path: self.typed(
                                     "geometry_encoding", value, path, derived={"dim": vision.out_dim})})
        projector = None
        if vision is not None:
            projector = self.typed("projector", self.data.get("projector") or {"type": "linear"}, "projector",
                                   derived={"in_dim": vision.out_dim, "out_dim": base_width})
        elif self.data.get("projector"):
            raise self.recipe.error("a projector needs a vision section", "projector")

        text = call_with(TextEncoder, self.data["text"], "text", self.recipe, derived={"width": base_width},
                         converters={"tokenizer": lambda value, path: self.typed("tokenizer", value, path),
                                     "embed_scale": self.scale(base_width, float | None)})
        suffix_derived = {
            "action_dim": config.action_dim,
            "horizon": config.horizon,
            "state_dim": config.state_dim if config.state_mode == "suffix" else None,
        }
        if denoiser_cls.suffix_width_from_expert:
            suffix_derived["width"] = suffix_width
        suffix = call_with(SuffixEncoder, self.data["suffix"], "suffix", self.recipe, derived=suffix_derived,
                           converters={"time_fusion": lambda value, path: self.typed(
                               "time_fusion", value, path, derived={"width": suffix_width})})
        denoiser = self.typed("denoiser", denoiser_node, "denoiser", derived={"stack": stack, "suffix_encoder": suffix})
        head = call_with(FlowMatchingHead, self.data.get("head") or {}, "head", self.recipe, derived={
            "denoiser": denoiser, "horizon": config.horizon, "action_dim": config.action_dim,
        }, converters={"time_sampler": lambda value, path: self.typed("time_sampler", value, path)})
        vla = VLA(config, head, text, vision=vision, projector=projector, geometry=geometry, recipe=self.data)
        if self.load_weights and self.data.get("pretrained"):
            call_with(load_pretrained, self.data["pretrained"], "pretrained", self.recipe,
                      derived={"vla": vla}, converters={"llm": lambda value, path: self.path(value, path)})
        return vla

    def suffix_width(self, denoiser_cls: Any, node: dict, stack: Any) -> int:
        """The suffix width: the action expert's for deep-fusion denoisers, ``suffix.width`` for DiT ones."""
        if not denoiser_cls.suffix_width_from_expert:
            suffix = self.data["suffix"] if isinstance(self.data["suffix"], dict) else {}
            if "width" not in suffix:
                raise self.recipe.error(f"missing required key 'width' (the DiT width) for a {node['type']} denoiser", "suffix")
            return check_value(suffix["width"], int, "suffix.width", self.recipe)
        expert = node.get("expert", 1)
        if len(stack.experts) < 2:
            raise self.recipe.error(
                f"a {node['type']} denoiser drives an action expert: backbone.experts needs the base and at least one "
                f"more expert; got {[spec.name for spec in stack.experts]}", "backbone.experts")
        if not isinstance(expert, int) or isinstance(expert, bool) or not 1 <= expert < len(stack.experts):
            raise self.recipe.error(f"expected an expert index in 1..{len(stack.experts) - 1}; got {expert!r}", "denoiser.expert")
        return stack.experts[expert].width

    def scale(self, width: int, annotation: Any) -> Callable[[Any, str], Any]:
        """A converter for a scale key: ``sqrt_width`` -> ``sqrt(width)``; other values are
        checked against ``annotation``."""

        def convert(value: Any, key_path: str) -> Any:
            if value == SQRT_WIDTH:
                return math.sqrt(width)
            if isinstance(value, str):
                raise self.recipe.error(f"expected a number or {SQRT_WIDTH!r}; got {value!r}", key_path)
            return check_value(value, annotation, key_path, self.recipe)

        return convert

    def lookup(self, family: str, node: Any, key_path: str) -> Any:
        """The class a ``{type: NAME}`` node names."""
        registry = REGISTRIES[family]
        if not isinstance(node, dict) or "type" not in node:
            raise self.recipe.error(f"expected a mapping with a 'type' key; valid types: {registry.names()}", key_path)
        try:
            return registry.get(node["type"])
        except KeyError as err:
            raise self.recipe.error(err.args[0], f"{key_path}.type") from None

    def experts(self, value: Any, key_path: str, num_layers: Any) -> list:
        if not isinstance(value, list) or not value:
            raise self.recipe.error(f"expected a non-empty list of experts; got {value!r}", key_path)
        if not isinstance(num_layers, int) or isinstance(num_layers, bool):
            raise self.recipe.error(f"expected int; got {num_layers!r}", key_path.rsplit(".", 1)[0] + ".num_layers")
        return [
            call_with(expert, item, f"{key_path}.{i}", self.recipe, derived={"num_layers": num_layers},
                      converters={"head_space": lambda v, p: call_with(HeadSpace, v, p, self.recipe)})
            for i, item in enumerate(value)
        ]

    def typed(
        self,
        family: str,
        node: Any,
        key_path: str,
        derived: Mapping[str, Any] | None = None,
        converters: Mapping[str, Callable[[Any, str], Any]] | None = None,
    ) -> Any:
        """Build a ``{type: NAME, ...}`` node of a registered family."""
        fn = self.lookup(family, node, key_path)
        rest = {k: v for k, v in node.items() if k != "type"}
        converters = dict(converters or {})
        for key in PATH_KEYS:
            if key in rest and key not in converters:
                converters[key] = self.path
        return call_with(fn, rest, key_path, self.recipe, derived=derived, converters=converters)

    def path(self, value: Any, key_path: str) -> str | None:
        """A filesystem path value, resolved against ``base_dir`` when relative."""
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.recipe.error(f"expected a path (str); got {value!r}", key_path)
        path = Path(value).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        return str(path)


def _path_values(node: Any, key_path: str = "") -> Iterable[tuple[str, Any]]:
    """``(dotted key path, value)`` of every :data:`PATH_KEYS` entry in a recipe mapping."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            child = f"{key_path}.{key}" if key_path else str(key)
            if key in PATH_KEYS and value is not None:
                yield child, value
            else:
                yield from _path_values(value, child)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _path_values(value, f"{key_path}.{index}")


def from_pretrained(
    directory: str | Path, map_location: str | torch.device = "cpu", verify: bool = True, overrides: Iterable[str] = (),
) -> VLA:
    """Rebuild a policy from ``recipe.yaml`` and load ``model.safetensors`` (a directory written
    by ``VLA.save_pretrained`` or a trainer checkpoint, or a Hub model id holding one: fetched
    without pickled files by :func:`~vlablocks.io.hub.resolve_policy`).

    The files are checked against ``manifest.json`` first (``verify=False`` skips that, for a
    directory without a manifest the caller trusts; it is logged); the recipe is
    parsed by the recipe loader (plain YAML values only) and the weights are safetensors, so
    loading executes nothing from the directory. ``overrides`` (``key=value``) change the recipe
    before building (the weights must still fit it).

    A LoRA checkpoint (``adapter_config.json``, see :mod:`vlablocks.recipes.lora`) loads as its
    base policy with the peft adapters injected and loaded (merge them with
    :func:`~vlablocks.recipes.lora.merge_lora`).

    Raises:
        FileNotFoundError: ``recipe.yaml`` or ``model.safetensors`` is missing.
        CheckpointError: there is no manifest (and ``verify`` is on), a file listed in it is
            missing, truncated or corrupted, the weights do not fit the recipe, or the recipe
            names a path (``path``, ``weights_path``) outside the directory.
        RecipeError: ``recipe.yaml`` is not a valid recipe.
    """
    directory = resolve_policy(directory)
    lora = is_lora_checkpoint(directory)
    recipe_path, weights_path = directory / RECIPE_FILE, directory / (ADAPTER_WEIGHTS_FILE if lora else WEIGHTS_FILE)
    for path in (recipe_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a vlablocks checkpoint directory")
    verify_manifest(directory, required=(RECIPE_FILE, weights_path.name), verify=verify)
    model = build(_checkpoint_recipe(directory, overrides), load_weights=False, base_dir=directory)
    if lora:
        inject_lora(model, read_lora_config(directory))
        state = to_policy_state(model, read_lora_base(directory, verify), read_safetensors(weights_path, "cpu"))
        load_state(model, state, directory)
    else:
        load_state(model, read_safetensors(weights_path, map_location), weights_path)
    return model.to(map_location)


def _checkpoint_recipe(directory: Path, overrides: Iterable[str] = ()) -> Recipe:
    """The recipe of a checkpoint directory (with ``overrides``); CheckpointError for a path outside it."""
    recipe_path = directory / RECIPE_FILE
    overrides = list(overrides)
    if overrides:
        recipe = dataclasses.replace(load_recipe(recipe_path, overrides), name=directory.name)
    else:
        data = parse_yaml(recipe_path.read_text(encoding="utf-8"), source=str(recipe_path))
        recipe = recipe_from_dict(data, name=directory.name, source=str(recipe_path))
    for key_path, value in _path_values(recipe.data):
        if not isinstance(value, str) or not (directory / Path(value).expanduser()).resolve().is_relative_to(directory.resolve()):
            raise CheckpointError(f"{recipe_path}: {key_path}: {value!r} points outside the checkpoint; a checkpoint's "
                                  "recipe names only files inside it (its weights are in model.safetensors)")
    return recipe
