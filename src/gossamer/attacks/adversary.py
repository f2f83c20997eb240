"""Byzantine nodes in the simulator: who they are, and what they send instead of their update.

The attack maths lives in :mod:`gossamer.attacks` (pure functions over stacked updates);
this module decides which nodes are Byzantine (``adversary`` config section), poisons their
labels for data attacks, and turns models into updates and back around an attack call:

- FL: one group per round, the selected clients' updates relative to the global model.
- DL: one group per receiving node, its neighbours' models relative to its own model, so
  an attacker can send a different model to each neighbour.
"""

from __future__ import annotations

import numpy as np
import torch

from gossamer import rng
from gossamer.config import ConfigError, ExperimentConfig


class Adversary:
    """The Byzantine node set and the configured attack (``enabled`` is False without one)."""

    def __init__(self, attack: str | None, byzantine: np.ndarray, params: dict, seed: int) -> None:
        from gossamer.attacks import DATA_ATTACKS

        self.attack, self.params, self.seed = attack, dict(params), seed
        self.byzantine = np.asarray(byzantine, dtype=bool)
        self.enabled = attack is not None and bool(self.byzantine.any())
        self.data_attack = self.enabled and attack in DATA_ATTACKS
        self.model_attack = self.enabled and not self.data_attack
        self.honest = np.flatnonzero(~self.byzantine)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, n: int) -> Adversary:
        a = cfg.adversary
        byz = np.zeros(n, dtype=bool)
        if a.attack is None:
            return cls(None, byz, {}, cfg.seed)
        if a.nodes is not None:
            bad = [i for i in a.nodes if not 0 <= i < n]
            if bad:
                raise ConfigError("adversary.nodes", f"node id {bad[0]} is not in [0, {n})")
            byz[list(a.nodes)] = True
        else:
            count = int(round(a.fraction * n))
            order = np.argsort(rng.uniform(cfg.seed, rng.STREAM_ATTACK, np.arange(n), 0), kind="stable")
            byz[order[:count]] = True
        from gossamer.attacks import check_attack_params

        try:
            check_attack_params(a.attack, **a.params)
        except ValueError as exc:
            raise ConfigError("adversary.params", str(exc).splitlines()[0]) from None
        if byz.all():
            raise ConfigError("adversary.fraction", "every node is Byzantine; at least one must be honest")
        return cls(a.attack, byz, a.params, cfg.seed)

    def poison_labels(self, y: torch.Tensor, shards: list[np.ndarray], num_classes: int) -> torch.Tensor:
        """Training labels with every Byzantine node's shard flipped (shards are disjoint)."""
        from gossamer.attacks import flip_labels
        from gossamer.attacks.data import noisy_labels

        if not self.data_attack:
            return y
        rows = [shards[i] for i in np.flatnonzero(self.byzantine) if len(shards[i])]
        if not rows:
            return y
        idx = torch.from_numpy(np.concatenate(rows).astype(np.int64))
        y = y.clone()
        if self.attack == "label_noise":
            rate = float(self.params.get("rate", 1.0))
            if rate > 1:
                raise ConfigError("adversary.params", f"rate must be in [0, 1], got {rate:g}")
            y[idx] = noisy_labels(y[idx], num_classes, rate, self._generator(0, -2))
        else:
            y[idx] = flip_labels(y[idx], num_classes)
        return y

    def _generator(self, round_: int, key: int) -> torch.Generator:
        seed = int(rng.hash_u64(self.seed, rng.STREAM_ATTACK, round_, key + 1)[0] % (2**63 - 1))
        return torch.Generator().manual_seed(seed)

    def corrupt(self, messages: torch.Tensor, reference: torch.Tensor, byzantine: np.ndarray,
                round_: int, key: int = 0) -> torch.Tensor:
        """Replace the Byzantine rows of ``messages`` by attack models.

        Args:
            messages: ``[B, P]`` or ``[G, B, P]`` models as each sender would honestly send them.
            reference: ``[P]`` (FL: the global model) or ``[G, P]`` (DL: each receiver's model);
                the attack works on ``messages - reference``.
            byzantine: bool ``[B]`` or ``[G, B]``: which senders are Byzantine.
            round_, key: select the attack's random stream (deterministic per round and key).
        """
        from gossamer.attacks import apply_attack

        mask = torch.from_numpy(np.asarray(byzantine, dtype=bool))
        if not self.model_attack or not bool(mask.any()):
            return messages
        ref = reference.unsqueeze(-2) if reference.dim() == messages.dim() - 1 else reference
        updates = apply_attack(self.attack, messages - ref, mask,
                               generator=self._generator(round_, key), **self.params)
        return updates + ref
