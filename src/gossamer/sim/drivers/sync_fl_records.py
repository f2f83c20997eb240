"""A synchronous FL run's summary, extra files and checkpoint state, for
:class:`~gossamer.sim.drivers.sync_fl.SyncFLDriver`. A part of the driver, in its own file."""

from __future__ import annotations

from typing import Any

import torch

from gossamer.algorithms.fl.fedavg import ServerState
from gossamer.sim.drivers.base import _to_tensor
from gossamer.training.evaluator import clients_table


class SyncFLRecords:
    """:class:`SyncFLDriver`'s summary, files and ``state_dict`` (it mixes this class in,
    before :class:`~gossamer.sim.drivers.base.Driver`, whose state it extends)."""

    def summary(self) -> dict[str, Any]:
        out = self.accounting.summary()
        if self.client_state is not None:             # the per-client state store (population/store.py)
            store = self.client_state
            out["client_state"] = {"clients": len(store), "memory_bytes": store.memory_bytes,
                                   "disk_bytes": store.disk_bytes}
        if self.dp_ledger is not None:
            out.update(dp_epsilon=self.dp_ledger.epsilon(), dp_delta=self.dp.delta)
        if self.secagg is not None:
            out.update(secagg_aborted_rounds=self.secagg_aborted, secagg_clipped=self.secagg_clipped)
        if self.exp.contribution is not None:
            adv = self.exp.adversary
            out["contribution"] = self.exp.contribution.summary(adv.flagged, adv.kinds)
        if self.exp.hierarchy is not None:
            out["hierarchy"] = {"levels": [len(p) for p in self.exp.hierarchy.parents],
                                "bytes_up_by_tier": [int(b) for b in self.tiers_up],
                                "bytes_down_by_tier": [int(b) for b in self.tiers_down],
                                "clients_cut_off": self.cut_off,
                                **({"clients_rehomed": self.rehomed} if self.exp.cfg.hierarchy.rehome else {}),
                                **({"extra_instances": self.instances}
                                   if self.exp.cfg.hierarchy.clients_per_instance is not None else {})}
        return out

    def extra_files(self) -> dict[str, str]:
        files = {}
        if self.exp.contribution is not None:
            files["contributions.csv"] = self.exp.contribution.table(self.exp.adversary.flagged)
        if self.personal_accuracy is not None:          # each client's own test accuracy
            files["clients.csv"] = clients_table(self.exp.personal.targets, self.personal_accuracy)
        return files

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(params=self.state.params, server_round=self.state.round,
                     server_extra=dict(self.state.extra), participants=self.participants,
                     lost=self.lost, dropped=self.dropped,
                     client_state=None if self.client_state is None else self.client_state.state_dict(),
                     compression_memory=_clone(self.stage_state.get("memory")),
                     compression_momentum=_clone(self.stage_state.get("momentum")),
                     client_estimates=None if self.estimate is None else self.estimate.clone(),
                     accounting=_to_tensor(self.accounting.state_dict()))
        if self.dp_ledger is not None:
            state["dp_ledger"] = self.dp_ledger.state_dict()
        if self.secagg is not None:
            state.update(secagg_aborted=self.secagg_aborted, secagg_clipped=self.secagg_clipped)
        if self.exp.contribution is not None:
            state["contribution"] = self.exp.contribution.state_dict()
        if self.exp.hierarchy is not None:
            state.update(tiers_up=torch.from_numpy(self.tiers_up.copy()),
                         tiers_down=torch.from_numpy(self.tiers_down.copy()), cut_off=self.cut_off,
                         rehomed=self.rehomed, instances=self.instances)
        if self.personal is not None:
            state["personal"] = self.personal.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        dev = self.device          # checkpoints load on the host (metrics/runstore.py)
        self.state = ServerState(state["params"].to(dev), int(state["server_round"]),
                                 {k: v.to(dev) if isinstance(v, torch.Tensor) else v
                                  for k, v in state["server_extra"].items()})
        self.participants = int(state["participants"])
        self.lost = int(state.get("lost", 0))
        self.dropped = int(state.get("dropped", 0))
        if state.get("accounting") is not None:
            self.accounting.load_state_dict(state["accounting"])
        if state.get("client_state") is not None and self.client_state is not None:
            saved = state["client_state"]
            if isinstance(saved, torch.Tensor):     # a checkpoint of every client's row [N, P]
                saved = {"ids": torch.arange(len(saved)), "rows": saved}
            self.client_state.load_state_dict(saved)
        for key in ("memory", "momentum"):
            if state.get(f"compression_{key}") is not None:
                self.stage_state[key] = state[f"compression_{key}"].to(dev, copy=True)
        if state.get("client_estimates") is not None:
            self.estimate = state["client_estimates"].to(dev, copy=True)
        if self.dp_ledger is not None and state.get("dp_ledger") is not None:
            self.dp_ledger.load_state_dict(state["dp_ledger"])
        self.secagg_aborted = int(state.get("secagg_aborted", 0))
        self.secagg_clipped = int(state.get("secagg_clipped", 0))
        if self.exp.contribution is not None and state.get("contribution") is not None:
            self.exp.contribution.load_state_dict(state["contribution"])
        if self.personal is not None and state.get("personal") is not None:
            self.personal = state["personal"].to(dev, copy=True)
        if self.exp.hierarchy is not None and state.get("tiers_up") is not None:
            self.tiers_up, self.tiers_down = state["tiers_up"].numpy().copy(), state["tiers_down"].numpy().copy()
            self.cut_off = int(state.get("cut_off", 0))
            self.rehomed = int(state.get("rehomed", 0))
            self.instances = int(state.get("instances", 0))


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()
