"""An example Gossamer plugin: one aggregator and one model, registered when imported.

Installed (``pip install ./examples/plugin``), Gossamer imports this module through its
``gossamer.plugins`` entry point, so a config can say ``model: {name: example_mlp}`` or
``algorithm.params.aggregator: example_clipped_mean`` and ``gossamer list`` shows both.
In a notebook, ``import gossamer_example_plugin`` does the same without installing it.
"""

from __future__ import annotations

import torch
from torch import nn

import gossamer


def _check_tau(n: int, *, tau: float = 1.0) -> None:
    """Asked once at build time: can the rule run on ``n`` inputs with these parameters?"""
    if not tau > 0:
        raise ValueError(f"example_clipped_mean: tau must be > 0, got {tau!r}")


@gossamer.register_aggregator("example_clipped_mean", check=_check_tau)
def clipped_mean(updates: torch.Tensor, weights: torch.Tensor | None = None, *,
                 f: int = 0, tau: float = 1.0) -> torch.Tensor:
    """Mean of the updates after scaling each to norm at most ``tau`` (ignores ``weights``).

    ``updates`` is ``[B, P]`` (one row per client) or ``[G, B, P]`` (G independent groups);
    the result is ``[P]`` or ``[G, P]``, in the dtype of ``updates``.
    """
    x = updates.double()
    norms = x.norm(dim=-1, keepdim=True)
    scale = torch.clamp(tau / norms.clamp_min(1e-12), max=1.0)
    return (x * scale).mean(dim=-2).to(updates.dtype)


class SmallMLP(nn.Module):
    """Flatten, one hidden layer with tanh, linear output (logits)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 32) -> None:
        super().__init__()
        inputs = 1
        for d in input_shape:
            inputs *= d
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.Tanh(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@gossamer.register_model("example_mlp")
def example_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 32) -> nn.Module:
    """``model: {name: example_mlp, params: {hidden: 32}}``."""
    return SmallMLP(input_shape, num_classes, hidden)
