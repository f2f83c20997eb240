"""Error feedback (EF) and EF21 as pure functions over caller-held memory ``[N, P]``.

EF: Stich, Cordonnier, Jaggi 2018, "Sparsified SGD with Memory" (arXiv:1809.07599) and
Karimireddy, Rebjock, Stich, et al. 2019, "Error Feedback Fixes SignSGD and other Gradient
Compression Schemes" (arXiv:1901.09847): compress ``x + e`` and keep what was not sent in
``e``. EF21: Richtárik, Sokolov, Fatkhullin 2021, "EF21: A New, Simpler, Theoretically
Better, and Practically Faster Error Feedback" (arXiv:2106.05203): sender and receiver keep
the same estimate ``g`` and the sender transmits the compressed difference ``x - g``.
"""

from __future__ import annotations

import numpy as np
import torch

from gossamer.compression.base import Compressor, Encoded


def error_feedback(compressor: Compressor, x: torch.Tensor, memory: torch.Tensor | None, *,
                   seed: int = 0, keys: np.ndarray | None = None
                   ) -> tuple[Encoded, torch.Tensor, torch.Tensor]:
    """One EF step: ``p = x + memory``; send ``C(p)``; ``memory' = p - D(C(p))``.

    ``x``, ``memory``: ``[N, P]`` (``memory`` None means zeros; scale ``x`` by the step size
    before the call when EF is applied to steps rather than gradients). Returns
    ``(encoded, decoded [N, P], new_memory [N, P])``. Over any number of steps,
    ``sum(decoded) + memory == sum(x)`` up to float rounding.
    """
    p = x if memory is None else x + memory
    enc = compressor.compress(p, seed=seed, keys=keys)
    decoded = compressor.decompress(enc)
    return enc, decoded, p - decoded


def ef21(compressor: Compressor, x: torch.Tensor, estimate: torch.Tensor | None, *,
         seed: int = 0, keys: np.ndarray | None = None) -> tuple[Encoded, torch.Tensor]:
    """One EF21 sender step: send ``C(x - g)``; ``g' = g + D(C(x - g))``.

    ``x``, ``estimate`` (``g``; None means zeros): ``[N, P]``. Returns
    ``(encoded, new_estimate)``; the receiver, holding the same ``g``, applies
    :func:`ef21_receive` to the decoded payload and obtains the same ``g'``.
    """
    g = torch.zeros_like(x) if estimate is None else estimate
    enc = compressor.compress(x - g, seed=seed, keys=keys)
    return enc, ef21_receive(g, compressor.decompress(enc))


def ef21_receive(estimate: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """The receiver's EF21 update ``g' = g + decoded`` (decoded: ``decompress`` or
    ``from_bytes`` of the sender's payload)."""
    return estimate + decoded
