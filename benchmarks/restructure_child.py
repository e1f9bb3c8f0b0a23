"""The timing child of ``benchmarks/restructure.py``: times one importable vlablocks tree.

Run by the parent with ``PYTHONPATH=TREE`` (a folder holding ``vlablocks/`` with ``blocks/``,
``encoders/``, ``heads/`` and ``recipes/`` inside it); the editable install's import hook is
taken out of ``sys.meta_path`` first, and every ``vlablocks`` module loaded is checked to come
from ``TREE``. Works on both sides of the restructure: ``vla.encode(batch) -> (prefix, state)``
and ``vla.denoiser`` where they exist, else ``vla.embed_prefix(batch)`` + ``vla._suffix_state(batch)``
and ``vla.head.denoiser`` (commit 7df7761). The inputs are made here, not by the tree's
``random_batch``, so both sides time the same tensors.

Figures (one list of per-sample milliseconds each, after ``warmup`` untimed calls):

- ``denoise_step_ms``: one ``denoiser.velocity(context, x_t, t, state)`` call of
  ``--step-recipe`` at batch 1 (eval, inference mode), ``context = denoiser.prepare(prefix)`` made
  once; a sample is the mean of ``--inner`` consecutive calls;
- ``train_forward_ms``: the loss forward ``vla(batch)`` of ``--train-recipe`` at ``--train-batch``
  in train mode (autograd recording, no backward);
- ``train_forward_backward_ms``: the same forward and ``loss.backward()``.

Only stdlib and torch are imported at the top: ``vlablocks`` must come from the tree given.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

#: the prompts of the random batches (as ``random_batch`` of both trees has them)
TASKS = ("pick up the red block", "open the drawer", "push the button", "close the window")


def import_tree(tree: Path) -> ModuleType:
    """Import ``vlablocks`` from ``tree``, not from the editable install (SystemExit otherwise)."""
    sys.meta_path[:] = [finder for finder in sys.meta_path
                        if not getattr(finder, "__module__", "").startswith("__editable__")]
    vlablocks = importlib.import_module("vlablocks")
    check_modules(tree)
    return vlablocks


def check_modules(tree: Path) -> None:
    """SystemExit unless every loaded ``vlablocks`` module's file lies under ``tree``."""
    root = tree.resolve()
    strays = [f"{name}: {module.__file__}" for name, module in sorted(sys.modules.items())
              if name.split(".")[0] == "vlablocks" and getattr(module, "__file__", None)
              and root not in Path(module.__file__).resolve().parents]
    if strays:
        raise SystemExit(f"modules imported from outside {root}:\n" + "\n".join(strays))


def random_inputs(vla: torch.nn.Module, batch_size: int, seed: int) -> dict[str, Any]:
    """A batch with every key ``vla`` reads (the keys are the same on both sides)."""
    gen = torch.Generator().manual_seed(seed)
    config = vla.config
    batch: dict[str, Any] = {"task": [TASKS[i % len(TASKS)] for i in range(batch_size)]}
    if vla.vision is not None:
        size = vla.vision.image_size
        batch["images"] = torch.rand(batch_size, 1, 3, size, size, generator=gen)
        if vla.geometry is not None:
            batch["depth"] = 1.0 + 0.1 * torch.rand(batch_size, 1, size, size, generator=gen)
            intrinsics = torch.tensor([[size, 0.0, size / 2], [0.0, size, size / 2], [0.0, 0.0, 1.0]])
            batch["intrinsics"] = intrinsics.expand(batch_size, 1, 3, 3).clone()
    if config.state_dim is not None:
        batch["state"] = torch.randn(batch_size, config.state_dim, generator=gen)
    batch["actions"] = torch.randn(batch_size, config.horizon, config.action_dim, generator=gen)
    return batch


def api_of(vla: torch.nn.Module) -> str:
    """``"encode"`` (after the restructure) or ``"embed_prefix"`` (before)."""
    return "encode" if hasattr(vla, "encode") else "embed_prefix"


def encoder_of(vla: torch.nn.Module) -> Callable[[dict[str, Any]], tuple[Any, torch.Tensor | None]]:
    """``batch -> (prefix, suffix state)`` through whichever API the tree has."""
    if api_of(vla) == "encode":
        return lambda batch: tuple(vla.encode(batch))
    return lambda batch: (vla.embed_prefix(batch), vla._suffix_state(batch))


def denoiser_of(vla: torch.nn.Module) -> torch.nn.Module:
    """``vla.denoiser`` (after the restructure) or ``vla.head.denoiser`` (before)."""
    return vla.denoiser if hasattr(vla, "denoiser") else vla.head.denoiser


def sample_ms(fn: Callable[[], Any], repeats: int, warmup: int, inner: int = 1) -> list[float]:
    """``repeats`` samples of the wall time of ``fn()`` in ms, each the mean of ``inner`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append(1000 * (time.perf_counter() - start) / inner)
    return samples


def build_model(vlablocks_builder: ModuleType, recipe: str, seed: int) -> torch.nn.Module:
    """The recipe's model with weights drawn from ``seed`` (nothing loaded)."""
    torch.manual_seed(seed)
    return vlablocks_builder.build(recipe, load_weights=False)


def time_denoise_step(builder: ModuleType, args: argparse.Namespace) -> tuple[list[float], float, str]:
    """Samples of one denoise step at batch 1, the velocity's sum (for the side-by-side check)
    and the API used."""
    vla = build_model(builder, args.step_recipe, args.seed).eval()
    denoiser = denoiser_of(vla)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x_t = torch.randn(1, vla.config.horizon, vla.config.action_dim, generator=gen)
    t = torch.full((1,), 0.5)
    with torch.inference_mode():
        prefix, state = encoder_of(vla)(random_inputs(vla, 1, args.seed))
        context = denoiser.prepare(prefix)
        check = float(denoiser.velocity(context, x_t, t, state).double().sum())
        samples = sample_ms(lambda: denoiser.velocity(context, x_t, t, state), args.repeats, args.warmup, args.inner)
    return samples, check, api_of(vla)


def time_training(builder: ModuleType, args: argparse.Namespace) -> tuple[list[float], list[float], float]:
    """Samples of the training forward and of forward + backward, and the loss (for the check)."""
    vla = build_model(builder, args.train_recipe, args.seed).train()
    batch = random_inputs(vla, args.train_batch, args.seed)

    def forward() -> torch.Tensor:
        return vla(batch, generator=torch.Generator().manual_seed(args.seed)).loss

    def forward_backward() -> None:
        vla.zero_grad(set_to_none=True)
        forward().backward()

    check = float(forward().detach())
    forward_samples = sample_ms(forward, args.repeats, args.warmup)
    backward_samples = sample_ms(forward_backward, args.repeats, args.warmup)
    return forward_samples, backward_samples, check


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, required=True, help="the folder holding the vlablocks/ to time")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the figures")
    parser.add_argument("--step-recipe", default="tiny_smolvla")
    parser.add_argument("--train-recipe", default="tiny_pi05")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20, help="timed samples per figure")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--inner", type=int, default=10, help="denoise-step calls per sample")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    vlablocks = import_tree(args.tree)
    builder = importlib.import_module("vlablocks.recipes.builder")
    step, velocity_sum, api = time_denoise_step(builder, args)
    forward, forward_backward, loss = time_training(builder, args)
    check_modules(args.tree)  # also what the runs imported on the way
    result = {
        "vlablocks_file": str(Path(vlablocks.__file__).resolve()),
        "api": api,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "checks": {"velocity_sum": velocity_sum, "loss": loss},
        "figures": {"denoise_step_ms": step, "train_forward_ms": forward, "train_forward_backward_ms": forward_backward},
    }
    # a plain write: the parent owns the file, and the old tree has no vlablocks.io.atomic
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(f"imported {result['vlablocks_file']} ({result['api']} API)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
