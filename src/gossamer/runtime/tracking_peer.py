"""A gradient-tracking peer: the D-PSGD peer whose messages carry the model and the tracker.

It executes the ``gradient_tracking`` pattern (:mod:`gossamer.protocols.sync_dl` with
:class:`~gossamer.algorithms.dl.gradient_tracking.GradientTracking`'s updates) for one node:
a message is one frame of ``2 P`` values, the model and the tracker's direction ``y``, both
merged with the same row of the round's mixing matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer.protocols import sync_dl as protocol
from gossamer.runtime.dl_peer import Peer
from gossamer.training.trainer import local_steps


class GradientTrackingPeer(Peer):
    """A peer of the ``gradient_tracking`` pattern (:mod:`gossamer.algorithms.dl.gradient_tracking`,
    one node): local steps along ``g + c``, then ``y = (x - z) / (K lr)``; every gossip step
    sends one frame of ``2 P`` values (the model and ``y``), and both are mixed with the same
    row (missing neighbours folded onto the own weight); after the round's steps
    ``c <- c - y + (W^Q y)``. The correction ``c`` is checkpointed with the model."""

    pattern = "gradient_tracking"
    vectors = 2

    def _init_state(self) -> None:
        trainer = self.exp.trainer
        protocol.check_gradient_tracking(trainer.sizes, False)
        self.correction = self.algorithm.init_correction(1, self.exp.spec.numel, self.params.dtype)
        self.lr = trainer.optimizer.lr
        self.local_steps = local_steps(trainer.schedule, trainer.sizes)[[self.node]]

    def _state(self) -> dict[str, Any]:
        return {"correction": self.correction}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.correction = state["correction"].clone()

    def _round(self, stubs: dict[int, Any], r: int) -> None:
        algo, numel = self.algorithm, self.exp.spec.numel
        start = self.params.clone()
        self.exp.trainer.train(self.params, np.array([self.node]), r, inplace=True,
                               objective=algo.local_objective(self.correction))
        y = algo.directions(start, self.params, self.local_steps, self.lr, self.correction, out=start)
        steps = algo.gossip_steps_at(r, self.cfg.stop.rounds)
        if not steps:                                 # no gossip: the correction stays
            return
        algo.remove_directions(self.correction, y)
        for step in range(steps):
            self._send(stubs, r, step, torch.cat([self.params[0], y[0]]))
            weights, received = self._gather(r, step)
            self.params = algo.mix_row(weights, torch.cat([self.params] + [m[:, :numel] for m in received]))[None]
            y = algo.mix_row(weights, torch.cat([y] + [m[:, numel:] for m in received]))[None]
        algo.add_mixed(self.correction, y)

