"""Converted -> changed -> exported LeRobot policies, for the round-trip check.

The tiny LeRobot fixtures (``tests/data/lerobot_policies``) are converted, every weight and the
normalisation statistics are perturbed (so that a wrongly mapped tensor would show), and the
result is exported to LeRobot's layout. ``tests/data/lerobot_policies/roundtrip.py`` then loads
the exports with LeRobot's own classes in LeRobot's environment and records the actions LeRobot
predicts; ``tests/test_lerobot_policies.py`` checks them against vlablocks' actions.

Write the exports (from the repository root, in the project's environment)::

    .venv/bin/python tests/lerobot_roundtrip.py /tmp/vlablocks_exported
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import torch

from vlablocks.convert.lerobot import convert_lerobot
from vlablocks.convert.lerobot_export import export_lerobot
from vlablocks.policy.vla import VLA
from vlablocks.recipes.builder import from_pretrained

FIXTURES = Path(__file__).resolve().parent / "data" / "lerobot_policies"
TOKENIZER = FIXTURES / "tokenizer"
NAMES = ("pi0", "pi05", "smolvla")
#: the one size neither config.json nor the weights carry (pi0 / pi0.5's tiny SigLIP heads).
OVERRIDES = {"pi0": ["vision.config.num_attention_heads=2"], "pi05": ["vision.config.num_attention_heads=2"], "smolvla": []}


def tiny_vlm_repository(directory: Path) -> Path:
    """What SmolVLM2's Hub repository gives the converter, at the fixture's size: the tokenizer
    files and the VLM's config.json (its head counts, which the weights do not carry)."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in TOKENIZER.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    reference = json.loads((FIXTURES / "smolvla" / "reference.json").read_text())
    (directory / "config.json").write_text(json.dumps(reference["tiny_smolvlm"]))
    return directory


def convert_fixture(name: str, work: Path) -> Path:
    """The fixture ``name`` converted into ``work/converted``."""
    tokenizer = tiny_vlm_repository(work / "vlm") if name == "smolvla" else TOKENIZER
    return convert_lerobot(FIXTURES / name, work / "converted", tokenizer=tokenizer, overrides=OVERRIDES[name])


def perturb(vla: VLA) -> None:
    """Add ``0.02 * N(0, 1)`` seeded by each parameter's name to every parameter, and move the
    statistics (a fine-tune on other data would)."""
    with torch.no_grad():
        for name, param in vla.named_parameters():
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
        for normalizer in vla.normalizer.values():
            for stat in ("mean", "q01", "q99"):
                getattr(normalizer, stat).add_(0.1)
            normalizer.std.mul_(1.5)


def exported_fixture(name: str, work: Path) -> tuple[VLA, Path]:
    """``(the converted, perturbed policy, its LeRobot export in work/exported)``."""
    vla = from_pretrained(convert_fixture(name, work)).eval()
    perturb(vla)
    return vla, export_lerobot(vla, work / "converted", work / "exported")


def main(out: Path) -> None:
    for name in NAMES:
        _, exported = exported_fixture(name, out / name / "work")
        target = out / name / "exported"
        exported.rename(target)
        print(name, "->", target)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
