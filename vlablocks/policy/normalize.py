"""Normalisation statistics that live inside the policy (saved and loaded with its weights).

One source of truth for training and serving: the policy normalises state and actions on the
way in and un-normalises predicted actions on the way out, with buffers that are part of its
``state_dict``. Vectors shorter than the model's width (4-D Meta-World actions in a 32-D pi0
action space) fill the first dims; the rest are padding, masked out of the loss and dropped
from predictions.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

NormMode = Literal["mean_std", "quantile", "identity"]
NORM_MODES: tuple[str, ...] = ("mean_std", "quantile", "identity")
#: ``vlablocks``: eps on the way in and out; ``lerobot``: LeRobot's ``NormalizerProcessorStep``.
NormConvention = Literal["vlablocks", "lerobot"]
EPS = 1e-6
#: LeRobot's eps: added to ``std`` going in only; for quantiles, used only where ``q99 == q01``.
LEROBOT_EPS = 1e-8
#: the statistics' values before :meth:`FeatureNormalizer.set_stats` (the identity map).
DEFAULT_STATS = {"mean": 0.0, "std": 1.0, "q01": -1.0, "q99": 1.0}


def _check_stats(stats: dict[str, torch.Tensor | None]) -> None:
    """ValueError unless every statistic is finite, ``std >= 0`` and ``q01 <= q99``, naming the
    first bad one (a NaN here would turn every normalised value and the loss into NaN)."""
    for name, values in stats.items():
        if values is not None and not bool(torch.isfinite(values).all()):
            bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
            raise ValueError(f"statistic {name!r} must be finite; dims {bad} are {values[bad].tolist()}")
    if stats["std"] is not None and bool((stats["std"] < 0).any()):
        raise ValueError(f"statistic 'std' must be >= 0; got {stats['std'].tolist()}")
    if stats["q01"] is not None and stats["q99"] is not None and bool((stats["q01"] > stats["q99"]).any()):
        raise ValueError(f"statistic 'q01' must be <= 'q99'; got q01 {stats['q01'].tolist()}, q99 {stats['q99'].tolist()}")


#: quantile normalisation maps ``[q01, q99]`` to ``[-1, 1]``; data beyond this many units is refused.
QUANTILE_REACH = 100.0


def check_quantile_range(q01: torch.Tensor, q99: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> None:
    """ValueError unless quantile normalisation keeps the data's ``[low, high]`` within
    :data:`QUANTILE_REACH` of ``[-1, 1]``. A near-empty ``[q01, q99]`` with data outside it (a
    dimension that is almost always 0, as delta actions often are) would otherwise blow those
    values up by ``1 / (q99 - q01)``. Shapes: all ``[d]``."""
    span = q99 - q01 + EPS
    reach = torch.maximum((2 * (high - q01) / span - 1).abs(), (2 * (low - q01) / span - 1).abs())
    bad = (reach > QUANTILE_REACH).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"dims {bad} have a degenerate quantile range (q01 {q01[bad].tolist()}, q99 {q99[bad].tolist()}, but min "
            f"{low[bad].tolist()}, max {high[bad].tolist()}): quantile normalisation would map their extremes to "
            f"{reach[bad].max().item():.3g}; normalise this feature with mean_std (policy.state_norm / "
            "policy.action_norm), or use statistics of more data")


class FeatureNormalizer(nn.Module):
    """Statistics of one feature (``state`` or ``action``) of model width ``dim``.

    Modes: ``mean_std``: ``(x - mean) / (std + eps)``; ``quantile``:
    ``2 (x - q01) / (q99 - q01 + eps) - 1`` (openpi's pi0.5 convention, no clipping);
    ``identity``. Buffers: ``mean``, ``std``, ``q01``, ``q99`` (``[dim]``) and ``data_dim``
    (how many leading dims the data has).

    ``convention="vlablocks"`` uses ``eps = 1e-6`` both ways (an exact inverse);
    ``convention="lerobot"`` reproduces LeRobot's processors: ``(x - mean) / (std + 1e-8)`` in and
    ``x std + mean`` out; quantiles divide by ``q99 - q01`` (``1e-8`` only where it is 0) both ways.
    """

    def __init__(self, dim: int, mode: NormMode = "mean_std", device: torch.device | str | None = None,
                 convention: NormConvention = "vlablocks") -> None:
        super().__init__()
        if mode not in NORM_MODES:
            raise ValueError(f"normalisation mode must be one of {list(NORM_MODES)}; got {mode!r}")
        if convention not in ("vlablocks", "lerobot"):
            raise ValueError(f"normalisation convention must be 'vlablocks' or 'lerobot'; got {convention!r}")
        self.dim, self.mode, self.convention = dim, mode, convention
        for name, value in DEFAULT_STATS.items():
            self.register_buffer(name, torch.full((dim,), value, device=device))
        self.register_buffer("data_dim", torch.tensor(dim, device=device))
        self._width = dim  # a Python copy of data_dim: no device sync on the hot path
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_width", int(module.data_dim)))

    def set_stats(
        self,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        q01: torch.Tensor | None = None,
        q99: torch.Tensor | None = None,
    ) -> None:
        """Set the statistics of a ``[d]`` feature (``d <= dim``); the statistic the mode needs is required.

        Raises:
            ValueError: a statistic is missing, of the wrong length, not finite, ``std < 0`` or ``q01 > q99``.
        """
        needed = {"mean_std": ("mean", "std"), "quantile": ("q01", "q99"), "identity": ()}[self.mode]
        given = {"mean": mean, "std": std, "q01": q01, "q99": q99}
        missing = [name for name in needed if given[name] is None]
        if missing:
            raise ValueError(f"mode {self.mode!r} needs statistics {missing}")
        given = {name: None if t is None else torch.as_tensor(t, dtype=torch.float32).flatten() for name, t in given.items()}
        sizes = {name: t.numel() for name, t in given.items() if t is not None}
        if len(set(sizes.values())) > 1 or any(n > self.dim for n in sizes.values()):
            raise ValueError(f"statistics must all have the same length <= {self.dim}; got {sizes}")
        _check_stats(given)
        with torch.no_grad():
            for name, value in given.items():
                if value is not None:
                    getattr(self, name)[: value.numel()] = value.to(getattr(self, name).device)
            if sizes:
                self._width = next(iter(sizes.values()))
                self.data_dim.fill_(self._width)

    @property
    def has_stats(self) -> bool:
        """Whether statistics were set (any buffer differs from :data:`DEFAULT_STATS`, or the
        data is narrower than the model)."""
        return self.width != self.dim or any(
            bool((getattr(self, name) != value).any()) for name, value in DEFAULT_STATS.items()
        )

    @property
    def width(self) -> int:
        """The data's width ``d``."""
        return self._width

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d] -> [..., dim]``: normalise the data dims, zero-pad the rest."""
        d = x.shape[-1]
        if d != self.width:
            raise ValueError(f"expected a feature of width {self.width} (the data's); got {d}")
        x = x.float()
        lerobot = self.convention == "lerobot"
        if self.mode == "mean_std":
            x = (x - self.mean[:d]) / (self.std[:d] + (LEROBOT_EPS if lerobot else EPS))
        elif self.mode == "quantile":
            x = 2.0 * (x - self.q01[:d]) / self._quantile_span(d) - 1.0
        return nn.functional.pad(x, (0, self.dim - d))

    def _quantile_span(self, d: int) -> torch.Tensor:
        """``[d]``: the divisor of quantile normalisation (see the class docstring)."""
        span = self.q99[:d] - self.q01[:d]
        if self.convention == "lerobot":
            return torch.where(span == 0, torch.full_like(span, LEROBOT_EPS), span)
        return span + EPS

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dim] -> [..., d]``: drop the padding dims and invert :meth:`normalize`."""
        d = self.width
        x = x[..., :d].float()
        if self.mode == "mean_std":
            if self.convention == "lerobot":
                return x * self.std[:d] + self.mean[:d]
            return x * (self.std[:d] + EPS) + self.mean[:d]
        if self.mode == "quantile":  # LeRobot's (x + 1) * span / 2 gives the same bits: halving is exact
            return (x + 1.0) / 2.0 * self._quantile_span(d) + self.q01[:d]
        return x

    def extra_repr(self) -> str:
        convention = "" if self.convention == "vlablocks" else f", convention={self.convention!r}"
        return f"dim={self.dim}, mode={self.mode!r}{convention}"
