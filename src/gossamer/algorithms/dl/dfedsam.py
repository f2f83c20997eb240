"""DFedSAM and DFedSAM-MGS: D-PSGD whose local optimizer is SAM, with multiple gossip steps.

Shi et al., "Improving the Model Consistency of Decentralized Federated Learning", ICML 2023,
arXiv:2302.04083.
"""

from __future__ import annotations

from dataclasses import dataclass

from gossamer.algorithms.dl.dpsgd import DPSGD


@dataclass(frozen=True)
class DFedSAM(DPSGD):
    """D-PSGD with sharpness-aware local steps of radius ``rho`` (Shi et al. 2023).

    The same as ``dpsgd`` with ``local.sam_rho: rho``: every local step takes the gradient at
    ``w + rho * g / ||g||``. ``rho`` sets ``local.sam_rho`` for the run (setting both to
    different values is an error). Every D-PSGD option (schedules, final merge, robust
    ``aggregator``) applies.
    """

    rho: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.rho < float("inf"):
            raise ValueError("rho must be a finite number > 0 (use dpsgd for plain SGD)")

    @property
    def local_sam_rho(self) -> float:
        """SAM's radius this algorithm asks local training for (read when the run is built)."""
        return self.rho


@dataclass(frozen=True)
class DFedSAMMGS(DFedSAM):
    """DFedSAM with multiple gossip steps: ``gossip_steps`` (Q) mixing steps ``X <- W^Q X``
    per round, which shrink the consensus distance by up to ``|lambda_2(W)|^(2Q)``."""

    gossip_steps: int = 4


__all__ = ["DFedSAM", "DFedSAMMGS"]
