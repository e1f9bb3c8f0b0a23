"""block_causal_mask / positions: REFERENCE.md's worked example and a brute-force definition."""

import pytest
import torch

from vlablocks.blocks.masks import (
    as_additive_mask,
    block_causal_mask,
    positions_from_pad,
    suffix_mask_and_positions,
)


def brute_force_mask(pad: list[int], ar: list[int]) -> list[list[bool]]:
    """The big_vision definition, one cell at a time in plain Python."""
    n = len(pad)
    cumsum = [sum(ar[: i + 1]) for i in range(n)]
    return [[bool(pad[q] and pad[k] and cumsum[k] <= cumsum[q]) for k in range(n)] for q in range(n)]


def brute_force_positions(pad: list[int]) -> list[int]:
    return [sum(pad[: i + 1]) - 1 for i in range(len(pad))]


def test_reference_worked_example_cell_by_cell():
    # REFERENCE.md: pad = [1 1 1 1 0 | 1 | 1 1], ar = [0 0 0 0 0 | 1 | 1 0]
    pad = torch.tensor([[1, 1, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    ar = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 0]])
    mask = block_causal_mask(pad, ar)[0]
    prefix_cols = {0, 1, 2, 3}
    expected_cols = {
        0: prefix_cols, 1: prefix_cols, 2: prefix_cols, 3: prefix_cols,
        4: set(),                          # the pad row sees nothing
        5: prefix_cols | {5},              # state sees the prefix and itself
        6: prefix_cols | {5, 6, 7},        # actions see prefix, state and all actions
        7: prefix_cols | {5, 6, 7},
    }
    for q in range(8):
        for k in range(8):
            assert bool(mask[q, k]) == (k in expected_cols[q]), (q, k)
    assert positions_from_pad(pad)[0].tolist() == [0, 1, 2, 3, 3, 4, 5, 6]


def test_matches_brute_force_on_random_patterns():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = int(torch.randint(1, 4, (1,), generator=gen))
        length = int(torch.randint(1, 12, (1,), generator=gen))
        pad = torch.rand(batch, length, generator=gen) < 0.8
        ar = (torch.rand(batch, length, generator=gen) < 0.4).long()
        mask = block_causal_mask(pad, ar)
        positions = positions_from_pad(pad)
        for b in range(batch):
            assert mask[b].tolist() == brute_force_mask(pad[b].int().tolist(), ar[b].tolist())
            assert positions[b].tolist() == brute_force_positions(pad[b].int().tolist())


def test_ar_may_be_shared_across_the_batch():
    pad = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    ar = torch.tensor([0, 1, 1])
    assert torch.equal(block_causal_mask(pad, ar), block_causal_mask(pad, ar.expand(2, -1)))


def test_suffix_rows_are_the_joint_rows():
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        prefix_pad = torch.rand(2, 6, generator=gen) < 0.7
        prefix_ar = torch.zeros(2, 6, dtype=torch.long)
        suffix_pad = torch.ones(2, 4, dtype=torch.bool)
        suffix_ar = torch.tensor([1, 1, 0, 0])
        mask, positions = suffix_mask_and_positions(prefix_pad, prefix_ar, suffix_pad, suffix_ar)
        full = block_causal_mask(torch.cat([prefix_pad, suffix_pad], 1), torch.cat([prefix_ar, suffix_ar.expand(2, -1)], 1))
        assert torch.equal(mask, full[:, 6:])
        # positions continue from the number of real prefix tokens
        expected = prefix_pad.sum(1, keepdim=True) + torch.arange(4)
        assert torch.equal(positions, expected)
        # the prefix never sees the suffix when the suffix opens a new block
        assert not full[:, :6, 6:].any()


def test_additive_mask_is_finite_and_rejects_integers():
    mask = torch.tensor([[True, False], [False, False]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        additive = as_additive_mask(mask, dtype)
        assert additive.dtype == dtype and torch.isfinite(additive).all()
        assert additive[0, 0] == 0 and additive[0, 1] == torch.finfo(dtype).min
    float_mask = torch.tensor([[0.0, -5.0]])
    assert torch.equal(as_additive_mask(float_mask, torch.float32), float_mask)
    with pytest.raises(TypeError, match="bool .* or an additive float mask; got dtype torch.int64"):
        as_additive_mask(mask.long(), torch.float32)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"pad must be \[B, L\]"):
        block_causal_mask(torch.ones(3, dtype=torch.bool), torch.zeros(3))
    with pytest.raises(ValueError, match="ar must have length L=3"):
        block_causal_mask(torch.ones(1, 3, dtype=torch.bool), torch.zeros(4))
