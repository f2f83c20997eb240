"""An asynchronous FL run's in-flight task records, metrics rows, summary and checkpoint state,
for :class:`~gossamer.sim.drivers.async_fl.AsyncFLDriver`. A part of the driver, in its own file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gossamer.protocols.async_fl import Task


@dataclass
class SimTask:
    """The simulator's side of a protocol :class:`Task`: its fault-message key, when it ends,
    what becomes of its messages, its start row until trained, then its upload."""

    task_id: int
    plan: Task
    end_s: float
    received: bool                   # the download arrived
    delivered: bool                  # the upload will arrive
    samples: int
    steps: int                       # local steps it trains (0: the local schedule)
    start: torch.Tensor | None = None
    message: torch.Tensor | None = None
    loss: float = 0.0
    trained_steps: int = 0

    @property
    def trained(self) -> bool:
        return self.message is not None


class AsyncFLRecords:
    """:class:`AsyncFLDriver`'s rows, summary and ``state_dict`` (it mixes this class in,
    before :class:`~gossamer.sim.drivers.base.Driver`, whose state it extends)."""

    # --- reporting -----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        p = self.protocol
        with self.timer("eval_s"):
            acc, loss = self.exp.evaluator.evaluate(self.state.params.reshape(1, -1))
        row = self.base_row()
        row.update(test_accuracy=float(acc[0]), test_loss=float(loss[0]), updates=self.state.version,
                   mean_staleness=p.last_staleness, in_flight=len(self._live), accepted=p.accepted,
                   discarded=self.acct.discarded, lost_messages=p.lost_tasks)
        if p.private is not None:                    # DP-FedBuff: the most exposed client's
            row["epsilon"] = p.private.ledger.epsilon()
        return row

    def global_params(self) -> torch.Tensor:
        return self.state.params

    def summary(self) -> dict[str, Any]:
        out = self.acct.summary()
        out.update(server_updates=self.state.version, accepted_updates=self.protocol.accepted,
                   lost_messages=self.protocol.lost_tasks, concurrency=self.protocol.concurrency,
                   max_in_flight=self.max_in_flight)
        if self.protocol.private is not None:
            out.update(dp_epsilon=self.protocol.private.ledger.epsilon(), dp_delta=self.exp.cfg.privacy.dp.delta)
        if self.registered:
            ids, steps = self.client_steps.written()
            out["mean_local_steps_per_participant"] = float(steps.mean()) if len(ids) else 0.0
        else:
            out["local_steps_per_client"] = self.client_steps.tolist()
        models = self.algorithm.num_models
        if models > 1:                                  # FedAST: every model's final accuracy
            rows = torch.stack([self.algorithm.model_params(self.state, m) for m in range(models)])
            out["model_test_accuracy"] = [float(a) for a in self.exp.evaluator.evaluate(rows)[0]]
        return out

    def _placed(self, protocol: dict[str, Any]) -> dict[str, Any]:
        """The protocol's checkpoint with its models on the run's device: the global model, the
        buffered uploads and the server state's model-sized tensors (FedAST's models, the
        anarchic memory: the model's dtype and width); its bookkeeping stays on the host."""
        params, dev = protocol["params"], self.device
        model_sized = lambda v: (isinstance(v, torch.Tensor) and v.dtype == params.dtype   # noqa: E731
                                 and v.dim() > 0 and v.shape[-1] == params.numel())
        extra = {k: v.to(dev) if model_sized(v) else v for k, v in protocol["server_extra"].items()}
        return {**protocol, "params": params.to(dev), "messages": protocol["messages"].to(dev),
                "server_extra": extra}

    # --- checkpoints: the protocol, and the in-flight tasks with start rows or uploads ----------
    def state_dict(self) -> dict[str, Any]:
        starts = {(x.plan.model, x.plan.version): x.start for x in self.tasks if x.start is not None}
        trained = [x.message for x in self.tasks if x.trained]
        state = super().state_dict()
        state.update(protocol=self.protocol.state_dict(), start_keys=sorted(starts),
                     start_models=torch.stack([starts[k] for k in sorted(starts)]) if starts else torch.zeros(0, device="cpu"),
                     tasks=[(x.task_id, x.plan.client, x.end_s, x.received, x.delivered, x.samples, x.steps,
                             x.loss, x.trained_steps, x.trained) for x in self.tasks],
                     messages=torch.stack(trained) if trained else torch.zeros(0, device="cpu"),
                     counters=[self.next_task, self.dispatch_open, self.max_in_flight],
                     stage_state={k: v.cpu() for k, v in self.stage_state.items()},
                     client_steps=(self.client_steps.state_dict() if self.registered
                                   else torch.from_numpy(self.client_steps.copy())))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.protocol.load_state_dict(self._placed(state["protocol"]))
        dev = self.device               # checkpoints load on the host (metrics/runstore.py)
        starts = dict(zip(map(tuple, state["start_keys"]), state["start_models"].to(dev), strict=True))
        messages, tasks = iter(state["messages"].to(dev)), []
        for task_id, client, end_s, received, delivered, samples, steps, loss, trained_steps, trained in state["tasks"]:
            task = SimTask(task_id, self.protocol.tasks[client], end_s, received, delivered, samples, steps,
                           loss=loss, trained_steps=trained_steps)
            if trained:
                task.message = next(messages).clone()
            elif delivered:
                task.start = starts[(task.plan.model, task.plan.version)]
            tasks.append(task)
        self.tasks = tasks
        self.next_task, self.dispatch_open, self.max_in_flight = state["counters"]
        for k, v in state.get("stage_state", {}).items():
            self.stage_state[k] = v.to(self.device)
        if self.registered:
            self.client_steps.load_state_dict(state["client_steps"])
        else:
            self.client_steps = state["client_steps"].numpy().copy()
