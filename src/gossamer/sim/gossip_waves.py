"""Phase 2 of the simulated gossip window: the model reads and writes, in batched waves.

Phase 1 (:mod:`gossamer.sim.drivers.gossip`) turns a window's events into model operations
``(time, kind, node, message)``. Here every node's operations keep their time order and the
operations of one wave touch distinct nodes, so each wave is one batched tensor call. Sent
models are copy-on-write references to the sender's row (:class:`~gossamer.sim.messages.MessageStore`),
copied only if that row changes before the message is merged, so most sends copy nothing.
"""

from __future__ import annotations

import numpy as np
import torch

READ, WRITE, RESET, MERGE, TRAIN = 0, 1, 2, 3, 4     # model operations: (time, kind, node, message)


class GossipWaves:
    """The model side of :class:`~gossamer.sim.drivers.gossip.GossipDriver` (a mixin over the
    driver's population state: ``params`` from node ``row_base`` on, ``age``, ``messages``,
    ``receiver``, ``updates``)."""

    def _run_ops(self, ops: list[tuple]) -> None:
        """Phase 2: apply reads and writes in waves with each node at most once per wave.

        An op's wave is the number of earlier ops of the same node in the window, so every
        node's ops keep their time order and the ops of one wave touch distinct nodes."""
        if not ops:
            return
        timed = np.array(ops, dtype=np.float64)              # [M, 4]: time, kind, node, message
        order = np.lexsort((np.arange(len(ops)), timed[:, 0], timed[:, 2]))   # by node, then time
        table = timed[order, 1:].astype(np.int64)            # [M, 3]: kind, node, message
        nodes = table[:, 1]
        first = np.r_[0, np.flatnonzero(nodes[1:] != nodes[:-1]) + 1]
        wave = np.arange(len(nodes)) - np.repeat(first, np.diff(np.r_[first, len(nodes)]))
        waves = int(wave.max()) + 1
        for w in range(waves):
            part = table if waves == 1 else table[wave == w]
            kind = part[:, 0]
            self.messages.detach(part[kind != READ, 1].tolist(), self.params)   # rows about to change
            reads = part[kind == READ]
            if len(reads):
                self._read(reads[:, 1], reads[:, 2])
            self._apply(part)

    def _apply(self, part: np.ndarray) -> None:
        """A wave's resets (fresh rejoins), merges, then local updates (its reads are taken;
        a node has one operation a wave, so a reset never touches a row read in it)."""
        kind = part[:, 0]
        resets = part[kind == RESET, 1]
        if len(resets):
            self._restart(resets)
            self.age[self._index(resets - self.row_base)] = 0.0
        for op, train in ((WRITE, True), (MERGE, False)):
            merges = part[kind == op]
            if len(merges):
                self._merge(merges[:, 1], merges[:, 2], train)
        trains = part[kind == TRAIN, 1]
        if len(trains):
            idx = self._index(trains - self.row_base)
            rows = self.params.index_select(0, idx)
            trained = self._local_update(rows, trains)
            self.params.index_copy_(0, idx, rows)
            self.age[idx] += trained.to(self.age.dtype)

    def _read(self, nodes: np.ndarray, msgs: np.ndarray) -> None:
        """Senders' models become messages: references to their rows (copied only if the row
        changes before the message is merged); Byzantine senders' crafted rows are copied."""
        ages = self.age[self._index(nodes)].tolist()
        adv = self.exp.adversary
        byz = adv.byzantine[nodes] if adv is not None and adv.model_attack else np.zeros(len(nodes), dtype=bool)
        honest, pick = np.flatnonzero(~byz), np.flatnonzero(byz)
        self.messages.put(msgs[honest].tolist(), nodes[honest].tolist(), [ages[j] for j in honest])
        if len(pick):
            self.messages.put_rows(msgs[pick].tolist(), self._crafted(nodes[pick], msgs[pick]),
                                   [ages[j] for j in pick])

    def _crafted(self, nodes: np.ndarray, msgs: np.ndarray) -> torch.Tensor:
        """What Byzantine senders send: an attack crafted against the receiver's current model
        (the receiver's model is the honest reference)."""
        receivers = self._index(np.array([self.receiver[m] for m in msgs.tolist()], dtype=np.int64))
        return self._craft(self.params[self._index(nodes)], self.params[receivers], msgs)

    def _craft(self, sent: torch.Tensor, own: torch.Tensor, msgs: np.ndarray) -> torch.Tensor:
        """Messages ``msgs`` crafted from what their Byzantine senders would honestly send
        (``sent``) against their receivers' models (``own``), each message's draws keyed by its
        id (not by the others crafted with it: ranks craft their receivers' messages apart)."""
        held = torch.stack([own, sent], dim=1)                                # [F, 2, P]
        mask = np.zeros((len(msgs), 2), dtype=bool)
        mask[:, 1] = True
        return self.exp.adversary.corrupt(held, own, mask, self.round + 1, key=int(msgs[0]),
                                          keys=np.asarray(msgs, dtype=np.int64))[:, 1]

    def _merge(self, nodes: np.ndarray, msgs: np.ndarray, train: bool) -> None:
        """Receivers merge the messages ``msgs`` into their models (then train, one clock)."""
        received, received_age, order = self.messages.take(msgs.tolist(), self.params)
        nodes = nodes[order]                          # the ops of a wave are independent: any order
        idx = self._index(nodes - self.row_base)
        merged, age = self.exp.algorithm.merge_models(
            self.params.index_select(0, idx), self.age[idx], received, received_age, spec=self.exp.spec)
        for m in msgs.tolist():
            self.receiver.pop(m, None)
        if train:
            age = age + self._local_update(merged, nodes).to(age.dtype)
        self.params.index_copy_(0, idx, merged)
        self.age[idx] = age

    def _local_update(self, rows: torch.Tensor, nodes: np.ndarray) -> torch.Tensor:
        """Train ``rows`` ``[B, P]`` in place (nodes without data keep theirs); returns which trained."""
        trained = torch.zeros(len(nodes), dtype=torch.bool, device=self.device)
        keys = self.updates[nodes]
        self.updates[nodes] += 1
        holders = np.flatnonzero(self.has_data[nodes])
        if not len(holders):
            return trained
        with self.timer("train_s"):
            if len(holders) == len(nodes):
                result = self.exp.trainer.train(rows, nodes, keys, inplace=True)
                if result.params is not rows:
                    rows.copy_(result.params)
            else:
                pick = self._index(holders)
                result = self.exp.trainer.train(rows.index_select(0, pick), nodes[holders], keys[holders],
                                                inplace=True)
                rows.index_copy_(0, pick, result.params)
        stepped = result.steps > 0                   # known on the host: no device read
        trained[self._index(holders)] = self._index(stepped)
        self.period_updates.append((nodes[holders], keys[holders], np.asarray(result.steps), result.loss))
        return trained

    def _close_period(self) -> None:
        """The period's ``train_loss``: the mean loss of the local updates that stepped in it,
        taken in (node, update) order in float64, so it does not depend on how the updates were
        batched into calls (or ranks); kept from the last period that trained if none did."""
        nodes, keys, steps, losses = self._period_records()
        self.period_updates = []
        self.node_steps += int(steps.sum())
        stepped = np.flatnonzero(steps > 0)
        if len(stepped):
            order = stepped[np.lexsort((keys[stepped], nodes[stepped]))]
            self.train_loss = losses[self._index(order)].double().mean()

    def _period_records(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
        """This period's local updates: (nodes, update keys, steps, losses on the device)."""
        done = self.period_updates
        if not done:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty, torch.zeros(0, device=self.device)
        return (np.concatenate([d[0] for d in done]), np.concatenate([d[1] for d in done]),
                np.concatenate([d[2] for d in done]), torch.cat([d[3] for d in done]))
