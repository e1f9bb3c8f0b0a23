"""Attention masks of real recipes drawn as text, for docs/architecture.md.

``python -m vlablocks.tools.mask_pictures docs/architecture.md`` rewrites the section between
``<!-- masks:begin -->`` and ``<!-- masks:end -->``; a test checks that it is current. Each
picture is the mask the policy really builds (:func:`~vlablocks.blocks.masks.block_causal_mask`
of the prefix and suffix layouts of a built recipe), with every run of interchangeable tokens
(same segment, padding and ``ar = 0``) shortened to two, so that it fits on a page.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from vlablocks.blocks.masks import block_causal_mask
from vlablocks.recipes.builder import build

from vlablocks.policy.checks import random_batch
from vlablocks.io.atomic import replace_section

SECTION = "masks"
#: (recipe, what it stands for)
RECIPES = (
    ("tiny_pi0", "pi0: bidirectional prefix; state, then the action chunk, each open a block"),
    ("tiny_pi05", "pi0.5: the state is in the prompt (binned); the action block conditions on time through AdaRMS"),
    ("tiny_smolvla", "SmolVLA: the state closes the prefix in a block of its own; actions attend to everything before"),
    ("tiny_llava3d_deepfusion", "the seed design (LLaVA-3D deep fusion): geometry-fused image tokens, text, then the action expert's suffix"),
)
#: sample 0's instruction, padded to the length of sample 1's
TASK, LONGER_TASK = "open it", "open the top drawer"
#: one letter per token kind
LABELS = {"image": "I", "text": "T", "state": "S", "action": "A", "time": "t"}


@dataclass(frozen=True)
class Layout:
    """Per token: its kind (a LABELS letter), whether it is real (``pad``) and its ``ar``."""

    labels: list[str]
    pad: list[bool]
    ar: list[int]


def recipe_layout(name: str) -> Layout:
    """The ``[prefix ; suffix]`` layout of sample 0 of a batch with the instructions
    :data:`TASK` and :data:`LONGER_TASK` (so sample 0's text is padded)."""
    torch.manual_seed(0)
    vla = build(name).eval()
    batch = {**random_batch(vla, 2), "task": [TASK, LONGER_TASK]}
    with torch.no_grad():
        prefix = vla.encode(batch).prefix
        images = vla.embed_images(batch)[0].shape[1] if vla.vision is not None else 0
    length = prefix.embeds.shape[1]
    state_in_prefix = vla.state_proj is not None
    labels = ["I"] * images + ["T"] * (length - images - state_in_prefix) + ["S"] * state_in_prefix
    encoder = vla.denoiser.suffix_encoder
    suffix_pad, suffix_ar = encoder.layout(1)
    state_in_suffix = encoder.state_proj is not None
    horizon = vla.config.horizon
    labels += ["S"] * state_in_suffix + ["A"] * horizon + ["t"] * (suffix_pad.shape[1] - state_in_suffix - horizon)
    pad = torch.cat([prefix.pad[0], suffix_pad[0]]).tolist()
    ar = torch.cat([prefix.ar[0], suffix_ar[0]]).tolist()
    return Layout(labels, pad, ar)


def shorten(layout: Layout, keep: int = 2) -> tuple[list[int], list[str]]:
    """Indices to draw (runs of interchangeable tokens cut to ``keep``) and what was cut, per run."""
    chosen, notes, run_start = [], [], 0
    for i in range(len(layout.labels) + 1):
        same = (0 < i < len(layout.labels) and layout.ar[i] == 0
                and (layout.labels[i], layout.pad[i]) == (layout.labels[i - 1], layout.pad[i - 1]))
        if i < len(layout.labels) and same:
            continue
        if i > run_start:  # close the run [run_start, i)
            chosen += list(range(run_start, min(i, run_start + keep)))
            if i - run_start > keep:
                kind = layout.labels[run_start] + ("" if layout.pad[run_start] else " (padding)")
                notes.append(f"{i - run_start} {kind}")
        run_start = i
    return chosen, notes


def picture(layout: Layout) -> tuple[str, str]:
    """``(drawing, caption)``: the mask as rows of ``#`` (the query row attends to the key
    column) and ``.``, and what the drawing leaves out."""
    chosen, notes = shorten(layout)
    mask = block_causal_mask(torch.tensor([layout.pad]), torch.tensor([layout.ar]))[0]
    names = [layout.labels[i] if layout.pad[i] else "_" for i in chosen]
    lines = ["keys".rjust(12) + "  " + " ".join(names)]
    for i, name in zip(chosen, names):
        lines.append(f"query {name} ar={layout.ar[i]}  " + " ".join("#" if mask[i, j] else "." for j in chosen))
    shortened = f"; runs shortened to 2 of: {', '.join(notes)}" if notes else ""
    return "\n".join(lines), f"{len(layout.labels)} tokens{shortened}"


def mask_markdown() -> str:
    """The generated section: one picture per recipe of :data:`RECIPES`."""
    parts = [
        "Generated from the built recipes (`python -m vlablocks.tools.mask_pictures docs/architecture.md`).",
        f"`I` image, `T` text (instruction {TASK!r}), `_` padding, `S` state, `A` action, `t` time token;",
        "`#`: the query (row) attends to the key (column). `ar` = 1 opens a new block.",
        "",
    ]
    for name, what in RECIPES:
        drawing, caption = picture(recipe_layout(name))
        parts += [f"**{what}** (`{name}`, {caption}):", "", "```text", drawing, "```", ""]
    return "\n".join(parts).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python -m vlablocks.tools.mask_pictures docs/architecture.md\n")
        return 2
    replace_section(argv[0], SECTION, mask_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
