"""Flow matching, pi0 convention: ``t = 1`` is noise, ``t = 0`` is data.

The algorithm layer only: time samplers, the straight path and its target velocity, the masked
loss, ODE solvers and ``FlowMatchingHead``, which drives a ``Denoiser`` (see
``vlablocks.heads.denoiser``) through ``prepare`` and ``velocity`` and knows nothing else of
the network::

    training:  a [B, H, A], eps ~ N(0, I), t ~ sampler
               x_t = t * eps + (1 - t) * a        (flow_path)
               u   = eps - a                      (flow_target)
               loss = masked_mse(velocity(context, x_t, t, state), u)

    sampling:  x_1 = eps --velocity--> ... --velocity--> x_0 = actions
               t = 1, 1 - 1/N, ..., 1/N, 0        (integrate)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vlablocks.heads.denoiser import Denoiser, Prefix
from vlablocks.heads.rtc import DEFAULT_BETA, VelocityField, rtc_sample, soft_mask
from vlablocks.heads.time_samplers import BetaTimeSampler, Device, TimeSampler

# --------------------------------------------------------------------------------------------
# Path, target and loss
# --------------------------------------------------------------------------------------------


def flow_path(actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The straight path ``x_t = t * noise + (1 - t) * actions``.

    Shapes: ``actions [B, H, A]``, ``noise [B, H, A]``, ``t [B]`` -> ``x_t [B, H, A]``.
    """
    t = t.view(-1, *([1] * (actions.ndim - 1)))
    return t * noise + (1.0 - t) * actions


def flow_target(actions: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The path's velocity ``d x_t / dt = noise - actions``: ``[B, H, A]``."""
    return noise - actions


def _check_mask(name: str, mask: torch.Tensor, shapes: list[tuple[int, ...]]) -> None:
    if mask.dtype != torch.bool or tuple(mask.shape) not in shapes:
        expected = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(
            f"{name} must be a bool tensor of shape {expected}, got {mask.dtype} of shape "
            f"{list(mask.shape)}"
        )


def valid_elements(
    shape: torch.Size,
    step_mask: torch.Tensor | None,
    dim_mask: torch.Tensor | None,
    device: Device | None = None,
) -> torch.Tensor:
    """Which ``(batch, step, dim)`` elements of an action chunk count.

    Args:
        shape: the chunk shape ``[B, H, A]``.
        step_mask: ``[B, H]`` bool, False for padded (out-of-episode) steps; ``None``: all valid.
        dim_mask: ``[A]`` or ``[B, A]`` bool, False for padded action dims; ``None``: all valid.
        device: where to build the result (that of the masks).

    Returns: ``[B, H, A]`` bool.
    """
    batch, horizon, action_dim = shape
    valid = torch.ones(shape, dtype=torch.bool, device=device)
    if step_mask is not None:
        _check_mask("step_mask", step_mask, [(batch, horizon)])
        valid = valid & step_mask[:, :, None]
    if dim_mask is not None:
        _check_mask("dim_mask", dim_mask, [(action_dim,), (batch, action_dim)])
        valid = valid & dim_mask.unsqueeze(-2)
    return valid


def _check_same_shape(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must both have shape [B, H, A], got pred {list(pred.shape)} and "
            f"target {list(target.shape)}"
        )


def masked_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    step_mask: torch.Tensor | None = None,
    dim_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error over the valid elements only, in float32.

    The reduction is one mean over every valid ``(batch, step, dim)`` element: the sum of their
    squared errors divided by their count (so a sample with more valid steps weighs more, like
    a token-level language-model loss). Masked elements get exactly zero gradient; with nothing
    valid the loss is 0 (never NaN).

    Shapes: ``pred [B, H, A]``, ``target [B, H, A]``, masks as in ``valid_elements`` -> ``[]``.
    """
    _check_same_shape(pred, target)
    valid = valid_elements(pred.shape, step_mask, dim_mask, pred.device)
    squared_error = (pred.float() - target.float()).square()
    total = torch.where(valid, squared_error, 0.0).sum()
    return total / valid.sum().clamp_min(1)


def masked_cosine_similarity(
    pred: torch.Tensor,
    target: torch.Tensor,
    step_mask: torch.Tensor | None = None,
    dim_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over valid steps of the cosine similarity of ``pred`` and ``target`` over the valid
    action dims, in float32 (a step with no valid dim does not count; nothing valid gives 0).

    Shapes: ``pred [B, H, A]``, ``target [B, H, A]``, masks as in ``valid_elements`` -> ``[]``.
    """
    _check_same_shape(pred, target)
    valid = valid_elements(pred.shape, step_mask, dim_mask, pred.device)
    pred = torch.where(valid, pred.float(), 0.0)
    target = torch.where(valid, target.float(), 0.0)
    cosine = nn.functional.cosine_similarity(pred, target, dim=-1)
    valid_steps = valid.any(dim=-1)
    return torch.where(valid_steps, cosine, 0.0).sum() / valid_steps.sum().clamp_min(1)


def gaussian_loss_curve(t: torch.Tensor, residual_var: float | torch.Tensor) -> torch.Tensor:
    """The smallest expected loss at flow time ``t`` for an action element that, given the
    observation, is Gaussian with variance ``s2`` (normalised units) and independent of the others.

    With ``a ~ N(a_hat, s2)``, ``eps ~ N(0, 1)`` and ``x_t = t eps + (1 - t) a``, the best
    prediction of ``u = eps - a`` from ``x_t`` (and ``a_hat``) has error variance

        Var(u | x_t) = s2 / (t^2 + (1 - t)^2 s2)

    ``s2`` at ``t = 1`` (pure noise: the error of the mean action), 1 at ``t = 0`` (the noise is
    unobservable there), ``~ s2 / t^2`` in between when ``s2`` is small. Real action chunks are
    smooth and correlated across steps and dims, so at small ``t`` part of the noise can be told
    apart from the action and a network beats this curve there; near ``t = 1`` it holds.
    Shapes: ``t [...]`` (and ``residual_var`` broadcasting with it) -> ``[...]``.
    """
    s2 = torch.as_tensor(residual_var, dtype=torch.float64)
    t = t.double()
    return s2 / (t**2 + (1 - t) ** 2 * s2)


def residual_var_at(t: float, loss: float) -> float:
    """Invert :func:`gaussian_loss_curve` at one time: the ``s2`` whose curve passes through
    ``(t, loss)``, ``loss t^2 / (1 - loss (1 - t)^2)`` (``inf`` when no ``s2`` does)."""
    denominator = 1.0 - loss * (1.0 - t) ** 2
    return loss * t * t / denominator if denominator > 0 else float("inf")


# --------------------------------------------------------------------------------------------
# ODE solvers, from t = 1 (noise) to t = 0 (data)
# --------------------------------------------------------------------------------------------

#: One solver step ``(f, x, t, t_next) -> x_next``, times as Python floats.
SolverStep = Callable[[VelocityField, torch.Tensor, float, float], torch.Tensor]


def _times(x: torch.Tensor, t: float) -> torch.Tensor:
    """``t`` repeated over the batch of ``x``: ``[B]`` float32."""
    return torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)


def euler_step(f: VelocityField, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Euler step: 1 evaluation, at ``t``."""
    return x + (t_next - t) * f(x, _times(x, t))


def midpoint_step(f: VelocityField, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One explicit midpoint step: 2 evaluations, at ``t`` and ``(t + t_next) / 2``."""
    dt = t_next - t
    x_mid = x + 0.5 * dt * f(x, _times(x, t))
    return x + dt * f(x_mid, _times(x, t + 0.5 * dt))


def heun_step(f: VelocityField, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Heun step: an Euler predictor at ``t``, then the trapezoidal corrector at ``t_next``.

    A step that lands on ``t_next = 0`` stays a plain Euler step: the network is never trained
    at ``t = 0`` (pure data), so it is not evaluated there (as in EDM's sampler). ``N`` Heun
    steps therefore cost ``2N - 1`` evaluations.
    """
    dt = t_next - t
    v = f(x, _times(x, t))
    x_euler = x + dt * v
    if t_next <= 0.0:
        return x_euler
    return x + 0.5 * dt * (v + f(x_euler, _times(x, t_next)))


SOLVERS: dict[str, SolverStep] = {
    "euler": euler_step,
    "midpoint": midpoint_step,
    "heun": heun_step,
}


def get_solver(name: str) -> SolverStep:
    """The step function called ``name`` in ``SOLVERS``."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid names: {sorted(SOLVERS)}")
    return SOLVERS[name]


def integrate(
    f: VelocityField, x1: torch.Tensor, num_steps: int, method: str = "euler"
) -> torch.Tensor:
    """Integrates ``dx/dt = f(x, t)`` from ``t = 1`` to ``t = 0`` in ``num_steps`` equal steps.

    Step ``k`` goes from ``t_k = 1 - k / N`` to ``t_{k+1}``; the times come from the integer
    step index, so they do not drift and the last step lands exactly on 0. Euler evaluates
    ``f`` N times (at ``1, 1 - 1/N, ..., 1/N``), midpoint 2N times, Heun 2N - 1 times.

    Shapes: ``x1 [B, H, A]`` (the noise) -> ``x0 [B, H, A]``.
    """
    step = get_solver(method)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    x = x1
    for k in range(num_steps):
        x = step(f, x, 1.0 - k / num_steps, 1.0 - (k + 1) / num_steps)
    return x


# --------------------------------------------------------------------------------------------
# The head
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowMatchingOutput:
    """What ``FlowMatchingHead.loss`` returns.

    Attributes:
        loss: ``[]`` masked MSE between predicted and target velocity, averaged over the noise
            samples (differentiable); with ``reduction="none"`` the squared error of every
            element, ``[K, B, H, A]``.
        vel_cosine: ``[]`` mean cosine similarity of predicted and target velocity over the
            valid steps and dims (detached; a training metric).
        t: ``[K, B]`` the times drawn for each of the K noise samples.
    """

    loss: torch.Tensor
    vel_cosine: torch.Tensor
    t: torch.Tensor


class FlowMatchingHead(nn.Module):
    """Trains and samples action chunks ``[B, H, A]`` with a ``Denoiser``.

    ``denoiser.prepare(prefix)`` runs once per ``loss`` / ``sample`` call; ``denoiser.velocity``
    runs once per noise sample (training) or per solver evaluation (sampling).

    Args:
        denoiser: an ``nn.Module`` implementing ``Denoiser``; registered as ``self.denoiser``.
        horizon: chunk length H.
        action_dim: action width A.
        time_sampler: draws the training times ``t [B]``.
        num_steps: default number of solver steps for ``sample``.
        solver: default solver for ``sample``, a name in ``SOLVERS``.
        num_noise_samples: noise draws per observation in ``loss``, all sharing one ``prepare``.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        horizon: int,
        action_dim: int,
        time_sampler: TimeSampler = BetaTimeSampler(),
        num_steps: int = 10,
        solver: str = "euler",
        num_noise_samples: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(denoiser, nn.Module) or not isinstance(denoiser, Denoiser):
            raise TypeError(
                "denoiser must be an nn.Module with prepare(prefix) and "
                f"velocity(context, x_t, t, state) methods, got {type(denoiser).__name__}"
            )
        for name, value in [
            ("horizon", horizon),
            ("action_dim", action_dim),
            ("num_steps", num_steps),
            ("num_noise_samples", num_noise_samples),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        get_solver(solver)
        self.denoiser = denoiser
        self.horizon = horizon
        self.action_dim = action_dim
        self.time_sampler = time_sampler
        self.num_steps = num_steps
        self.solver = solver
        self.num_noise_samples = num_noise_samples

    def loss(
        self,
        prefix: Prefix,
        actions: torch.Tensor,
        state: torch.Tensor | None = None,
        step_mask: torch.Tensor | None = None,
        dim_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> FlowMatchingOutput:
        """The flow-matching loss of a batch (see ``masked_mse`` for the reduction).

        Args:
            prefix: the observations, batch size B.
            actions: ``[B, H, A]`` target chunks (normalised).
            state: ``[B, S]`` proprioception, or ``None``.
            step_mask: ``[B, H]`` bool, False for out-of-episode steps.
            dim_mask: ``[A]`` or ``[B, A]`` bool, False for padded action dims.
            generator: draws the times and the noise (on the device of ``actions``).
            t: ``[B]`` flow times to use for every noise sample instead of drawing them from
                the time sampler (diagnostics: the loss at a given t).
            noise: ``[K, B, H, A]`` (or ``[B, H, A]`` when ``K = num_noise_samples`` is 1) noise
                to use instead of drawing it (parity with another implementation).
            reduction: ``"mean"`` (the training loss, ``[]``) or ``"none"``: ``loss`` is then the
                squared velocity error of every element, ``[K, B, H, A]`` float32, masked ones
                included (as LeRobot's ``reduction="none"``).
        """
        batch = self._check_inputs(prefix, state)
        expected = (batch, self.horizon, self.action_dim)
        if tuple(actions.shape) != expected:
            raise ValueError(
                f"actions must have shape [B, H, A] = {list(expected)}, got {list(actions.shape)}"
            )
        # Check the masks and times before running the network.
        valid_elements(actions.shape, step_mask, dim_mask, actions.device)
        if t is not None and tuple(t.shape) != (batch,):
            raise ValueError(f"t must have shape [B] = [{batch}], got {list(t.shape)}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        noises = self._given_noise(noise, expected)

        context = self.denoiser.prepare(prefix)
        losses, cosines, times = [], [], []
        for k in range(self.num_noise_samples):
            t_k = self.time_sampler(batch, actions.device, generator) if t is None else t.to(actions.device)
            noise_k = torch.randn(
                actions.shape, generator=generator, device=actions.device, dtype=actions.dtype
            ) if noises is None else noises[k].to(actions.device, actions.dtype)
            velocity = self.denoiser.velocity(context, flow_path(actions, noise_k, t_k), t_k, state)
            target = flow_target(actions, noise_k)
            if reduction == "none":
                losses.append((velocity.float() - target.float()).square())
            else:
                losses.append(masked_mse(velocity, target, step_mask, dim_mask))
            cosines.append(
                masked_cosine_similarity(velocity.detach(), target, step_mask, dim_mask)
            )
            times.append(t_k)
        return FlowMatchingOutput(
            loss=torch.stack(losses) if reduction == "none" else torch.stack(losses).mean(),
            vel_cosine=torch.stack(cosines).mean(),
            t=torch.stack(times),
        )

    def _given_noise(self, noise: torch.Tensor | None, expected: tuple[int, int, int]) -> torch.Tensor | None:
        """``noise`` as ``[K, B, H, A]`` (ValueError for another shape)."""
        if noise is None:
            return None
        if tuple(noise.shape) == expected and self.num_noise_samples == 1:
            return noise[None]
        if tuple(noise.shape) != (self.num_noise_samples, *expected):
            raise ValueError(f"noise must have shape [K, B, H, A] = {[self.num_noise_samples, *expected]} (or [B, H, A] "
                             f"when K = 1), got {list(noise.shape)}")
        return noise

    def sample(
        self,
        prefix: Prefix,
        state: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        num_steps: int | None = None,
        solver: str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Integrates from noise at ``t = 1`` to an action chunk at ``t = 0``.

        Gradients are not disabled here: wrap the call in ``torch.no_grad()`` (or
        ``torch.inference_mode()``) for inference.

        Args:
            prefix: the observations, batch size B.
            state: ``[B, S]`` proprioception, or ``None``.
            noise: ``[B, H, A]`` start point; ``None``: drawn from ``generator`` in float32 on
                the device of ``prefix.embeds``.
            num_steps: solver steps (``None``: ``self.num_steps``).
            solver: a name in ``SOLVERS`` (``None``: ``self.solver``).
            generator: draws the noise when ``noise`` is ``None``.

        Returns: ``[B, H, A]`` actions.
        """
        noise = self._start_noise(prefix, state, noise, generator)
        return self._solver(num_steps, solver)(self._field(prefix, state), noise)

    def _field(self, prefix: Prefix, state: torch.Tensor | None) -> VelocityField:
        """The velocity field of one observation: ``prepare`` once (the prefix cache), then
        ``velocity(x [B, H, A], t [B])`` per solver evaluation."""
        context = self.denoiser.prepare(prefix)
        return lambda x, t: self.denoiser.velocity(context, x, t, state)

    def _solver(self, num_steps: int | None, solver: str | None) -> Callable[..., torch.Tensor]:
        """``integrate`` with the head's defaults for ``num_steps`` / ``solver`` when ``None``."""
        return functools.partial(integrate, num_steps=self.num_steps if num_steps is None else num_steps,
                                 method=self.solver if solver is None else solver)

    def sample_guided(
        self,
        prefix: Prefix,
        state: torch.Tensor | None,
        previous: torch.Tensor,
        delay: int,
        execute: int,
        beta: float = DEFAULT_BETA,
        noise: torch.Tensor | None = None,
        num_steps: int | None = None,
        solver: str | None = None,
        generator: torch.Generator | None = None,
        dim_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Real-time chunking: a chunk that continues ``previous`` (see :mod:`vlablocks.heads.rtc`).

        The flow is guided so that actions ``[0, delay)`` reproduce ``previous`` (they execute
        while this chunk is computed) and ``[delay, H - execute)`` follow it with decaying weight
        (:func:`~vlablocks.heads.rtc.soft_mask`); ``beta`` clips the guidance weight (0: plain
        :meth:`sample` from the same noise). ``prepare`` runs once; each solver evaluation is a
        velocity under autograd plus one vector-Jacobian product. Not under ``inference_mode``.

        Args:
            prefix, state, noise, num_steps, solver, generator: as in :meth:`sample`.
            previous: ``[B, H, A]`` the previous chunk in the normalised space, shifted so that
                index 0 is this chunk's first step; values at ``i >= H - execute`` are ignored.
            delay: ``d``, the inference delay in control steps.
            execute: ``s``, the execution horizon (``0 <= d <= H - s``).
            dim_mask: ``[A]`` bool, False for padded action dims (no guidance there).

        Returns: ``[B, H, A]`` actions.
        """
        noise = self._start_noise(prefix, state, noise, generator)
        if previous.shape != noise.shape:
            raise ValueError(f"previous must have shape [B, H, A] = {list(noise.shape)}, got {list(previous.shape)}")
        weights = soft_mask(self.horizon, delay, execute, device=noise.device)[:, None]
        if dim_mask is not None:
            _check_mask("dim_mask", dim_mask, [(self.action_dim,)])
            weights = weights * dim_mask.to(weights.device, weights.dtype)
        return rtc_sample(self._field(prefix, state), noise, previous.to(noise.device, noise.dtype), weights,
                          self._solver(num_steps, solver), beta)

    def _start_noise(
        self,
        prefix: Prefix,
        state: torch.Tensor | None,
        noise: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The sampler's start ``[B, H, A]``: ``noise`` (checked) or drawn from ``generator``."""
        batch = self._check_inputs(prefix, state)
        shape = (batch, self.horizon, self.action_dim)
        if noise is None:
            return torch.randn(shape, generator=generator, device=prefix.embeds.device)
        if tuple(noise.shape) != shape:
            raise ValueError(
                f"noise must have shape [B, H, A] = {list(shape)}, got {list(noise.shape)}"
            )
        return noise

    def _check_inputs(self, prefix: Prefix, state: torch.Tensor | None) -> int:
        """Checks ``state`` against the prefix; returns the batch size B."""
        batch = prefix.embeds.shape[0]
        if state is not None and (state.ndim != 2 or state.shape[0] != batch):
            raise ValueError(
                f"state must have shape [B, S] with B = {batch} (from prefix.embeds), got "
                f"{list(state.shape)}"
            )
        return batch

    def extra_repr(self) -> str:
        return (
            f"horizon={self.horizon}, action_dim={self.action_dim}, "
            f"time_sampler={self.time_sampler}, num_steps={self.num_steps}, "
            f"solver={self.solver!r}, num_noise_samples={self.num_noise_samples}"
        )
