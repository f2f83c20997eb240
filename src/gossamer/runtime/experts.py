"""Isolated experts (``isolated_experts``, pattern ``experts``) on real processes: the executor
of ``protocols/experts.py``.

The synchronous coordinator's rounds (joins, quorum, deadlines, checkpoints, resume, hostile
uploads refused) with every node holding data training every round. A node's task carries its
island's expert and the router (one flat row, hashed); the client trains both from it on its
shard (the expert on its labels, the router on its island) and uploads them as one row. The
coordinator takes each island's sample-weighted mean of its nodes' experts and everyone's mean
of the router (``protocols.experts.group_means``); an island none of whose nodes delivered
keeps its expert. Evaluation is the simulator's (``protocols.experts.evaluate``), so with the
same config the metrics equal the simulator's round by round (tests/runtime/test_experts_runtime.py).
``model.pt`` holds island 0's expert, as the simulator's; the checkpoint holds every expert
and the router.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from gossamer.algorithms.fl.fedavg import ServerState
from gossamer.metrics.runstore import save_checkpoint, write_json
from gossamer.protocols import experts as protocol
from gossamer.runtime.codec import state_hash
from gossamer.runtime.fl_client import Client
from gossamer.runtime.fl_server import COLUMNS, Coordinator


class ExpertsCoordinator(Coordinator):
    """The server of ``isolated_experts``: an expert per island and a router, one row a task."""

    pattern = "experts"
    columns = COLUMNS + ["topk_accuracy", "best_expert_accuracy"]

    def _init_pipeline(self) -> None:
        super()._init_pipeline()
        algo, exp = self.algorithm, self.exp
        nodes, island = protocol.islands(exp, algo)
        self.island_of = dict(zip(nodes.tolist(), island.tolist(), strict=True))
        self.router_spec, self.router_init = None, torch.zeros(0)
        if algo.router:                                # (the clients train it; here: its layout)
            model, self.router_spec = protocol.router_model(exp, algo)
            self.router_init = self.router_spec.flatten(model)
        self.upload_numel = self.numel + self.router_init.numel()    # an expert and the router

    def _init_state(self) -> ServerState:
        experts = self.exp.init_params.reshape(-1).expand(self.algorithm.islands, -1)
        return ServerState(torch.cat([experts.reshape(-1), self.router_init]))

    def _models(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The experts ``[K, P]`` and the router (None without one), views of the state."""
        k, p = self.algorithm.islands, self.numel
        flat = self.state.params.reshape(-1)
        return flat[: k * p].view(k, p), (flat[k * p:] if self.router_spec is not None else None)

    def _row(self, island: int) -> torch.Tensor:
        experts, router = self._models()
        return experts[island] if router is None else torch.cat([experts[island], router])

    def _candidates(self) -> list[int]:
        return [c for c in super()._candidates() if c in self.island_of]     # nodes holding data

    def _payload(self) -> torch.Tensor:
        return self._row(0)

    def _task_frames(self, node: int) -> tuple[list[bytes], bytes]:
        """The frames and hash of ``node``'s island's row (lock held), made once a round."""
        cur, island = self.current, self.island_of[node]
        if island not in cur.node_frames:
            row = self._row(island)
            cur.node_frames[island] = (self._model_task_frames(row, cur.number), state_hash(row))
        return cur.node_frames[island]

    def _aggregate(self, r: int, received: dict[int, tuple[torch.Tensor, int]]) -> None:
        nodes = sorted(received)
        rows = torch.stack([received[i][0] for i in nodes])
        sizes = np.array([received[i][1] for i in nodes])
        group = np.array([self.island_of[i] for i in nodes], dtype=np.int64)
        k, p = self.algorithm.islands, self.numel
        experts, router = (m.clone() if m is not None else None for m in self._models())
        means = protocol.group_means(rows[:, :p], sizes, group, k)
        delivered = torch.from_numpy(np.bincount(group, minlength=k) > 0)
        experts[delivered] = means[delivered]
        parts = [experts.reshape(-1)]
        if router is not None:
            parts.append(protocol.group_means(rows[:, p:], sizes, np.zeros(len(nodes), dtype=np.int64), 1)[0])
        self.state = ServerState(torch.cat(parts), r, {})
        self.participants = len(nodes)

    def _evaluate(self, r: int, start: float) -> dict[str, Any]:
        experts, router = self._models()
        device = self.exp.device
        scores = protocol.evaluate(self.exp, self.algorithm, experts.to(device),
                                   None if router is None else router.to(device), self.router_spec)
        return {"round": r, "sim_time_s": self.elapsed_before + time.monotonic() - start,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "participants": getattr(self, "participants", 0), **scores}

    def _write(self, summary: dict[str, Any]) -> None:
        write_json(self.run_dir / "summary.json", summary)
        save_checkpoint(self.run_dir / "model.pt", {"params": self._models()[0][0].clone()}, keep_previous=False)


class ExpertsClient(Client):
    """An ``isolated_experts`` client: trains its island's expert and the router, one row up."""

    def __init__(self, cfg, node_id: int, server: str | None = None) -> None:
        super().__init__(cfg, node_id, server)
        algo, exp = self.algorithm, self.exp
        self.router_trainer = None
        if algo.router:
            nodes, island = protocol.islands(exp, algo)
            self.router_trainer, spec, _ = protocol.router_trainer(exp, algo, nodes, island, exp.device)
            self.download_numel = exp.spec.numel + spec.numel

    def _train_and_send(self, round_: int, start, steps: int = 0, expected: int = 0) -> None:
        self._die_if_asked(round_)
        p, nodes, start = self.exp.spec.numel, np.array([self.node]), start.reshape(-1)
        parts = [self.exp.trainer.train(start[:p].reshape(1, -1), nodes, round_).params[0]]
        if self.router_trainer is not None:
            parts.append(self.router_trainer.train(start[p:].reshape(1, -1), nodes, round_).params[0])
        self._send(torch.cat(parts), round_)
