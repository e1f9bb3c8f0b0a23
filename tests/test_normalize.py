"""FeatureNormalizer: known values and exact round trips for every mode and convention, with
padded model widths (a shifted or mis-scaled inverse would move every un-normalised action)."""

from __future__ import annotations

import pytest
import torch

from vlablocks.policy.normalize import EPS, QUANTILE_REACH, FeatureNormalizer, check_quantile_range

# three data dims in a model width of 5; the first has a tiny spread (an almost constant joint),
# where an inverse that gets the epsilon wrong is off by a visible amount
MEAN, STD = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1e-4, 0.5, 3.0])
Q01, Q99 = torch.tensor([-1.0, 0.0, 10.0]), torch.tensor([3.0, 1e-4, 14.0])


def _normalizer(mode: str, convention: str) -> FeatureNormalizer:
    norm = FeatureNormalizer(5, mode, convention=convention)
    norm.set_stats(mean=MEAN, std=STD, q01=Q01, q99=Q99)
    return norm


@pytest.mark.parametrize("convention", ["vlablocks", "lerobot"])
@pytest.mark.parametrize("mode", ["mean_std", "quantile", "identity"])
def test_round_trip_is_exact_and_pads_the_model_width(mode, convention):
    norm = _normalizer(mode, convention)
    x = MEAN + torch.tensor([[1.0, 0.3, -2.0], [-0.5, 2.0, 7.0], [0.0, 0.0, 0.0]])
    y = norm.normalize(x)
    assert y.shape == (3, 5) and torch.equal(y[:, 3:], torch.zeros(3, 2))  # padding dims are zero
    back = norm.unnormalize(torch.cat([y[:, :3], torch.randn(3, 2)], dim=1))  # padding values are dropped
    assert back.shape == (3, 3)
    # vlablocks' inverse is exact; LeRobot's divides by std + 1e-8 and multiplies by std (1e-4 relative here)
    exact = convention == "vlablocks" or mode != "mean_std"
    torch.testing.assert_close(back, x, atol=2e-6 if exact else 2e-4, rtol=1e-6)


@pytest.mark.parametrize("convention", ["vlablocks", "lerobot"])
def test_quantile_known_values_map_q01_q99_to_minus_one_one(convention):
    norm = _normalizer("quantile", convention)
    span = Q99 - Q01 + (EPS if convention == "vlablocks" else 0.0)  # LeRobot adds 1e-8 only to a zero span
    corners = torch.stack([Q01, Q01 + span / 2, Q01 + span])
    expected = torch.tensor([-1.0, 0.0, 1.0])[:, None].expand(3, 3)
    torch.testing.assert_close(norm.normalize(corners)[:, :3], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.unnormalize(torch.cat([expected, torch.zeros(3, 2)], dim=1)), corners,
                               atol=1e-6, rtol=0)  # -1 -> q01, 1 -> q99 (+ eps): no shift, no scale


def test_mean_std_known_values():
    vlablocks, lerobot = _normalizer("mean_std", "vlablocks"), _normalizer("mean_std", "lerobot")
    x = torch.tensor([[2.0001, 0.0, 6.5]])  # one std above the mean in the first two dims, two in the third
    torch.testing.assert_close(vlablocks.normalize(x)[0, :3], (x[0] - MEAN) / (STD + EPS), atol=1e-6, rtol=0)
    torch.testing.assert_close(lerobot.normalize(x)[0, :3], (x[0] - MEAN) / (STD + 1e-8), atol=1e-6, rtol=0)
    unit = torch.tensor([[1.0, 1.0, 1.0, 9.0, 9.0]])
    torch.testing.assert_close(vlablocks.unnormalize(unit)[0], MEAN + (STD + EPS), atol=1e-6, rtol=0)
    torch.testing.assert_close(lerobot.unnormalize(unit)[0], MEAN + STD, atol=1e-6, rtol=0)


def test_identity_passes_values_through_and_drops_padding():
    norm = FeatureNormalizer(4, "identity")
    x = torch.randn(2, 4)
    assert torch.equal(norm.normalize(x), x) and torch.equal(norm.unnormalize(x), x)


def test_buffers_are_made_on_the_given_device_and_stats_are_float32():
    norm = FeatureNormalizer(4, "mean_std", device="meta")
    assert {buffer.device.type for buffer in norm.buffers()} == {"meta"}
    cpu = FeatureNormalizer(4, "mean_std")
    cpu.set_stats(mean=torch.tensor([1, 2], dtype=torch.int64), std=torch.tensor([0.1, 0.2], dtype=torch.float64))
    assert cpu.mean.dtype == cpu.std.dtype == torch.float32 and cpu.width == 2 and int(cpu.data_dim) == 2
    torch.testing.assert_close(cpu.std, torch.tensor([0.1, 0.2, 1.0, 1.0]))


def test_errors_name_the_field_expected_and_received():
    with pytest.raises(ValueError, match=r"normalisation mode must be one of \['mean_std', 'quantile', 'identity'\]; got 'minmax'"):
        FeatureNormalizer(4, "minmax")
    with pytest.raises(ValueError, match=r"convention must be 'vlablocks' or 'lerobot'; got 'openpi'"):
        FeatureNormalizer(4, convention="openpi")
    norm = FeatureNormalizer(4, "mean_std")
    with pytest.raises(ValueError, match=r"mode 'mean_std' needs statistics \['std'\]"):
        norm.set_stats(mean=torch.zeros(2))
    with pytest.raises(ValueError, match=r"same length <= 4; got \{'mean': 2, 'std': 3\}"):
        norm.set_stats(mean=torch.zeros(2), std=torch.ones(3))  # two lengths, both within the width
    with pytest.raises(ValueError, match=r"same length <= 4; got \{'mean': 5, 'std': 5\}"):
        norm.set_stats(mean=torch.zeros(5), std=torch.ones(5))
    with pytest.raises(ValueError, match=r"statistic 'std' must be finite; dims \[1\] are \[nan\]"):
        norm.set_stats(mean=torch.zeros(2), std=torch.tensor([1.0, float("nan")]))
    norm.set_stats(mean=torch.zeros(2), std=torch.ones(2))
    with pytest.raises(ValueError, match=r"expected a feature of width 2 \(the data's\); got 3"):
        norm.normalize(torch.zeros(1, 3))


def test_repr_names_dim_mode_and_a_non_default_convention():
    assert FeatureNormalizer(4, "quantile").extra_repr() == "dim=4, mode='quantile'"
    assert FeatureNormalizer(4, convention="lerobot").extra_repr() == "dim=4, mode='mean_std', convention='lerobot'"


@pytest.mark.parametrize("reach", [99.0, 101.0])
def test_quantile_range_check_refuses_data_beyond_its_reach_on_either_side(reach):
    # [q01, q99] = [0, 2] maps to [-1, 1]: a value v maps to v - 1, so the data reaching `reach` units lies at
    # reach + 1 above or 1 - reach below (and the refusal names the dim and the reach)
    q01, q99 = torch.zeros(2), torch.full((2,), 2.0)
    for low, high in ([torch.zeros(2), torch.tensor([1.0, reach + 1])], [torch.tensor([1.0 - reach, 0.0]), torch.ones(2)]):
        if reach < QUANTILE_REACH:
            check_quantile_range(q01, q99, low, high)
        else:
            dim = 1 if high[1] > 2 else 0
            with pytest.raises(ValueError, match=rf"dims \[{dim}\] have a degenerate quantile range .* to {reach:.3g}; "):
                check_quantile_range(q01, q99, low, high)
