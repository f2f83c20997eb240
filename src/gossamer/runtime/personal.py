"""Personalized FL on the coordinator: per-client test splits evaluated where the data is,
and the models a server personalizes (FedCAC).

A client's personal model (Ditto's ``v``, FedRep's head) lives in its process
(:class:`PersonalClient`, part of ``runtime/fl_client.py``'s client); FedCAC's next model per client is the server's
(``personalize``), so each FedCAC task carries the client's own row. After every round (and
before the first) the coordinator runs an evaluation phase: every reachable client with test
rows gets an ``EVAL`` task (with the model it needs: the global one for FedAvg and FedRep,
FedCAC's row, none for Ditto), evaluates its model on its own test rows (fine-tuned first
with ``eval.personal_finetune_steps``), and reports its number of correct predictions,
which must be a whole number within its test rows; the coordinator turns them into the
simulator's ``personal_*`` columns and ``clients.csv``. A client that does not report
within ``runtime.round_timeout_s`` is left out of that row.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from gossamer.algorithms.fl.fedpub import functional_embeddings, mask_parameters
from gossamer.metrics.runstore import atomic_write_text
from gossamer.runtime.codec import KIND_EVAL, WireError, state_hash
from gossamer.runtime.common import log
from gossamer.runtime.guard import Refused
from gossamer.training.evaluator import clients_table, personal_summary

PERSONAL_COLUMNS = ["personal_accuracy", "personal_median", "personal_worst10"]


class PersonalServer:
    """Mixed into the synchronous coordinator (``runtime/fl_server.py``)."""

    def _init_personal(self) -> None:
        exp, algo = self.exp, self.algorithm
        self.personal_rows: torch.Tensor | None = None      # FedCAC, FED-PUB: each client's rows
        if algo.personalized and algo.server_personalizes:
            self.personal_rows = algo.personal_init(exp.init_params.reshape(-1)).expand(exp.num_nodes, -1).clone()
        if algo.personalized and algo.uses_embeddings:    # FED-PUB: uploads carry an embedding
            self.proxy = exp.model.proxy_input(self.cfg.seed)
            self.mask_entries = mask_parameters(exp.spec)[1]
            width = functional_embeddings(exp.model, exp.spec, self.proxy, exp.init_params.reshape(1, -1)).shape[1]
            self.upload_numel += int(width)
        self.personal_row: dict[str, float] = {}
        self.personal_accuracy: np.ndarray | None = None
        if exp.personal is not None:
            self.columns = self.columns + PERSONAL_COLUMNS

    def _task_frames(self, node: int) -> tuple[list[bytes], bytes]:
        """The frames and hash of ``node``'s task model (lock held): the round's, or its own
        when the server personalizes (:meth:`_own_frames`)."""
        if self.personal_rows is None:
            return self.current.model_frames, self.current.model_hash
        return self._own_frames(node)

    def _own_frames(self, node: int) -> tuple[list[bytes], bytes]:
        """The task model of ``node`` when the server personalizes (lock held): the row it
        trains from, or in an evaluation phase the model it is judged with (FedCAC: its one
        row; FED-PUB: its next model, or its last trained one)."""
        cur = self.current
        if node not in cur.node_frames:
            rows, algo = self.personal_rows[node:node + 1], self.algorithm
            row = (algo.personal_model(self.state.params, rows, None) if cur.evaluating
                   else algo.train_start(rows))[0]
            frames = self._model_task_frames(row, cur.number)
            cur.node_frames[node] = (frames, state_hash(row))
        return cur.node_frames[node]

    def _personalize(self, r: int, nodes: list[int], uploads: torch.Tensor) -> None:
        """FedCAC, FED-PUB: the delivered clients' next rows from where they started and their
        uploads (trained models; FED-PUB: then embeddings), given the new global model."""
        models = uploads[:, : self.numel]
        if self.personal_rows is None:
            return
        spec, algo = self.exp.spec, self.algorithm
        idx = torch.as_tensor(nodes, dtype=torch.int64)
        layers = list(zip(spec.offsets, map(math.prod, spec.shapes), strict=True))
        extra = {}
        if algo.uses_embeddings:                  # FED-PUB: each upload's embedding follows its model
            extra = {"embeddings": uploads[:, self.numel:], "masks": self.mask_entries,
                     "trained": models}
        self.personal_rows[idx] = algo.personalize(algo.train_start(self.personal_rows[idx]), models,
                                                   self.state.params.reshape(-1), layers, r, **extra)

    def _accept_report(self, node: int, bound: int | None, meta: object, tensor: torch.Tensor,
                       size: int) -> None:
        """File a client's evaluation report of the current phase (lock held), or Refused."""
        cur = self.current
        if not cur.evaluating or meta.round != cur.number or node not in cur.open():
            raise Refused(f"evaluation report from {node} for round {meta.round} is not expected",
                          bound, strike=False)
        hits, rows = float(tensor[0]), int(self.exp.personal.targets[node])   # (graph: test nodes)
        if hits != math.floor(hits) or not 0 <= hits <= rows:
            raise Refused(f"node {node} reports {hits:g} correct predictions on {rows} test rows", bound)
        cur.received[node] = (tensor.reshape(1).clone(), 0)
        self.bytes_up += size
        self.lock.notify_all()

    def _personal_phase(self, r: int) -> None:
        """Every reachable client with test rows evaluates its model of round ``r``."""
        exp, algo = self.exp, self.algorithm
        if exp.personal is None:
            return
        with self.lock:
            nodes = {int(n) for n in self._candidates() if exp.personal.sizes[n] > 0}
            frames, digest = [], b""
            if self.personal_rows is None and (not algo.personalized or algo.evaluates_with_global):
                payload = self.state.params.reshape(-1)
                frames = self._model_task_frames(payload, r)
                digest = state_hash(payload)
            cur = self.current = type(self.current)(r, nodes, {}, frames, model_hash=digest,
                                                    opened=time.monotonic(), evaluating=True)
            self.lock.notify_all()
            self.lock.wait_for(lambda: not cur.open(), timeout=self.cfg.runtime.round_timeout_s)
            late = cur.open()
            self.stale |= late
            hits = {n: t for n, (t, _) in cur.received.items()}
            self.current = type(self.current)(r)
        if late:
            log.warning("round %d: %d clients sent no evaluation %s", r, len(late), sorted(late))
        ids = np.array(sorted(hits), dtype=np.int64)
        self.personal_row = {}
        if len(ids):
            acc = exp.personal.accuracy(torch.stack([hits[i][0] for i in ids]), ids).numpy()
            self.personal_accuracy = np.full(exp.num_nodes, np.nan)
            self.personal_accuracy[ids] = acc
            self.personal_row = personal_summary(acc)

    def _write_clients(self) -> None:
        if self.personal_accuracy is not None:
            atomic_write_text(self.run_dir / "clients.csv", clients_table(self.exp.personal.targets,
                                                                          self.personal_accuracy))


class PersonalClient:
    """A client's personal step and its evaluation on its own test rows (the FL client,
    ``runtime/fl_client.py``, mixes this class in)."""

    def _personal_step(self, round_: int, received: torch.Tensor) -> None:
        """This client's personal model takes the algorithm's personal steps (the simulator's
        ``SyncFLDriver._personal_step`` on one node: the same keys, so the same model)."""
        algo, exp, nodes = self.algorithm, self.exp, np.array([self.node])
        steps = None
        if algo.personal_epochs is not None:
            steps = algo.personal_epochs * -(-exp.trainer.sizes[nodes] // self.cfg.local.batch_size)
        start = algo.personal_start(received, self.personal.reshape(1, -1), self.head)
        objective = algo.personal_objective(received, self.head_names, exp.spec.names)
        result = exp.trainer.train(start.contiguous(), nodes, round_ + (1 << 42), steps=steps,
                                   objective=objective)
        self.personal = result.params[0].clone()

    def _evaluate_own(self, round_: int, attached: torch.Tensor | None) -> None:
        """Evaluate this client's model of ``round_`` on its own test rows (fine-tuned first
        with ``eval.personal_finetune_steps``) and report the correct predictions."""
        algo, exp, nodes = self.algorithm, self.exp, np.array([self.node])
        if self.personal is not None:
            current = self.personal if attached is None else attached.reshape(-1)
            params = algo.personal_model(current, self.personal.reshape(1, -1), self.head)
        elif attached is not None:
            params = attached.reshape(1, -1)
        else:
            raise WireError(f"the evaluation task of round {round_} carries no model")
        steps = self.cfg.eval.personal_finetune_steps
        if steps:
            params = exp.trainer.train(params.contiguous(), nodes, round_ + (1 << 43),
                                       steps=np.array([steps])).params
        self._send(exp.personal.hits(params, nodes), round_, KIND_EVAL)
