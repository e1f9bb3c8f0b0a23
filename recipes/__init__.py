"""vlablocks.recipes: YAML recipes, their loader and validator, the block registry, and the
factories that turn a recipe (``build``) or a saved policy directory (``from_pretrained``) into a
:class:`~vlablocks.policy.vla.VLA`. Policy code never imports this package; this package never
imports the trainer.

The names below are lazy re-exports, so importing the loader alone does not build anything.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build": "vlablocks.recipes.builder",
    "from_pretrained": "vlablocks.recipes.builder",
    "load_recipe": "vlablocks.recipes.loader",
    "Recipe": "vlablocks.recipes.loader",
    "RecipeError": "vlablocks.recipes.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlablocks.recipes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
