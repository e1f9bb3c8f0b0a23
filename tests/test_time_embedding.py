"""Tests for vlablocks.encoders.time: pi0's sinusoid and the TimestepEmbedder."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers.models.embeddings import Timesteps

from vlablocks.encoders.time import DiffusersTimestepEmbedder, TimestepEmbedder, get_time_embedder, sinusoidal_embedding


def reference_embedding(t: float, dim: int, min_period: float, max_period: float) -> list[float]:
    """REFERENCE.md's formula in pure Python float64, written independently of the library."""
    half = dim // 2
    fractions = [i / (half - 1) if half > 1 else 0.0 for i in range(half)]
    periods = [min_period * (max_period / min_period) ** f for f in fractions]
    angles = [2.0 * math.pi * t / p for p in periods]
    return [math.sin(a) for a in angles] + [math.cos(a) for a in angles]


@pytest.mark.parametrize("dim", [2, 8, 64, 256])
@pytest.mark.parametrize("periods", [(4e-3, 4.0), (1e-2, 10.0)])
def test_sinusoid_matches_float64_reference(dim: int, periods: tuple[float, float]) -> None:
    generator = torch.Generator().manual_seed(0)
    t = torch.cat([torch.tensor([0.0, 1.0, 0.001, 0.5]), torch.rand(12, generator=generator)])
    emb = sinusoidal_embedding(t, dim, *periods)
    assert emb.shape == (t.shape[0], dim)
    assert emb.dtype == torch.float32
    expected = torch.tensor(
        [reference_embedding(ti, dim, *periods) for ti in t.tolist()], dtype=torch.float64
    )
    assert (emb.double() - expected).abs().max().item() <= 1e-6


def test_sinusoid_layout_is_sin_then_cos() -> None:
    emb = sinusoidal_embedding(torch.zeros(3), 16)
    assert torch.equal(emb[:, :8], torch.zeros(3, 8))
    assert torch.equal(emb[:, 8:], torch.ones(3, 8))


def test_sinusoid_default_periods_are_pi0s() -> None:
    t = torch.tensor([0.3])
    assert torch.equal(sinusoidal_embedding(t, 32), sinusoidal_embedding(t, 32, 4e-3, 4.0))


@pytest.mark.parametrize("dim", [7, 0, -2])
def test_sinusoid_rejects_bad_dim(dim: int) -> None:
    with pytest.raises(ValueError, match=rf"dim must be a positive even integer.*got {dim}"):
        sinusoidal_embedding(torch.zeros(2), dim)


def test_sinusoid_rejects_bad_t_shape() -> None:
    with pytest.raises(ValueError, match=r"t must have shape \[B\], got \(2, 1\)"):
        sinusoidal_embedding(torch.zeros(2, 1), 8)


def test_embedder_is_mlp_of_sinusoid() -> None:
    torch.manual_seed(0)
    embedder = TimestepEmbedder(16, hidden_dim=32, out_dim=8)
    t = torch.rand(5)
    out = embedder(t)
    assert out.shape == (5, 8)
    assert embedder.mlp.fc1.in_features == 16 and embedder.mlp.fc1.out_features == 32
    torch.testing.assert_close(out, embedder.mlp(sinusoidal_embedding(t, 16)))


def test_embedder_widths_default_to_dim() -> None:
    embedder = TimestepEmbedder(12)
    assert embedder.mlp.fc1.out_features == 12
    assert embedder(torch.rand(3)).shape == (3, 12)


def test_embedder_passes_periods_to_sinusoid() -> None:
    torch.manual_seed(0)
    embedder = TimestepEmbedder(8, min_period=1e-2, max_period=10.0)
    t = torch.rand(4)
    torch.testing.assert_close(embedder(t), embedder.mlp(sinusoidal_embedding(t, 8, 1e-2, 10.0)))


def test_embedder_casts_sinusoid_to_weight_dtype() -> None:
    embedder = TimestepEmbedder(16, dtype=torch.bfloat16)
    out = embedder(torch.rand(4))
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()


def test_embedder_every_parameter_gets_a_gradient() -> None:
    embedder = TimestepEmbedder(16, hidden_dim=24, out_dim=8)
    embedder(torch.rand(4)).square().sum().backward()
    for name, param in embedder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_embedder_rejects_odd_dim_at_construction() -> None:
    with pytest.raises(ValueError, match="dim must be a positive even integer.*got 9"):
        TimestepEmbedder(9)


def test_embedder_builds_on_meta_device() -> None:
    embedder = TimestepEmbedder(16, device="meta")
    assert embedder.mlp.fc1.weight.device.type == "meta"


def test_diffusers_time_embedding_converts_the_time_convention():
    embedder = DiffusersTimestepEmbedder(16)
    t = torch.tensor([0.0, 0.25, 1.0])
    reference = embedder.mlp(Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)(torch.tensor([1000.0, 750.0, 0.0])))
    torch.testing.assert_close(embedder(t), reference)


def test_time_embedders_by_name():
    assert get_time_embedder("pi0") is TimestepEmbedder and get_time_embedder("diffusers") is DiffusersTimestepEmbedder
    with pytest.raises(ValueError, match=r"unknown time embedding 'gr00t'; valid: \['diffusers', 'pi0'\]"):
        get_time_embedder("gr00t")
