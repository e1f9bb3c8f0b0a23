"""Rewrite the outputs of named recipes in ``reference_outputs.safetensors`` after a deliberate change (issue 21).

- ``tiny_pi05``: pi0.5's state bins now follow openpi and LeRobot exactly (``np.digitize(state,
  linspace(-1, 1, 257)[:-1]) - 1``: a normalised value below -1 is bin ``-1``; the code of 7df7761
  clamped it into bin 0), and the recorded batch has such a value.
- ``tiny_smolvla``: the SmolVLA recipes' RoPE base is LeRobot's 10000 (SmolVLA's released
  policies run LeRobot's ``apply_rope``, which ignores SmolVLM2's 100000).

For each name given, the loss, velocity cosine and actions are recomputed with the current code
from the recorded batch and noise, as ``tests/test_regression.py`` computes them. Every other
entry stays as ``make_reference.py`` wrote it at 7df7761.

Run from the repository root: ``python tests/data/update_reference.py tiny_pi05 tiny_smolvla``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_regression import batch_from, named_weights  # noqa: E402  (the test's own recipe)

from vlablocks.io.atomic import atomic_path  # noqa: E402
from vlablocks.recipes import build  # noqa: E402

PATH = Path(__file__).resolve().parent / "reference_outputs.safetensors"


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    ref = load_file(PATH)
    with safe_open(PATH, "pt") as handle:
        metadata = handle.metadata()
    for name in names:
        tasks = json.loads(metadata["tasks"])[name]["task"]
        vla = build(name).eval()
        named_weights(vla)
        batch = batch_from(ref, f"{name}.batch.", tasks)
        out = vla(batch, generator=torch.Generator().manual_seed(5), t=torch.tensor([0.3, 0.8]))
        ref[f"{name}.loss"] = out.loss.detach()
        ref[f"{name}.vel_cosine"] = out.vel_cosine.detach()
        ref[f"{name}.actions"] = vla.predict_action(batch, noise=ref[f"{name}.noise"])
    with atomic_path(PATH) as tmp:
        save_file(ref, str(tmp), metadata=metadata)


if __name__ == "__main__":
    main(sys.argv[1:])
