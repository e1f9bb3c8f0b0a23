"""Tests for vlablocks.heads.flow_matching: samplers, path, loss, solvers and the head."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlablocks.blocks.mlp import Mlp
from vlablocks.heads.denoiser import Prefix
from vlablocks.heads.flow_matching import (
    SOLVERS,
    FlowMatchingHead,
    flow_path,
    flow_target,
    integrate,
    gaussian_loss_curve,
    masked_cosine_similarity,
    masked_mse,
    residual_var_at,
)
from vlablocks.heads.rtc import guided_velocity
from vlablocks.heads.time_samplers import BetaTimeSampler, UniformTimeSampler, sample_gamma

NUM_SAMPLES = 100_000


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Time samplers
# --------------------------------------------------------------------------------------------


def beta_moments(alpha: float, beta: float) -> tuple[float, float, float]:
    """Mean, variance and 4th central moment of Beta(alpha, beta)."""
    total = alpha + beta
    mean = alpha / total
    var = alpha * beta / (total**2 * (total + 1))
    excess_kurtosis = (
        6
        * ((alpha - beta) ** 2 * (total + 1) - alpha * beta * (total + 2))
        / (alpha * beta * (total + 2) * (total + 3))
    )
    return mean, var, (excess_kurtosis + 3) * var**2


def assert_moments_match(samples: torch.Tensor, mean: float, var: float, mu4: float) -> None:
    """Sample mean and variance within 3 standard errors of theory.

    SE(mean) = sqrt(var / n); SE(sample variance) = sqrt((mu4 - var^2) / n) (its asymptotic
    standard deviation, from the delta method).
    """
    n = samples.numel()
    samples = samples.double()
    se_mean = math.sqrt(var / n)
    se_var = math.sqrt((mu4 - var**2) / n)
    assert abs(samples.mean().item() - mean) < 3 * se_mean
    assert abs(samples.var().item() - var) < 3 * se_var


@pytest.mark.parametrize(
    ("alpha", "beta"),
    [(1.5, 1.0), (2.0, 3.0), (0.5, 0.7)],  # pi0's (inverse CDF), and two through Gamma draws
)
def test_beta_sampler_moments(alpha: float, beta: float) -> None:
    scale, offset = 0.999, 0.001
    sampler = BetaTimeSampler(alpha, beta, scale, offset)
    t = sampler(NUM_SAMPLES, "cpu", seeded())
    assert t.shape == (NUM_SAMPLES,) and t.dtype == torch.float32
    assert t.min() >= 0.001 and t.max() <= 1.0
    mean, var, mu4 = beta_moments(alpha, beta)
    assert_moments_match(t, mean * scale + offset, var * scale**2, mu4 * scale**4)


def test_beta_sampler_default_is_pi0_distribution() -> None:
    """Kolmogorov-Smirnov against pi0's CDF P(t <= x) = ((x - 0.001) / 0.999) ** 1.5."""
    t = BetaTimeSampler()(NUM_SAMPLES, "cpu", seeded()).double().sort().values
    cdf = ((t - 0.001) / 0.999) ** 1.5
    empirical = torch.arange(1, NUM_SAMPLES + 1, dtype=torch.float64) / NUM_SAMPLES
    ks = torch.maximum(empirical - cdf, cdf - (empirical - 1 / NUM_SAMPLES)).max().item()
    assert ks < 1.95 / math.sqrt(NUM_SAMPLES)  # 0.1% critical value


@pytest.mark.parametrize("concentration", [0.5, 1.0, 1.5, 3.0])
def test_sample_gamma_distribution(concentration: float) -> None:
    """Kolmogorov-Smirnov against the Gamma CDF (the regularised lower incomplete gamma)."""
    x = sample_gamma(concentration, NUM_SAMPLES, "cpu", seeded()).double().sort().values
    cdf = torch.special.gammainc(torch.tensor(concentration, dtype=torch.float64), x)
    empirical = torch.arange(1, NUM_SAMPLES + 1, dtype=torch.float64) / NUM_SAMPLES
    ks = torch.maximum(empirical - cdf, cdf - (empirical - 1 / NUM_SAMPLES)).max().item()
    assert ks < 1.95 / math.sqrt(NUM_SAMPLES)


@pytest.mark.parametrize("sampler", [BetaTimeSampler(), BetaTimeSampler(2.0, 3.0)])
def test_beta_sampler_generator_reproducible(sampler: BetaTimeSampler) -> None:
    assert torch.equal(sampler(64, "cpu", seeded(1)), sampler(64, "cpu", seeded(1)))
    assert not torch.equal(sampler(64, "cpu", seeded(1)), sampler(64, "cpu", seeded(2)))


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (0.2, 0.6)])
def test_uniform_sampler(low: float, high: float) -> None:
    sampler = UniformTimeSampler(low, high)
    t = sampler(NUM_SAMPLES, "cpu", seeded())
    assert t.shape == (NUM_SAMPLES,) and t.dtype == torch.float32
    assert t.min() >= low and t.max() <= high
    var = (high - low) ** 2 / 12
    assert abs(t.double().mean().item() - (low + high) / 2) < 3 * math.sqrt(var / NUM_SAMPLES)
    assert torch.equal(sampler(8, "cpu", seeded(3)), sampler(8, "cpu", seeded(3)))


def test_sampler_argument_errors() -> None:
    with pytest.raises(ValueError, match="alpha > 0 and beta > 0, got alpha=0.0, beta=1.0"):
        BetaTimeSampler(alpha=0.0)
    with pytest.raises(ValueError, match="offset \\+ scale <= 1.*scale=0.999, offset=0.1"):
        BetaTimeSampler(offset=0.1)
    with pytest.raises(ValueError, match="0 <= low < high <= 1, got low=0.5, high=0.5"):
        UniformTimeSampler(0.5, 0.5)
    with pytest.raises(ValueError, match="concentration must be > 0, got -1.0"):
        sample_gamma(-1.0, 4, "cpu")


# --------------------------------------------------------------------------------------------
# Path, target and loss
# --------------------------------------------------------------------------------------------


def test_flow_path_endpoints_and_per_sample_time() -> None:
    actions, noise = torch.randn(2, 3, 4, 5, generator=seeded()).double()
    torch.testing.assert_close(flow_path(actions, noise, torch.ones(3).double()), noise)
    torch.testing.assert_close(flow_path(actions, noise, torch.zeros(3).double()), actions)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    x_t = flow_path(actions, noise, t)
    torch.testing.assert_close(x_t[1], 0.5 * noise[1] + 0.5 * actions[1])
    torch.testing.assert_close(x_t[2], noise[2])


def test_flow_target_is_path_derivative() -> None:
    actions, noise = torch.randn(2, 3, 4, 5, generator=seeded()).double()
    t = torch.rand(3, generator=seeded(1)).double() * 0.8 + 0.1
    h = 1e-6
    derivative = (flow_path(actions, noise, t + h) - flow_path(actions, noise, t - h)) / (2 * h)
    torch.testing.assert_close(derivative, flow_target(actions, noise))


def brute_force_valid(b: int, h: int, a: int, step_mask, dim_mask) -> bool:
    step_ok = step_mask is None or bool(step_mask[b, h])
    dim_ok = dim_mask is None or bool(dim_mask[a] if dim_mask.ndim == 1 else dim_mask[b, a])
    return step_ok and dim_ok


def brute_force_mse(pred, target, step_mask, dim_mask) -> float:
    total, count = 0.0, 0
    batch, horizon, action_dim = pred.shape
    for b in range(batch):
        for h in range(horizon):
            for a in range(action_dim):
                if brute_force_valid(b, h, a, step_mask, dim_mask):
                    total += (float(pred[b, h, a]) - float(target[b, h, a])) ** 2
                    count += 1
    return total / count


def random_masks(kind: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    step_mask = torch.rand(3, 5, generator=seeded(1)) > 0.3
    dim_1d = torch.tensor([True, False, True, True])
    dim_2d = torch.rand(3, 4, generator=seeded(2)) > 0.3
    return {
        "none": (None, None),
        "steps": (step_mask, None),
        "dims": (None, dim_1d),
        "steps+dims_per_sample": (step_mask, dim_2d),
    }[kind]


MASK_KINDS = ["none", "steps", "dims", "steps+dims_per_sample"]


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masked_mse_matches_brute_force(kind: str) -> None:
    pred, target = torch.randn(2, 3, 5, 4, generator=seeded())
    step_mask, dim_mask = random_masks(kind)
    loss = masked_mse(pred, target, step_mask, dim_mask)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(brute_force_mse(pred, target, step_mask, dim_mask), 1e-6)


@pytest.mark.parametrize("kind", MASK_KINDS[1:])
def test_masked_mse_ignores_masked_elements(kind: str) -> None:
    pred, target = torch.randn(2, 3, 5, 4, generator=seeded())
    step_mask, dim_mask = random_masks(kind)
    valid = torch.tensor(
        [
            [[brute_force_valid(b, h, a, step_mask, dim_mask) for a in range(4)] for h in range(5)]
            for b in range(3)
        ]
    )
    pred.requires_grad_(True)
    masked_mse(pred, target, step_mask, dim_mask).backward()
    assert torch.all(pred.grad[~valid] == 0)
    assert torch.all(pred.grad[valid] != 0)

    changed = torch.where(valid, pred.detach(), 1e4)
    assert torch.equal(
        masked_mse(changed, target, step_mask, dim_mask),
        masked_mse(pred.detach(), target, step_mask, dim_mask),
    )


def test_masked_mse_all_masked_is_zero_without_nan() -> None:
    pred = torch.randn(2, 3, 4, requires_grad=True)
    loss = masked_mse(pred, torch.randn(2, 3, 4), step_mask=torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros(2, 3, 4))


def test_masked_mse_computes_in_float32() -> None:
    pred, target = torch.randn(2, 3, 5, 4, generator=seeded()).bfloat16()
    step_mask, dim_mask = random_masks("steps+dims_per_sample")
    loss = masked_mse(pred, target, step_mask, dim_mask)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, masked_mse(pred.float(), target.float(), step_mask, dim_mask))


def test_masked_mse_argument_errors() -> None:
    pred = torch.zeros(3, 5, 4)
    with pytest.raises(ValueError, match=r"step_mask must be a bool tensor of shape \[3, 5\]"):
        masked_mse(pred, pred, step_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"dim_mask must be .* \[4\] or \[3, 4\], got torch.float"):
        masked_mse(pred, pred, dim_mask=torch.ones(4))
    with pytest.raises(ValueError, match=r"pred and target .* got pred \[3, 5, 4\] and target"):
        masked_mse(pred, torch.zeros(3, 5, 3))


def test_masked_cosine_similarity() -> None:
    target = torch.randn(3, 5, 4, generator=seeded())
    step_mask, dim_mask = random_masks("steps+dims_per_sample")
    assert masked_cosine_similarity(2 * target, target).item() == pytest.approx(1.0)
    assert masked_cosine_similarity(-target, target).item() == pytest.approx(-1.0)
    valid = step_mask[:, :, None] & dim_mask[:, None, :]
    scrambled = torch.where(valid, 3 * target, torch.randn(3, 5, 4))
    cosine = masked_cosine_similarity(scrambled, target, step_mask, dim_mask)
    assert cosine.item() == pytest.approx(1.0)
    nothing = torch.zeros(3, 5, dtype=torch.bool)
    assert masked_cosine_similarity(target, target, nothing).item() == 0.0


# --------------------------------------------------------------------------------------------
# ODE solvers
# --------------------------------------------------------------------------------------------


class RecordingField:
    """A zero velocity field that records the time of every evaluation."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        assert torch.all(t == t[0])
        self.times.append(t[0].item())
        return torch.zeros_like(x)


def float32(values: list[float]) -> list[float]:
    return torch.tensor(values, dtype=torch.float32).tolist()


def expected_times(method: str, n: int) -> list[float]:
    times = []
    for k in range(n):
        times.append(1 - k / n)
        if method == "midpoint":
            times.append(1 - (k + 0.5) / n)
        if method == "heun" and k < n - 1:
            times.append(1 - (k + 1) / n)
    return float32(times)


@pytest.mark.parametrize("n", [1, 3, 10])
@pytest.mark.parametrize(("method", "evaluations"), [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_solver_evaluation_times(method: str, evaluations: int, n: int) -> None:
    field = RecordingField()
    integrate(field, torch.zeros(2, 3, 4), n, method)
    expected_count = {"euler": n, "midpoint": 2 * n, "heun": 2 * n - 1}[method]
    assert len(field.times) == expected_count
    assert field.times == expected_times(method, n)
    assert 0.0 not in field.times


def test_euler_times_do_not_drift() -> None:
    field = RecordingField()
    integrate(field, torch.zeros(1, 1, 1), 1000)
    assert field.times == float32([1 - k / 1000 for k in range(1000)])


@pytest.mark.parametrize("n", [1, 4, 10])
@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_solvers_recover_target_with_exact_field(method: str, n: int) -> None:
    """The exact field of the path towards one chunk a is v(x, t) = (x - a) / t."""
    target, noise = torch.randn(2, 3, 5, 4, generator=seeded())

    def exact_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x - target) / t[:, None, None]

    torch.testing.assert_close(integrate(exact_field, noise, n, method), target, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_solver_convergence_order(method: str, order: int) -> None:
    """On dx/dt = x (x(0) = x(1) / e) halving the step divides the error by about 2^order."""
    x1 = torch.ones(1, 1, 1, dtype=torch.float64)

    def error(n: int) -> float:
        return abs(integrate(lambda x, t: x, x1, n, method).item() - math.exp(-1))

    ratio = error(16) / error(32)
    assert 2**order * 0.9 < ratio < 2**order * 1.1


def test_integrate_argument_errors() -> None:
    field = RecordingField()
    with pytest.raises(ValueError, match=r"unknown solver 'rk4'; valid names: \['euler', 'heun'"):
        integrate(field, torch.zeros(1, 1, 1), 4, "rk4")
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        integrate(field, torch.zeros(1, 1, 1), 0)


# --------------------------------------------------------------------------------------------
# FlowMatchingHead
# --------------------------------------------------------------------------------------------

BATCH, PREFIX_LEN, PREFIX_DIM, STATE_DIM, HORIZON, ACTION_DIM = 8, 5, 6, 2, 4, 3


class ToyDenoiser(nn.Module):
    """An MLP on [x_t, t, mean-pooled prefix, state] that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        in_features = HORIZON * ACTION_DIM + 1 + PREFIX_DIM + STATE_DIM
        self.net = Mlp(in_features, 64, HORIZON * ACTION_DIM)
        self.prepare_calls = 0
        self.velocity_calls = 0

    def prepare(self, prefix: Prefix) -> torch.Tensor:
        self.prepare_calls += 1
        pad = prefix.pad[..., None].float()
        return (prefix.embeds * pad).sum(1) / pad.sum(1).clamp_min(1)

    def velocity(
        self, context: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, state: torch.Tensor
    ) -> torch.Tensor:
        self.velocity_calls += 1
        features = torch.cat([x_t.flatten(1), t[:, None], context, state], dim=-1)
        return self.net(features).view_as(x_t)


class ExactDenoiser(nn.Module):
    """The exact velocity field towards one fixed chunk: v(x, t) = (x - a) / t."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("target", target)

    def prepare(self, prefix: Prefix) -> None:
        return None

    def velocity(self, context: None, x_t: torch.Tensor, t: torch.Tensor, state: None):
        return (x_t - self.target) / t[:, None, None]


def make_batch() -> tuple[Prefix, torch.Tensor, torch.Tensor]:
    generator = seeded(42)
    prefix = Prefix(
        embeds=torch.randn(BATCH, PREFIX_LEN, PREFIX_DIM, generator=generator),
        pad=torch.ones(BATCH, PREFIX_LEN, dtype=torch.bool),
        ar=torch.zeros(BATCH, PREFIX_LEN, dtype=torch.long),
    )
    state = torch.randn(BATCH, STATE_DIM, generator=generator)
    actions = torch.randn(BATCH, HORIZON, ACTION_DIM, generator=generator)
    return prefix, state, actions


def make_head(**kwargs) -> FlowMatchingHead:
    torch.manual_seed(0)
    return FlowMatchingHead(ToyDenoiser(), HORIZON, ACTION_DIM, **kwargs)


def test_denoiser_is_registered_child() -> None:
    head = make_head()
    assert dict(head.named_children())["denoiser"] is head.denoiser
    assert {n for n, _ in head.named_parameters()} == {
        f"denoiser.net.{layer}.{p}" for layer in ("fc1", "fc2") for p in ("weight", "bias")
    }


@pytest.mark.parametrize("num_noise_samples", [1, 3])
def test_loss_prepares_once_per_call(num_noise_samples: int) -> None:
    head = make_head(num_noise_samples=num_noise_samples)
    prefix, state, actions = make_batch()
    out = head.loss(prefix, actions, state)
    assert head.denoiser.prepare_calls == 1
    assert head.denoiser.velocity_calls == num_noise_samples
    assert out.loss.shape == () and out.loss.requires_grad
    assert out.vel_cosine.shape == () and not out.vel_cosine.requires_grad
    assert -1.0 <= out.vel_cosine.item() <= 1.0
    assert out.t.shape == (num_noise_samples, BATCH)
    assert out.t.min() >= 0.001 and out.t.max() <= 1.0


def test_loss_at_given_times_uses_them_for_every_noise_sample() -> None:
    head = make_head(num_noise_samples=2)
    prefix, state, actions = make_batch()
    t = torch.linspace(0.1, 0.9, BATCH)
    out = head.loss(prefix, actions, state, t=t, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.t, torch.stack([t, t]))
    # the same times and noise draws give the same loss; other times a different one
    again = head.loss(prefix, actions, state, t=t, generator=torch.Generator().manual_seed(3))
    other = head.loss(prefix, actions, state, t=1 - t, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.loss, again.loss) and not torch.equal(out.loss, other.loss)
    with pytest.raises(ValueError, match=rf"t must have shape \[B\] = \[{BATCH}\], got \[{BATCH}, 1\]"):
        head.loss(prefix, actions, state, t=t[:, None])


def test_given_noise_and_per_element_losses_are_what_the_formula_says() -> None:
    """``noise=`` replaces the draws and ``reduction="none"`` returns ``(v - (noise - a))^2`` for
    every element; the masked mean of it is the training loss (parity with LeRobot's pi0)."""
    head = make_head(num_noise_samples=2)
    prefix, state, actions = make_batch()
    t = torch.linspace(0.1, 0.9, BATCH)
    noise = torch.randn(2, BATCH, HORIZON, ACTION_DIM, generator=seeded(5))
    step_mask = torch.arange(HORIZON)[None].expand(BATCH, -1) < 3
    out = head.loss(prefix, actions, state, t=t, noise=noise, reduction="none", step_mask=step_mask)
    assert out.loss.shape == (2, BATCH, HORIZON, ACTION_DIM) and out.loss.requires_grad
    context = head.denoiser.prepare(prefix)
    for k in range(2):
        velocity = head.denoiser.velocity(context, flow_path(actions, noise[k], t), t, state)
        torch.testing.assert_close(out.loss[k], (velocity - flow_target(actions, noise[k])).square(), rtol=0, atol=0)
    mean = head.loss(prefix, actions, state, t=t, noise=noise, step_mask=step_mask)
    torch.testing.assert_close(mean.loss, out.loss[:, :, :3].mean(), rtol=1e-6, atol=0)
    single = make_head()
    one = single.loss(prefix, actions, state, t=t, noise=noise[0], reduction="none")
    assert one.loss.shape == (1, BATCH, HORIZON, ACTION_DIM)
    with pytest.raises(ValueError, match=r"noise must have shape \[K, B, H, A\] = \[2, 8, 4, 3\]"):
        head.loss(prefix, actions, state, noise=noise[0])
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none', got 'sum'"):
        head.loss(prefix, actions, state, reduction="sum")


@pytest.mark.parametrize(
    ("num_steps", "solver", "evaluations"), [(1, "euler", 1), (5, "euler", 5), (3, "midpoint", 6)]
)
def test_sample_prepares_once_per_call(num_steps: int, solver: str, evaluations: int) -> None:
    head = make_head()
    prefix, state, _ = make_batch()
    actions = head.sample(prefix, state, num_steps=num_steps, solver=solver)
    assert actions.shape == (BATCH, HORIZON, ACTION_DIM)
    assert head.denoiser.prepare_calls == 1
    assert head.denoiser.velocity_calls == evaluations


def test_sample_uses_constructor_defaults() -> None:
    head = make_head(num_steps=4, solver="heun")
    prefix, state, _ = make_batch()
    head.sample(prefix, state)
    assert head.denoiser.velocity_calls == 7


def test_loss_decreases_with_training() -> None:
    head = make_head(num_noise_samples=2)
    prefix, state, actions = make_batch()

    def eval_loss() -> float:
        with torch.no_grad():
            return head.loss(prefix, actions, state, generator=seeded(123)).loss.item()

    initial = eval_loss()
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    generator = seeded(0)
    for _ in range(100):
        optimizer.zero_grad()
        head.loss(prefix, actions, state, generator=generator).loss.backward()
        optimizer.step()
    assert eval_loss() < 0.5 * initial


def test_loss_is_reproducible_with_generator() -> None:
    head = make_head(num_noise_samples=2)
    prefix, state, actions = make_batch()
    first = head.loss(prefix, actions, state, generator=seeded(5))
    second = head.loss(prefix, actions, state, generator=seeded(5))
    assert torch.equal(first.loss, second.loss) and torch.equal(first.t, second.t)


def test_loss_honours_masks() -> None:
    """A zero velocity gives loss = mean(u^2) over valid elements; huge padded actions must
    therefore not show up in it."""

    class ZeroDenoiser(ToyDenoiser):
        def velocity(self, context, x_t, t, state):
            return torch.zeros_like(x_t)

    head = FlowMatchingHead(ZeroDenoiser(), HORIZON, ACTION_DIM)
    prefix, state, _ = make_batch()
    step_mask = torch.ones(BATCH, HORIZON, dtype=torch.bool)
    step_mask[:, -1] = False
    dim_mask = torch.tensor([True, True, False])
    valid = step_mask[:, :, None] & dim_mask
    actions = torch.where(valid, 0.0, 1e3).expand(BATCH, HORIZON, ACTION_DIM)
    out = head.loss(prefix, actions, state, step_mask, dim_mask, generator=seeded())
    assert out.loss.item() < 10.0  # mean of eps^2 over 48 elements; 1e6 if padding leaked
    unmasked = head.loss(prefix, actions, state, generator=seeded())
    assert unmasked.loss.item() > 1e5


def test_exact_denoiser_has_zero_loss_and_samples_its_target() -> None:
    """Ties the path, the target and the solver wiring to the pi0 convention."""
    prefix, _, target = make_batch()
    head = FlowMatchingHead(ExactDenoiser(target), HORIZON, ACTION_DIM, num_noise_samples=2)
    out = head.loss(prefix, target, generator=seeded())
    assert out.loss.item() < 1e-6
    assert out.vel_cosine.item() == pytest.approx(1.0, abs=1e-5)
    for solver in SOLVERS:
        sampled = head.sample(prefix, solver=solver, generator=seeded())
        torch.testing.assert_close(sampled, target, atol=1e-4, rtol=0)


def test_sample_is_deterministic_given_noise_or_generator() -> None:
    head = make_head()
    prefix, state, _ = make_batch()
    noise = torch.randn(BATCH, HORIZON, ACTION_DIM, generator=seeded(7))
    with torch.no_grad():
        first = head.sample(prefix, state, noise=noise)
        assert torch.equal(first, head.sample(prefix, state, noise=noise))
        assert not torch.equal(first, head.sample(prefix, state, noise=noise + 1))
        assert torch.equal(
            head.sample(prefix, state, generator=seeded(1)),
            head.sample(prefix, state, generator=seeded(1)),
        )
        assert not first.requires_grad


def test_sample_does_not_disable_gradients() -> None:
    head = make_head()
    prefix, state, _ = make_batch()
    assert head.sample(prefix, state, num_steps=2).requires_grad


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"actions": torch.zeros(BATCH, HORIZON + 1, ACTION_DIM)},
            r"actions must have shape \[B, H, A\] = \[8, 4, 3\], got \[8, 5, 3\]",
        ),
        ({"actions": torch.zeros(BATCH - 1, HORIZON, ACTION_DIM)}, r"actions .* got \[7, 4, 3\]"),
        ({"state": torch.zeros(7, STATE_DIM)}, r"state must have shape \[B, S\] with B = 8"),
        ({"step_mask": torch.ones(BATCH, HORIZON - 1, dtype=torch.bool)}, r"step_mask must be"),
        ({"dim_mask": torch.ones(ACTION_DIM, dtype=torch.long)}, r"dim_mask must be a bool"),
    ],
)
def test_loss_argument_errors(arguments: dict, message: str) -> None:
    head = make_head()
    prefix, state, actions = make_batch()
    with pytest.raises(ValueError, match=message):
        head.loss(prefix, **{"actions": actions, "state": state, **arguments})
    assert head.denoiser.prepare_calls == 0


def test_sample_argument_errors() -> None:
    head = make_head()
    prefix, state, _ = make_batch()
    with pytest.raises(ValueError, match=r"noise must have shape \[B, H, A\] = \[8, 4, 3\]"):
        head.sample(prefix, state, noise=torch.zeros(BATCH, HORIZON, ACTION_DIM + 1))
    with pytest.raises(ValueError, match=r"state must have shape"):
        head.sample(prefix, torch.zeros(BATCH))
    assert head.denoiser.prepare_calls == 0


def test_constructor_argument_errors() -> None:
    with pytest.raises(ValueError, match="num_noise_samples must be >= 1, got 0"):
        make_head(num_noise_samples=0)
    with pytest.raises(ValueError, match="horizon must be >= 1, got 0"):
        FlowMatchingHead(ToyDenoiser(), 0, ACTION_DIM)
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        make_head(solver="rk4")
    with pytest.raises(TypeError, match="denoiser must be an nn.Module .* got Linear"):
        FlowMatchingHead(nn.Linear(2, 2), HORIZON, ACTION_DIM)


@pytest.mark.parametrize("s2", [0.01, 0.3, 1.0])
def test_gaussian_loss_curve_is_the_residual_variance_of_the_best_linear_predictor(s2):
    # jointly Gaussian (a, eps): the best predictor of u = eps - a from x_t is linear, so the
    # residual variance of a least-squares fit on samples must match the closed form
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    a = s2**0.5 * torch.randn(n, generator=gen, dtype=torch.float64)  # a - a_hat
    eps = torch.randn(n, generator=gen, dtype=torch.float64)
    for t in (0.05, 0.3, 0.7, 1.0):
        x = t * eps + (1 - t) * a
        u = eps - a
        beta = (x * u).mean() / (x * x).mean()
        empirical = (u - beta * x).var()
        assert abs(empirical - gaussian_loss_curve(torch.tensor(t), s2)) < 0.01 * max(1.0, empirical), (t, s2)
        assert residual_var_at(t, float(gaussian_loss_curve(torch.tensor(t), s2))) == pytest.approx(s2)
    assert torch.allclose(gaussian_loss_curve(torch.tensor([0.0, 1.0]), s2), torch.tensor([1.0, s2], dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# Contracts pinned for mutation testing (docs/mutation.md)
# --------------------------------------------------------------------------------------------


def test_residual_var_is_infinite_where_no_curve_reaches_the_loss() -> None:
    assert residual_var_at(0.5, 4.0) == math.inf  # the denominator 1 - 4 * 0.25 is exactly 0
    assert residual_var_at(0.5, 5.0) == math.inf
    assert residual_var_at(0.5, 1.0) == pytest.approx(0.25 / 0.75)


def test_beta_time_sampler_refuses_a_zero_beta_as_well_as_alpha() -> None:
    for alpha, beta in ((1.5, 0.0), (0.0, 1.0)):
        with pytest.raises(ValueError, match=r"BetaTimeSampler needs"):
            BetaTimeSampler(alpha, beta)


def test_vel_cosine_leaves_out_the_padded_steps() -> None:
    head = make_head()
    prefix, state, actions = make_batch()
    t = torch.full((BATCH,), 0.5)
    noise = torch.randn(actions.shape, generator=seeded(3))
    mask = torch.ones(BATCH, HORIZON, dtype=torch.bool)
    mask[:, -1] = False
    masked = head.loss(prefix, actions, state, step_mask=mask, t=t, noise=noise).vel_cosine
    full = head.loss(prefix, actions, state, t=t, noise=noise).vel_cosine
    with torch.no_grad():
        velocity = head.denoiser.velocity(head.denoiser.prepare(prefix), flow_path(actions, noise, t), t, state)
    torch.testing.assert_close(masked, masked_cosine_similarity(velocity, flow_target(actions, noise), mask))
    assert not torch.allclose(masked, full)  # the last step's cosine differs from the others'


def test_rtc_guidance_of_a_batch_is_each_samples_own() -> None:
    # per-sample times: the guidance weight must broadcast per sample, not across the action dims
    torch.manual_seed(0)
    net = nn.Linear(ACTION_DIM, ACTION_DIM)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x) * (1 + t.view(-1, 1, 1))

    x = torch.randn(2, HORIZON, ACTION_DIM, generator=seeded(1))
    target = torch.randn(2, HORIZON, ACTION_DIM, generator=seeded(2))
    t = torch.tensor([0.3, 0.8])
    weights = torch.ones(HORIZON, ACTION_DIM)
    both = guided_velocity(velocity, x, t, target, weights, beta=5.0)
    for i in range(2):
        one = guided_velocity(velocity, x[i:i + 1], t[i:i + 1], target[i:i + 1], weights, beta=5.0)
        torch.testing.assert_close(both[i:i + 1], one)
