"""Rewrite the ``tiny_pi05.*`` outputs of ``reference_outputs.safetensors`` (issue 21).

pi0.5's state bins now follow openpi and LeRobot exactly (``np.digitize(state, linspace(-1, 1,
257)[:-1]) - 1``: a normalised value below -1 is bin ``-1``; the code of 7df7761 clamped it into
bin 0). The recorded tiny_pi05 batch has such a value, so its loss, velocity cosine and actions
change; this script recomputes those three with the current code, from the recorded batch and
noise, as ``tests/test_regression.py`` computes them. Every other entry stays as
``make_reference.py`` wrote it at 7df7761.

Run once from the repository root: ``python tests/data/update_pi05_reference.py``.
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
NAME = "tiny_pi05"


def main() -> None:
    torch.set_num_threads(1)
    ref = load_file(PATH)
    with safe_open(PATH, "pt") as handle:
        metadata = handle.metadata()
    tasks = json.loads(metadata["tasks"])[NAME]["task"]
    vla = build(NAME).eval()
    named_weights(vla)
    batch = batch_from(ref, f"{NAME}.batch.", tasks)
    out = vla(batch, generator=torch.Generator().manual_seed(5), t=torch.tensor([0.3, 0.8]))
    ref[f"{NAME}.loss"] = out.loss.detach()
    ref[f"{NAME}.vel_cosine"] = out.vel_cosine.detach()
    ref[f"{NAME}.actions"] = vla.predict_action(batch, noise=ref[f"{NAME}.noise"])
    with atomic_path(PATH) as tmp:
        save_file(ref, str(tmp), metadata=metadata)


if __name__ == "__main__":
    main()
