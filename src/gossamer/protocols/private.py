"""The upload pipeline's client-level DP stages (:mod:`gossamer.protocols.upload`) and the
ledgers that account them: DP-FedAvg's two halves for synchronous rounds (:class:`ClientDP`),
the same per full buffer of a buffered asynchronous rule (:class:`BufferDP`: DP-FedBuff), and
the ledger a run's ``privacy.dp`` section asks for (:func:`build_ledger`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ClientDP:
    """DP-FedAvg (McMahan et al., ICLR 2018): each update clipped to ``clip_norm``; Gaussian
    noise of std ``z C`` on the sum, added by the server (``noise: server``) or shared among
    the ``expected`` clients (``noise: clients``); the sum divided by ``expected``."""

    clip_norm: float
    noise_multiplier: float
    noise: str
    seed: int

    def client(self, delta: torch.Tensor, clients: np.ndarray, round: int, expected: int, *,
               masked: bool = False) -> torch.Tensor:
        """Client side with ``noise: clients``: clip and add this client's noise share (with
        server noise the server clips what arrives, so a client cannot exceed the bound;
        ``masked``: the server will see only a secure sum, so the client clips either way)."""
        from gossamer.privacy.dp import TAG_CLIENT_SHARE, clip_rows, gaussian

        if self.noise != "clients":
            return clip_rows(delta, self.clip_norm) if masked else delta
        clipped = clip_rows(delta, self.clip_norm)
        std = self.noise_multiplier * self.clip_norm
        if std > 0:              # keyed (client, round), or (client, task key): ``round`` a row each
            keys = np.stack([np.asarray(clients, dtype=np.int64),
                             np.broadcast_to(np.asarray(round, dtype=np.int64), (len(clients),))], axis=1)
            clipped = clipped + gaussian(self.seed, TAG_CLIENT_SHARE, keys, clipped.shape[1], clipped.device) \
                * (std / np.sqrt(expected))
        return clipped

    def server(self, deltas: torch.Tensor, round: int, expected: int) -> torch.Tensor:
        """Server side on the delivered updates ``[k, P]``: ``(sum + noise) / expected`` ``[P]``.
        With server noise the server clips each arrived update first."""
        from gossamer.privacy.dp import clip_rows

        rows = deltas if self.noise == "clients" else clip_rows(deltas, self.clip_norm)
        return self.finish(rows.sum(0), round, expected)

    def finish(self, total: torch.Tensor, round: int, expected: int) -> torch.Tensor:
        """``(total + server noise) / expected`` from the sum of the clipped updates (with
        secure aggregation: the secure sum; the server adds its noise to what it learns)."""
        noise = self.server_noise(round, total.shape[0], total.device)
        return (total if noise is None else total + noise) / expected

    def server_noise(self, key: int, numel: int, device: torch.device) -> torch.Tensor | None:
        """The server's noise ``[numel]`` of std ``z C`` for the sum keyed ``key`` (a round, or
        an asynchronous server update's version); None with client noise or ``z C = 0``."""
        from gossamer.privacy.dp import TAG_SERVER, gaussian

        std = self.noise_multiplier * self.clip_norm
        if std <= 0 or self.noise != "server":
            return None
        return gaussian(self.seed, TAG_SERVER, np.array([[key]]), numel, device)[0] * std


@dataclass
class BufferDP:
    """Client-level DP of a buffered asynchronous rule (DP-FedBuff; FedBuff's paper, Nguyen et
    al. 2022, runs DP this way): each server update is DP-FedAvg's step over its buffer of ``K``
    updates, each clipped to ``C`` (by the server, or by the clients with ``noise: clients``,
    who add their noise shares of std ``z C / sqrt(K)``), noise of std ``z C`` on the buffer's
    sum (``noise: server``), divided by ``K``; the ledger counts each client's exposure
    (:class:`gossamer.privacy.BufferLedger`). A rule's staleness weights are at most 1, so a
    weighted update stays in the ball."""

    dp: ClientDP                       # its ``client`` is the clients' side, keyed by task
    ledger: object                     # gossamer.privacy.BufferLedger

    def server(self, messages: torch.Tensor, clients: np.ndarray, version: int
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One full buffer's updates ``[K, P]`` from ``clients`` for server update ``version``:
        the updates the rule sums (clipped here with server noise) and the noise to add to its
        sum (None with client noise); the ledger records the update."""
        from gossamer.privacy.dp import clip_rows

        self.ledger.update(clients)
        if self.dp.noise == "clients":
            return messages, None
        return clip_rows(messages, self.dp.clip_norm), self.dp.server_noise(version, messages.shape[1],
                                                                             messages.device)


def dp_secure_mean(dp: ClientDP, mean: np.ndarray, survivors: int, round: int, expected: int) -> torch.Tensor:
    """DP-FedAvg's step from secure aggregation's mean: with DP every member's weight is equal,
    so the survivors' sum is ``mean * survivors``; then ``(sum + server noise) / expected``."""
    return dp.finish(torch.from_numpy(mean * survivors).float(), round, expected)


def build_buffer_dp(cfg, pipe) -> BufferDP | None:          # pipe: protocols.upload.Pipeline
    """Client-level DP of a buffered asynchronous run (``privacy.dp.level: client``), or None."""
    dp = cfg.privacy.dp
    if pipe.dp is None:
        return None
    from gossamer.privacy import BufferLedger

    return BufferDP(pipe.dp, BufferLedger(dp.noise_multiplier, dp.delta, dp.accountant))


def build_ledger(cfg, numel: int, sizes, num_nodes: int):
    """The privacy ledger of ``privacy.dp`` (epsilon after each round), or None: RQM's exact
    RDP (:class:`gossamer.privacy.rqm.RQMLedger`) or an opacus accountant over the
    Gaussian mechanism's rounds or DP-SGD steps (:class:`gossamer.privacy.DPLedger`)."""
    dp = cfg.privacy.dp
    if dp is None:
        return None
    if dp.mechanism == "rqm":
        from gossamer.privacy.rqm import RQMLedger

        return RQMLedger(c=dp.clip_norm, extension=dp.extension, levels=dp.levels, q=dp.q,
                         coordinates=numel, delta=dp.delta, num_clients=num_nodes)
    from gossamer.privacy import DPLedger

    return DPLedger(dp.level, dp.noise_multiplier, dp.delta, dp.accountant, sizes, cfg.local.batch_size)
