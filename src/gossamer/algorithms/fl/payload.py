"""What a synchronous FL server sends each selected client: a typed record, flat on the wire."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Payload:
    """The global ``model`` ``[P]`` and the server's further vectors by name, each ``[P]``
    (SCAFFOLD's ``control``, client momentum's ``momentum``, FedAMD's ``direction``), in the
    order of the algorithm's ``download_names``, which is their order on the wire."""

    model: torch.Tensor
    vectors: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.vectors[name]

    def flat(self) -> torch.Tensor:
        """The wire form ``[download_vectors * P]``: the model, then the vectors in order."""
        if not self.vectors:
            return self.model
        return torch.cat([self.model, *self.vectors.values()])

    @classmethod
    def of(cls, flat: torch.Tensor, names: Sequence[str]) -> Payload:
        """The record of a wire form ``flat`` whose vectors are ``names`` (the algorithm's
        ``download_names``); its parts are views of ``flat``."""
        parts = flat.reshape(1 + len(names), -1)
        return cls(parts[0], dict(zip(names, parts[1:], strict=True)))


__all__ = ["Payload"]
