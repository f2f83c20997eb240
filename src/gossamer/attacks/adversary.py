"""Byzantine nodes in the simulator: who they are, and what they send instead of their update.

The attack maths lives in :mod:`gossamer.attacks` (pure functions over stacked updates);
this module decides which nodes are Byzantine (``adversary`` config section), poisons their
labels for data attacks, and turns models into updates and back around an attack call:

- FL: one group per round, the selected clients' updates relative to the global model.
- DL: one group per receiving node, its neighbours' models relative to its own model, so
  an attacker can send a different model to each neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gossamer import rng
from gossamer.config import ConfigError, ExperimentConfig


@dataclass(frozen=True)
class Group:
    """One group of attackers: its attack, its params and its nodes (bool ``[N]``)."""

    attack: str
    params: dict
    mask: np.ndarray


class Adversary:
    """The Byzantine node set and the configured attacks (``enabled`` is False without one).

    ``byzantine``: every attacker (all groups); ``crafting``: the nodes whose updates the one
    model attack crafts (``attack``, ``params``); the data attacks' groups train on poisoned
    labels (:meth:`poison_labels`)."""

    def __init__(self, attack: str | None, byzantine: np.ndarray, params: dict, seed: int,
                 groups: list[Group] | None = None) -> None:
        from gossamer.attacks import DATA_ATTACKS

        byzantine = np.asarray(byzantine, dtype=bool)
        if groups is None:
            groups = [Group(attack, dict(params), byzantine)] if attack is not None else []
        self.groups = [g for g in groups if g.mask.any()]
        self.seed = seed
        self.byzantine = np.zeros(len(byzantine), dtype=bool)
        for g in self.groups:
            self.byzantine |= g.mask
        model = [g for g in self.groups if g.attack not in DATA_ATTACKS]
        self.enabled = bool(self.groups)
        self.data_attack = any(g.attack in DATA_ATTACKS for g in self.groups)
        self.model_attack = bool(model)
        first = model[0] if model else (self.groups[0] if self.groups else None)
        self.attack = first.attack if first is not None else attack
        self.params = dict(first.params) if first is not None else dict(params)
        self.crafting = model[0].mask if model else np.zeros(len(byzantine), dtype=bool)
        self.honest = np.flatnonzero(~self.byzantine)

    @property
    def flagged(self) -> np.ndarray | None:
        """Every attacker (bool ``[N]``), or None without an adversary: what reports flag."""
        return self.byzantine if self.enabled else None

    @property
    def kinds(self) -> dict[str, np.ndarray] | None:
        """Each attack's nodes when several groups mount different ones, else None."""
        return {g.attack: g.mask for g in self.groups} if len(self.groups) > 1 else None

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, n: int) -> Adversary:
        from gossamer.attacks import DATA_ATTACKS, check_attack_params

        a = cfg.adversary
        wanted = ([(a.attack, a.fraction, a.nodes, a.params, "adversary")] if a.attack is not None else [])
        wanted += [(g.attack, g.fraction, g.nodes, g.params, f"adversary.groups.{i}")
                   for i, g in enumerate(a.groups)]
        if not wanted:
            return cls(None, np.zeros(n, dtype=bool), {}, cfg.seed)
        if sum(attack not in DATA_ATTACKS for attack, *_ in wanted) > 1:
            raise ConfigError("adversary.groups", "at most one model attack in all groups (any "
                              "number of data attacks)")
        order = np.argsort(rng.uniform(cfg.seed, rng.STREAM_ATTACK, np.arange(n), 0), kind="stable")
        taken = np.zeros(n, dtype=bool)
        for _, _, nodes, _, field in wanted:            # explicit nodes first
            if nodes is None:
                continue
            bad = [i for i in nodes if not 0 <= i < n]
            if bad:
                raise ConfigError(f"{field}.nodes", f"node id {bad[0]} is not in [0, {n})")
            if taken[list(nodes)].any():
                raise ConfigError(f"{field}.nodes", "groups of attackers must not share nodes")
            taken[list(nodes)] = True
        free = order[~taken[order]]                     # then fractions, along one random order
        groups = []
        for attack, fraction, nodes, params, field in wanted:
            try:
                check_attack_params(attack, **params)
            except ValueError as exc:
                raise ConfigError(f"{field}.params", str(exc).splitlines()[0]) from None
            mask = np.zeros(n, dtype=bool)
            if nodes is not None:
                mask[list(nodes)] = True
            else:
                count = int(round(fraction * n))
                mask[free[:count]] = True
                free = free[count:]
            groups.append(Group(attack, dict(params), mask))
        byz = np.any([g.mask for g in groups], axis=0)
        if byz.all():
            raise ConfigError("adversary.fraction", "every node is Byzantine; at least one must be honest")
        return cls(a.attack, byz, a.params, cfg.seed, groups)

    def poison_labels(self, y: torch.Tensor, shards: list[np.ndarray], num_classes: int) -> torch.Tensor:
        """Training labels with every data attacker's shard poisoned (shards are disjoint):
        flipped (``label_flip``) or partly drawn at random (``label_noise``)."""
        from gossamer.attacks import DATA_ATTACKS, flip_labels
        from gossamer.attacks.data import noisy_labels

        y = y.clone() if self.data_attack else y
        for index, group in enumerate(self.groups):
            if group.attack not in DATA_ATTACKS:
                continue
            rows = [shards[i] for i in np.flatnonzero(group.mask) if len(shards[i])]
            if not rows:
                continue
            idx = torch.from_numpy(np.concatenate(rows).astype(np.int64))
            if group.attack == "label_noise":            # rate checked with the config
                rate = float(group.params.get("rate", 1.0))
                y[idx] = noisy_labels(y[idx], num_classes, rate, self._generator(0, -2 - index))
            else:
                y[idx] = flip_labels(y[idx], num_classes)
        return y

    def _generator(self, round_: int, key: int) -> torch.Generator:
        seed = int(rng.hash_u64(self.seed, rng.STREAM_ATTACK, round_, key + 1)[0] % (2**63 - 1))
        return torch.Generator().manual_seed(seed)

    def corrupt(self, messages: torch.Tensor, reference: torch.Tensor, byzantine: np.ndarray,
                round_: int, key: int = 0, keys: np.ndarray | None = None) -> torch.Tensor:
        """Replace the Byzantine rows of ``messages`` by attack models.

        Args:
            messages: ``[B, P]`` or ``[G, B, P]`` models as each sender would honestly send them.
            reference: ``[P]`` (FL: the global model) or ``[G, P]`` (DL: each receiver's model);
                the attack works on ``messages - reference``.
            byzantine: bool ``[B]`` or ``[G, B]``: which senders are Byzantine.
            round_, key: select the attack's random stream (deterministic per round and key).
            keys: ``[G]``, with ``[G, B, P]`` messages: one key per group (per receiver), in
                place of ``key`` for an attack that draws (:func:`~gossamer.attacks.core.draws`),
                so its draws for a receiver do not depend on which other receivers share the
                call (the sharded simulator groups them by rank).
        """
        from gossamer.attacks import apply_attack
        from gossamer.attacks.core import draws

        mask = torch.from_numpy(np.asarray(byzantine, dtype=bool))
        if not self.model_attack or not bool(mask.any()):
            return messages
        ref = reference.unsqueeze(-2) if reference.dim() == messages.dim() - 1 else reference
        if keys is not None and messages.dim() == 3 and draws(self.attack):
            out = messages.clone()
            for g in torch.nonzero(mask.any(dim=1)).flatten().tolist():
                out[g] = apply_attack(self.attack, messages[g] - ref[g], mask[g],
                                      generator=self._generator(round_, int(keys[g])), **self.params) + ref[g]
            return out
        updates = apply_attack(self.attack, messages - ref, mask,
                               generator=self._generator(round_, key), **self.params)
        return updates + ref
