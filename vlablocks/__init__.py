"""vlablocks: tested building blocks for flow-matching vision-language-action policies.

The top-level names are lazy re-exports, so ``import vlablocks.blocks`` pulls in nothing above
the blocks.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "HeadSpace": "vlablocks.blocks",
    "ExpertSpec": "vlablocks.blocks",
    "DeepFusionStack": "vlablocks.blocks",
    "MultiExpertAttention": "vlablocks.blocks",
    "PrefixCache": "vlablocks.blocks",
    "block_causal_mask": "vlablocks.blocks",
    "positions_from_pad": "vlablocks.blocks",
    "SuffixEncoder": "vlablocks.encoders",
    "ConcatMlpTimeFusion": "vlablocks.encoders",
    "TimeTokenFusion": "vlablocks.encoders",
    "AdaRMSTimeFusion": "vlablocks.encoders",
    "TimestepEmbedder": "vlablocks.encoders",
    "FlowMatchingHead": "vlablocks.heads",
    "DeepFusionDenoiser": "vlablocks.heads",
    "Prefix": "vlablocks.heads",
    "VLA": "vlablocks.policy.vla",
    "build": "vlablocks.recipes.builder",
    "from_pretrained": "vlablocks.recipes.builder",
    "load_recipe": "vlablocks.recipes.loader",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlablocks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
