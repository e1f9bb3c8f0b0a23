"""Generate the key reference of docs/recipes.md from the constructors themselves.

Every recipe key is a constructor argument, so the reference is read off the signatures (type,
default) and the ``Args:`` / ``Attributes:`` sections of the docstrings (description). A test
checks that docs/recipes.md holds exactly this text and that no key lacks a description.

    python -m vlablocks.tools.recipe_reference docs/recipes.md   # rewrite the generated part
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vlablocks.blocks.attention import HeadSpace
from vlablocks.encoders.geometry import GeometryEncoder
from vlablocks.encoders.suffix import SuffixEncoder
from vlablocks.encoders.text import TextEncoder
from vlablocks.heads.flow_matching import FlowMatchingHead
from vlablocks.io.atomic import atomic_path
from vlablocks.recipes import builder as builder_module
from vlablocks.recipes.components import expert
from vlablocks.recipes.pretrained import load_pretrained
from vlablocks.recipes.registry import REGISTRIES
from vlablocks.recipes.schema import annotations_of, describe, recipe_parameters
from vlablocks.train.config import TrainConfig
from vlablocks.policy.vla import PolicyConfig

BEGIN, END = "<!-- BEGIN GENERATED REFERENCE -->", "<!-- END GENERATED REFERENCE -->"
UNDOCUMENTED = "(undocumented)"

#: section -> (what it builds, keys the builder derives)
SECTIONS: list[tuple[str, Callable[..., Any], tuple[str, ...]]] = [
    ("policy", PolicyConfig, ()),
    ("backbone.experts[i]", expert, ("num_layers",)),
    ("backbone.experts[i].head_space", HeadSpace, ()),
    ("geometry", GeometryEncoder, ("vision_dim",)),
    ("text", TextEncoder, ("width",)),
    ("suffix", SuffixEncoder, ("action_dim", "horizon", "state_dim")),
    ("head", FlowMatchingHead, ("denoiser", "horizon", "action_dim")),
    ("pretrained", load_pretrained, ("vla",)),
    ("train", TrainConfig, ()),
]
#: typed families -> (where they appear, keys the builder derives)
FAMILIES: list[tuple[str, str, tuple[str, ...]]] = [
    ("backbone", "backbone", ()),
    ("vision", "vision", ()),
    ("projector", "projector", ("in_dim", "out_dim")),
    ("geometry_encoding", "geometry.encoding", ("dim",)),
    ("tokenizer", "text.tokenizer", ()),
    ("time_fusion", "suffix.time_fusion", ("width",)),
    ("time_sampler", "head.time_sampler", ()),
    ("denoiser", "denoiser", ("stack", "suffix_encoder")),
]


def docstring_arguments(fn: Callable[..., Any]) -> dict[str, str]:
    """``name -> description`` from the ``Args:`` / ``Attributes:`` sections of ``fn``'s docstrings."""
    docs = [inspect.getdoc(fn) or ""]
    if inspect.isclass(fn):  # the class, its __init__, and the classes it inherits arguments from
        docs += [inspect.getdoc(fn.__init__) or ""] + [cls.__doc__ or "" for cls in fn.__mro__[1:]]
        docs = [inspect.cleandoc(doc) for doc in docs]
    found: dict[str, str] = {}
    for doc in docs:
        for block in re.findall(r"(?:Args|Attributes):\n((?:[ \t]+.*\n?|\n)+)", doc):
            current: list[str] = []
            for line in block.splitlines():
                match = re.match(r"^    (\*?[\w ,/*]+?):\s*(.*)$", line)
                if match and not line.startswith("     "):
                    current = [n.strip().lstrip("*") for n in re.split(r"[,/]", match.group(1))]
                    for name in current:
                        found.setdefault(name, match.group(2).strip())
                elif line.startswith("     ") and current:
                    for name in current:
                        found[name] = f"{found[name]} {line.strip()}".strip()
    return found


def parameter_rows(fn: Callable[..., Any], derived: Iterable[str]) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, description)`` for each recipe key of ``fn``."""
    hints, docs, derived = annotations_of(fn), docstring_arguments(fn), set(derived)
    rows = []
    for name, param in recipe_parameters(fn).items():
        if name in derived:
            continue
        default = "required" if param.default is param.empty else f"`{param.default!r}`"
        kind = describe(hints.get(name, Any)).replace("|", "\\|")
        description = docs.get(name, UNDOCUMENTED).replace("|", "\\|")
        rows.append((f"`{name}`", kind, default.replace("|", "\\|"), description))
    return rows


def _table(rows: list[tuple[str, str, str, str]], derived: Iterable[str]) -> str:
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    derived = list(derived)
    if derived:
        lines.append(f"\nDerived by the builder (setting them is an error): {', '.join(f'`{d}`' for d in derived)}.")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The generated key reference."""
    parts = [BEGIN, "", f"Sections: {', '.join(f'`{s}`' for s in builder_module.SECTIONS)} "
             f"(required: {', '.join(f'`{s}`' for s in builder_module.REQUIRED_SECTIONS)}).", ""]
    for title, fn, derived in SECTIONS:
        parts += [f"### `{title}`: {getattr(fn, '__name__', fn)}", "", _table(parameter_rows(fn, derived), derived), ""]
    for family, where, derived in FAMILIES:
        for name in REGISTRIES[family].names():
            fn = REGISTRIES[family].get(name)
            parts += [f"### `{where}` `type: {name}`: {fn.__name__}", "", _table(parameter_rows(fn, derived), derived), ""]
    parts.append(END)
    return "\n".join(parts) + "\n"


def write_reference(path: str | Path) -> None:
    """Replace the generated part of ``path`` (between the markers) with :func:`reference_markdown`."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} lacks the markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with atomic_path(path) as tmp:
        tmp.write_text(head + reference_markdown().rstrip("\n") + tail, encoding="utf-8")


if __name__ == "__main__":
    write_reference(sys.argv[1] if len(sys.argv) > 1 else "docs/recipes.md")
