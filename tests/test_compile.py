"""The denoise step is torch.compile-friendly: one graph, no break, no recompilation per step or observation."""

import pytest
import torch
import torch._dynamo

from vlablocks.policy.checks import random_batch
from vlablocks.recipes.builder import build


@pytest.mark.parametrize("name", ["tiny_llava3d_deepfusion", "tiny_smolvla"])
def test_denoise_step_has_no_graph_break_and_compiles_once(name):
    """The context's precomputed parts (layout, projected cross keys/values) are graph inputs
    like the cache: a new observation gives new tensors of the same shapes, not a new graph."""
    torch.manual_seed(0)
    vla = build(name).eval()
    denoiser = vla.denoiser
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(denoiser.velocity, backend=counting_backend, dynamic=False)
    with torch.no_grad():
        for seed in (0, 1):  # two observations (same shapes), three ODE times each
            batch = random_batch(vla, 2, seed=seed)
            prefix, state = vla.encode(batch)
            context = denoiser.prepare(prefix)
            x_t = torch.randn(2, vla.config.horizon, vla.config.action_dim)
            if seed == 0:
                explained = torch._dynamo.explain(denoiser.velocity)(context, x_t, torch.ones(2), state)
                assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
                explained = torch._dynamo.explain(denoiser.prepare)(prefix)
                assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
            for k in range(3):
                t = torch.full((2,), 1.0 - k / 10)
                torch.testing.assert_close(step(context, x_t, t, state), denoiser.velocity(context, x_t, t, state),
                                           atol=1e-6, rtol=0)
    assert len(graphs) == 1, f"recompiled: {len(graphs)} graphs for 2 observations x 3 ODE steps"
