"""Model-poisoning attacks that craft each Byzantine row directly or from honest statistics.

Each function follows the contract of ``gossamer.attacks.core``: it takes ``updates [G, B, P]``
and ``byzantine [G, B]`` and returns the ``[K, P]`` malicious rows (float64). Statistics
(mean, std) are taken over the honest rows of each group, as an omniscient attacker would,
or over all rows of a group that has no honest row.

The std is the sample std (ddof = 1), 0 for fewer than two rows: the attacker estimates the
spread of the honest population from a sample of it, and it is what the authors' code for
ALIE and Min-Max/Min-Sum computes (``torch.std``, unbiased by default).

References:
    - ALIE: Baruch, Baruch, Goldberg (2019), "A Little Is Enough: Circumventing Defenses For
      Distributed Learning", NeurIPS 2019, arXiv:1902.06156.
    - IPM: Xie, Koyejo, Gupta (2019), "Fall of Empires: Breaking Byzantine-tolerant SGD by
      Inner Product Manipulation", UAI 2019, arXiv:1903.03936.
"""

from __future__ import annotations

import torch

from gossamer.attacks.core import (
    NON_NEGATIVE,
    OPTIONAL_REAL,
    POSITIVE,
    centered,
    group_of,
    masked_mean,
    masked_std,
    reference_rows,
    register,
)


@register("sign_flip", scale=POSITIVE)
def sign_flip(
    updates: torch.Tensor, byzantine: torch.Tensor, *, generator=None, scale: float = 1.0
) -> torch.Tensor:
    """Each attacker sends its own update reversed and scaled: ``-scale * own``."""
    return -scale * updates[byzantine].to(torch.float64)


@register("scaling", scale=POSITIVE)
def scaling(
    updates: torch.Tensor, byzantine: torch.Tensor, *, generator=None, scale: float = 10.0
) -> torch.Tensor:
    """Each attacker boosts its own update: ``scale * own`` (boosting / model replacement)."""
    return scale * updates[byzantine].to(torch.float64)


@register("gaussian", draws=True, sigma=NON_NEGATIVE)
def gaussian(
    updates: torch.Tensor,
    byzantine: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    sigma: float = 1.0,
) -> torch.Tensor:
    """Each Byzantine row is its own draw of ``N(0, sigma^2 I)`` from ``generator``.

    Draws ``[K, P]`` standard normals in float64 (K = number of Byzantine rows, row-major
    order) on the generator's device, so the result is a function of the generator's state
    and the mask only (a CPU generator gives the same noise for CPU and GPU updates).
    """
    k, p = int(byzantine.sum()), updates.shape[-1]
    device = updates.device if generator is None else generator.device
    noise = torch.randn((k, p), generator=generator, dtype=torch.float64, device=device)
    return sigma * noise.to(updates.device)


def alie_z(n: torch.Tensor | int, f: torch.Tensor | int) -> torch.Tensor:
    """ALIE's ``z_max`` for a group of ``n`` rows of which ``f`` are Byzantine (Baruch et al.
    2019, arXiv:1902.06156, Algorithm 1): ``s = floor(n/2 + 1) - f`` honest rows must be
    "farther" than the attackers for them to be a majority, and ``z = Phi^-1((n - s) / n)``.

    When ``f >= floor(n/2 + 1)`` (``s <= 0``: no honest support needed) ``s`` is taken as 1,
    so ``z`` stays finite; ``z`` is clamped at 0 from below (only reached when ``n = 1``).

    >>> round(float(alie_z(50, 10)), 4)
    0.4677
    """
    f = torch.as_tensor(f, dtype=torch.float64)
    n = torch.as_tensor(n, dtype=torch.float64, device=f.device)
    s = (torch.floor(n / 2 + 1) - f).clamp_min(1.0)
    return torch.special.ndtri((n - s) / n).clamp_min(0.0)


@register("free_rider", draws=True, sigma=NON_NEGATIVE)
def free_rider(
    updates: torch.Tensor,
    byzantine: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    sigma: float = 0.0,
) -> torch.Tensor:
    """A client that does no work: it sends the model it received (a zero update), or with
    ``sigma > 0`` that model plus ``N(0, sigma^2 I)`` noise to look as if it had trained (the
    disguised free-rider of Lin et al., "Free-riders in Federated Learning: Attacks and
    Defenses", arXiv:1911.12560)."""
    if sigma == 0:
        return torch.zeros((int(byzantine.sum()), updates.shape[-1]), dtype=torch.float64,
                           device=updates.device)
    return gaussian(updates, byzantine, generator=generator, sigma=sigma)   # the update is noise


@register("alie", z=OPTIONAL_REAL)
def alie(
    updates: torch.Tensor, byzantine: torch.Tensor, *, generator=None, z: float | None = None
) -> torch.Tensor:
    """A Little Is Enough (Baruch et al. 2019, arXiv:1902.06156).

    Every Byzantine row of group g is ``mu_g - z * sigma_g``, with ``mu_g``, ``sigma_g`` the
    coordinate-wise mean and sample std of the group's honest rows. ``z = None`` uses the
    paper's ``z_max`` (``alie_z``) with ``n = B`` (the group size) and ``f`` the group's number
    of Byzantine rows.
    """
    ref = reference_rows(byzantine)
    mean = masked_mean(updates, ref)
    std = masked_std(centered(updates, ref, mean), ref)
    if z is None:
        zg = alie_z(byzantine.shape[1], byzantine.sum(dim=1)).unsqueeze(1)
    else:
        zg = torch.tensor(float(z), dtype=torch.float64, device=updates.device)
    return (mean - zg * std)[group_of(byzantine)]


@register("ipm", epsilon=POSITIVE)
def ipm(
    updates: torch.Tensor, byzantine: torch.Tensor, *, generator=None, epsilon: float = 0.1
) -> torch.Tensor:
    """Inner Product Manipulation (Xie et al. 2019, arXiv:1903.03936).

    Every Byzantine row is ``-epsilon * mean`` of the group's honest rows, so that the inner
    product of the aggregate with the true mean turns negative.
    """
    mean = masked_mean(updates, reference_rows(byzantine))
    return (-epsilon * mean)[group_of(byzantine)]
