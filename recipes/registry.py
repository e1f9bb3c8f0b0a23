"""Name -> class tables, one per block family, for the ``type:`` keys of recipes.

Users add their own classes with :func:`register`; the recipe builder looks names up with
:meth:`Registry.get`, whose error lists the valid names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


@dataclass
class Registry:
    """The registered names of one family (``vision``, ``projector``, ...)."""

    family: str
    entries: dict[str, Callable[..., Any]] = field(default_factory=dict)

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        """Register ``fn`` (a class or factory) under ``name``."""
        if name in self.entries and self.entries[name] is not fn:
            raise ValueError(f"{self.family} type {name!r} is already registered to {self.entries[name]!r}")
        self.entries[name] = fn

    def get(self, name: Any) -> Callable[..., Any]:
        """The class registered as ``name``; KeyError lists the valid names."""
        if not isinstance(name, str) or name not in self.entries:
            raise KeyError(f"unknown {self.family} type {name!r}; valid types: {sorted(self.entries)}")
        return self.entries[name]

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self.entries)


FAMILIES = (
    "vision", "projector", "geometry_encoding", "tokenizer", "backbone", "time_fusion", "time_sampler", "denoiser",
)
REGISTRIES: dict[str, Registry] = {family: Registry(family) for family in FAMILIES}


def register(family: str, name: str) -> Callable[[T], T]:
    """Decorator: ``@register("vision", "my_vit") class MyViT(nn.Module): ...``."""
    if family not in REGISTRIES:
        raise ValueError(f"unknown block family {family!r}; valid families: {sorted(REGISTRIES)}")

    def decorator(fn: T) -> T:
        REGISTRIES[family].register(name, fn)
        return fn

    return decorator
