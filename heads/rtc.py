"""Real-time chunking (RTC): sampling the next action chunk so that it continues the current one.

Black, Galliker, Levine, "Real-Time Execution of Action Chunking Flow Policies" (NeurIPS 2025,
arXiv 2506.07339). While a chunk executes, the next one is sampled from a newer observation; the
``d`` actions that execute during the inference delay are already fixed, and the flow is guided
(training-free inpainting, PiGDM) so that the new chunk reproduces them and joins the rest of
the previous chunk smoothly::

    previous chunk, shifted to the new chunk's time:  Y [B, H, A]   (valid on [0, H - s))
    weights W [H]:  1 on [0, d)  |  decaying on [d, H - s)  |  0 on [H - s, H)
                     (executes      (soft overlap)              (new actions only)
                      during the delay)

Time convention (vlablocks / pi0): ``t = 1`` is noise, ``t = 0`` is data, the velocity is
``v = noise - actions`` and Euler steps go ``x <- x - dt * v``. The paper's time is
``tau = 1 - t`` (``tau = 0`` noise) and its velocity ``v_tau = actions - noise = -v``. The clean
chunk's estimate is the same point in both: ``a_hat = x_t - t * v(x_t, t) = A + (1 - tau) v_tau``.
The paper's guided field ``v_tau + w(tau) * (Y - a_hat)^T diag(W) d a_hat / d A`` therefore reads,
in our direction::

    v_guided(x_t, t) = v(x_t, t) - w(t) * vjp(a_hat, x_t, W * (Y - a_hat))
    w = min(beta, (1 - tau) / (tau * r^2)),   r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2)
      = min(beta, (t^2 + (1 - t)^2) / (t * (1 - t)))      (symmetric under t <-> 1 - t)

``w`` is infinite at both ends (``t = 1`` and ``t = 0``) and 2 at ``t = 1/2``; ``beta`` (5 in
the paper) clips it. ``beta = 0`` is plain sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: A velocity field ``f(x [B, H, A], t [B]) -> v [B, H, A]`` (as in ``flow_matching``).
VelocityField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: An ODE solve ``(f, noise [B, H, A]) -> x_0 [B, H, A]`` from ``t = 1`` to ``t = 0``, e.g.
#: ``functools.partial(vlablocks.heads.flow_matching.integrate, num_steps=10, method="euler")``.
Solve = Callable[[VelocityField, torch.Tensor], torch.Tensor]

DEFAULT_BETA = 5.0  #: the paper's guidance-weight clip


def soft_mask(
    horizon: int, delay: int, execute: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The paper's guidance weights ``W [H]`` (its eq. 5, exponential schedule), float32.

    ``W_i = 1`` for ``i < d`` (the actions that execute during the delay), ``c_i (e^c_i - 1) /
    (e - 1)`` with ``c_i = (H - s - i) / (H - s - d + 1)`` for ``d <= i < H - s`` (the rest of the
    previous chunk, trusted less the later it is), ``0`` for ``i >= H - s`` (beyond the previous
    chunk). ``s`` (``execute``) is the execution horizon: the actions of the previous chunk
    executed before the new one was requested. Needs ``0 <= s`` and ``0 <= d <= H - s``.
    """
    if horizon < 1 or execute < 0 or delay < 0 or delay > horizon - execute:
        raise ValueError(
            f"soft_mask needs horizon >= 1 and 0 <= delay <= horizon - execute with execute >= 0; got "
            f"horizon={horizon}, delay={delay}, execute={execute}"
        )
    end = horizon - execute
    i = torch.arange(horizon, dtype=torch.float64, device=device)
    c = (end - i) / (end - delay + 1)
    decay = c * torch.expm1(c) / (math.e - 1.0)
    weights = torch.where(i < delay, 1.0, torch.where(i < end, decay, 0.0))
    return weights.float()


def guidance_weight(t: torch.Tensor, beta: float) -> torch.Tensor:
    """``min(beta, (t^2 + (1 - t)^2) / (t (1 - t)))``: the paper's clipped PiGDM weight
    ``min(beta, (1 - tau) / (tau r^2))`` at ``tau = 1 - t``; ``beta`` at ``t = 0`` and ``t = 1``.
    Shapes: ``t [...]`` -> ``[...]``."""
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0; got {beta}")
    t = t.float()
    denominator = t * (1.0 - t)
    safe = torch.where(denominator > 0, denominator, 1.0)
    weight = torch.where(denominator > 0, (t.square() + (1.0 - t).square()) / safe, math.inf)
    return weight.clamp(max=beta)


def guided_velocity(
    velocity: VelocityField,
    x_t: torch.Tensor,
    t: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """The RTC-guided velocity at ``(x_t, t)`` (module docstring), our time direction.

    One velocity evaluation under autograd and one vector-Jacobian product through the estimate
    ``a_hat = x_t - t v``; the result is detached. Shapes: ``x_t [B, H, A]``, ``t [B]``,
    ``target [B, H, A]`` (the previous chunk, normalised), ``weights`` broadcasting with
    ``[B, H, A]`` (e.g. ``[H, A]``: the soft mask times the valid action dims) -> ``[B, H, A]``.
    """
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        v = velocity(x, t)
        estimate = x - t.view(-1, *([1] * (x.ndim - 1))).to(v.dtype) * v
        error = (weights * (target - estimate)).detach()
        (correction,) = torch.autograd.grad(estimate, x, grad_outputs=error.to(estimate.dtype))
    weight = guidance_weight(t, beta).view(-1, *([1] * (x.ndim - 1)))
    return v.detach() - (weight * correction).to(v.dtype)


def rtc_sample(
    velocity: VelocityField,
    noise: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    solve: Solve,
    beta: float = DEFAULT_BETA,
) -> torch.Tensor:
    """Integrate the guided field (:func:`guided_velocity`) from ``noise`` at ``t = 1`` to a chunk
    at ``t = 0`` with ``solve`` (e.g. :func:`~vlablocks.heads.flow_matching.integrate` with its
    steps and solver bound; this module does not import it, since the head imports this one).

    ``velocity(x, t)`` is the denoiser's field over a prepared context (the prefix cache is
    built once, outside; only the velocity evaluations run under autograd). Not under
    ``torch.inference_mode`` (its tensors cannot enter autograd); ``torch.no_grad`` is fine.
    Shapes: ``noise [B, H, A]``, ``target [B, H, A]``, ``weights`` broadcasting -> ``[B, H, A]``.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("rtc_sample needs autograd for its guidance: call it under torch.no_grad(), "
                           "not torch.inference_mode()")
    if target.shape != noise.shape:
        raise ValueError(f"target must have the noise's shape {list(noise.shape)}; got {list(target.shape)}")
    guidance_weight(torch.zeros(1), beta)  # checks beta

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_velocity(velocity, x, t, target, weights, beta)

    return solve(guided, noise)
