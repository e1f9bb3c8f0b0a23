"""Write the regression data of the application-layer restructure (issue 18), with the code of
the commit it runs in (committed once, from commit 7df7761, before the restructure):

- ``reference_outputs.safetensors``: for tiny_pi0, tiny_pi05, tiny_smolvla,
  tiny_llava3d_deepfusion and tiny_gr00t, with weights set from their parameter names (so the
  figures do not depend on the order the builder creates modules in): the batch, the loss and
  velocity cosine at fixed flow times and noise, and a sampled action chunk from fixed noise.
- ``legacy_checkpoint/``: a one-step trainer checkpoint of a narrowed tiny_llava3d_deepfusion
  (live + EMA weights, trainer state, manifest) and ``legacy_actions.safetensors``: the batch
  it was asked about and the actions it predicted (raw and EMA weights).

Run from the root of a checkout of 7df7761 (it imports that commit's module paths, e.g.
``vlablocks.trainer``, which the restructure replaced): ``python tests/data/make_reference.py``
(it refuses to overwrite).
The test side is ``tests/test_regression.py``; it reads only these files.
"""

from __future__ import annotations

import json
import sys
import tempfile
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
RECIPES = ("tiny_pi0", "tiny_pi05", "tiny_smolvla", "tiny_llava3d_deepfusion", "tiny_gr00t")
LEGACY_OVERRIDES = [
    "vision.channels=[8,16,16,16]", "vision.width=32",
    "backbone.experts.0.width=32", "backbone.experts.0.mlp_dim=64",
    "backbone.experts.1.width=16", "backbone.experts.1.mlp_dim=32",
    "backbone.experts.0.head_space.head_dim=8", "backbone.experts.1.head_space.head_dim=8",
    "backbone.num_layers=2", "policy.horizon=4",
]


def named_weights(model: torch.nn.Module) -> None:
    """Every parameter := ``0.05 * N(0, 1)`` from a generator seeded by its name (order-free)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            param.copy_(0.05 * torch.randn(param.shape, generator=gen))


def reference_outputs(out: dict[str, torch.Tensor], meta: dict[str, object]) -> None:
    from vlablocks.checks import random_batch
    from vlablocks.recipes.builder import build

    for name in RECIPES:
        vla = build(name).eval()
        named_weights(vla)
        batch = random_batch(vla, batch_size=2, seed=3)
        meta[name] = {"task": batch["task"]}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                out[f"{name}.batch.{key}"] = value
        t = torch.tensor([0.3, 0.8])
        loss = vla(batch, generator=torch.Generator().manual_seed(5), t=t)
        out[f"{name}.loss"] = loss.loss.detach()
        out[f"{name}.vel_cosine"] = loss.vel_cosine.detach()
        noise = torch.randn(2, vla.config.horizon, vla.config.action_dim, generator=torch.Generator().manual_seed(7))
        out[f"{name}.noise"] = noise
        out[f"{name}.actions"] = vla.predict_action(batch, noise=noise)


def legacy_checkpoint(out: dict[str, torch.Tensor], directory: Path) -> None:
    from vlablocks.checks import random_batch
    from vlablocks.recipes.builder import build
    from vlablocks.trainer import TrainConfig, Trainer, load_ema_policy
    from vlablocks.vla import VLA

    torch.manual_seed(0)
    vla = build("tiny_llava3d_deepfusion", overrides=LEGACY_OVERRIDES)
    samples = []
    for i in range(4):
        b = random_batch(vla, batch_size=1, seed=10 + i)
        samples.append({k: (v[0] if isinstance(v, torch.Tensor) else v[0]) for k, v in b.items()})
    config = TrainConfig(steps=1, batch_size=2, lr=1e-3, ema_decay=0.9, save_every=1, log_every=1)
    with tempfile.TemporaryDirectory() as run:
        trainer = Trainer(vla, samples, config, run)
        trainer.train()
        checkpoint = Path(run) / "checkpoints" / "step_0000001"
        directory.mkdir(parents=True)
        for path in checkpoint.iterdir():
            (directory / path.name).write_bytes(path.read_bytes())
    batch = random_batch(vla, batch_size=2, seed=99)
    noise = torch.randn(2, vla.config.horizon, vla.config.action_dim, generator=torch.Generator().manual_seed(11))
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[f"batch.{key}"] = value
    out["noise"] = noise
    out["actions"] = VLA.from_pretrained(directory).eval().predict_action(batch, noise=noise)
    out["actions_ema"] = load_ema_policy(directory).eval().predict_action(batch, noise=noise)
    (HERE / "legacy_tasks.json").write_text(json.dumps(batch["task"]) + "\n", encoding="utf-8")


def main() -> int:
    targets = [HERE / "reference_outputs.safetensors", HERE / "legacy_checkpoint", HERE / "legacy_actions.safetensors"]
    if any(p.exists() for p in targets):
        sys.stderr.write(f"refusing to overwrite: {[str(p) for p in targets if p.exists()]}\n")
        return 1
    torch.set_num_threads(1)
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, object] = {}
    reference_outputs(out, meta)
    save_file(out, str(targets[0]), metadata={"tasks": json.dumps(meta)})
    legacy: dict[str, torch.Tensor] = {}
    legacy_checkpoint(legacy, targets[1])
    save_file(legacy, str(targets[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
