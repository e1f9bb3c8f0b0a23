"""``make demo``: the deep-fusion core at work, end to end, on a synthetic task.

Until the data, training and simulator work lands, this is an honest small example: it builds a
tiny deep-fusion VLA core by hand (a 4-layer base, a narrower action expert at every second
layer, pi0's suffix), trains it with flow matching on a synthetic task whose target action chunk
is a fixed function of the (random) prefix embeddings, then samples action chunks with the
prefix KV cache and reports shapes, timings and the error of the sampled chunks.

    python -m vlablocks.demo [--steps 150] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch import nn

from vlablocks.blocks import DeepFusionStack, ExpertSpec, HeadSpace, every_kth_layer
from vlablocks.encoders import ConcatMlpTimeFusion, SuffixEncoder
from vlablocks.heads import DeepFusionDenoiser, FlowMatchingHead, Prefix

logger = logging.getLogger("vlablocks.demo")

BASE_WIDTH, EXPERT_WIDTH, LAYERS = 128, 64, 4
PREFIX_LEN, HORIZON, ACTION_DIM, STATE_DIM = 48, 16, 7, 8


def build_policy() -> FlowMatchingHead:
    """A tiny deep-fusion policy: base 128 x 4 layers, expert 64 wide at layers 0 and 2."""
    space = HeadSpace(num_heads=4, num_kv_heads=2, head_dim=32)
    experts = [
        ExpertSpec("vlm", BASE_WIDTH, 4 * BASE_WIDTH, space),
        ExpertSpec("action", EXPERT_WIDTH, 4 * EXPERT_WIDTH, space, layers=every_kth_layer(LAYERS, 2)),
    ]
    stack = DeepFusionStack(experts, num_layers=LAYERS)
    suffix = SuffixEncoder(ACTION_DIM, EXPERT_WIDTH, HORIZON, ConcatMlpTimeFusion(EXPERT_WIDTH), state_dim=STATE_DIM)
    return FlowMatchingHead(DeepFusionDenoiser(stack, suffix), horizon=HORIZON, action_dim=ACTION_DIM)


def synthetic_batch(batch: int, generator: torch.Generator) -> tuple[Prefix, torch.Tensor, torch.Tensor]:
    """Random observations (prefix embeddings with padding) and state; actions depend on both."""
    embeds = torch.randn(batch, PREFIX_LEN, BASE_WIDTH, generator=generator)
    lengths = torch.randint(PREFIX_LEN // 2, PREFIX_LEN + 1, (batch,), generator=generator)
    pad = torch.arange(PREFIX_LEN)[None] < lengths[:, None]
    prefix = Prefix(embeds, pad, torch.zeros(batch, PREFIX_LEN, dtype=torch.long))
    state = torch.randn(batch, STATE_DIM, generator=generator)
    mix = torch.linspace(-1, 1, HORIZON * ACTION_DIM).view(HORIZON, ACTION_DIM)
    summary = (embeds[..., :ACTION_DIM] * pad[..., None]).sum(1) / lengths[:, None]
    actions = torch.tanh(summary[:, None, :] * 2.0 + state[:, None, :ACTION_DIM] * mix)
    return prefix, state, actions


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    policy = build_policy()
    stack = policy.denoiser.stack
    logger.info("policy: %s parameters (fusion stack %s)", f"{count(policy):,}", f"{count(stack):,}")
    logger.info("prefix [B, %d, %d] -> base; suffix [state, %d actions] -> expert at layers %s",
                PREFIX_LEN, BASE_WIDTH, HORIZON, stack.cached_layers)

    prefix, state, actions = synthetic_batch(args.batch, generator)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        out = policy.loss(prefix, actions, state, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if step == 1 or step % 25 == 0 or step == args.steps:
            logger.info("step %4d  loss %.4f  vel_cosine %.3f", step, out.loss.item(), out.vel_cosine.item())
    train_s = time.perf_counter() - start
    logger.info("training: %d steps of batch %d in %.1f s (%.0f ms/step)", args.steps, args.batch, train_s,
                1000 * train_s / args.steps)

    policy.eval()
    with torch.no_grad():
        start = time.perf_counter()
        chunk = policy.sample(prefix, state, generator=generator)
        sample_ms = 1000 * (time.perf_counter() - start)
        baseline = (actions - actions.mean(0, keepdim=True)).pow(2).mean().item()
        error = (chunk - actions).pow(2).mean().item()
    logger.info("sampled action chunk %s with %d Euler steps over the prefix cache in %.1f ms (batch %d)",
                list(chunk.shape), policy.num_steps, sample_ms, args.batch)
    logger.info("chunk MSE vs target %.4f (predicting the batch mean would give %.4f)", error, baseline)


if __name__ == "__main__":
    main()
