"""The device a block creates its parameters on, for code that cannot pass ``device=`` itself.

Blocks take ``device``/``dtype`` and hand them to their layers; third-party constructors that
take no ``device`` (diffusers' ``Attention``, timm and transformers models) are built inside
:func:`device_context` instead, so a recipe still builds on the meta device.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def device_context(device: torch.device | str | None) -> AbstractContextManager:
    """``torch.device(device)`` as a context (tensors created inside land there), or a no-op for ``None``."""
    return nullcontext() if device is None else torch.device(device)
