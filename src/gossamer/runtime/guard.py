"""What a coordinator knows of its callers: who they are, how much they may hold, when to refuse.

DESIGN.md principle 6: a hostile authenticated participant can at worst be rejected. The
guard gives the coordinator three things:

- **Identity from the channel.** With node tokens (``runtime.security.node_tokens_dir``) or
  client certificates named ``node-<id>``, the node a call acts for is what the channel
  proves; a request that names another node is refused. Without either, the claimed id is
  all there is, and the coordinator warns at start.
- **Bounded streams.** A caller (a bound node id, else a connection) holds at most
  ``runtime.max_inflight_per_client`` calls at once, and every stream is cancelled after
  ``runtime.upload_timeout_s``, so stalled streams cannot take the worker threads honest
  clients need.
- **Strikes.** Every rejected message of a bound node counts; after
  ``runtime.max_rejections`` the node is refused for the rest of the run. Strikes are never
  counted against an id the channel did not prove, so a spoofer cannot get others banned.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from gossamer.runtime.common import log
from gossamer.runtime.security import SecurityConfig, caller_node


class Refused(Exception):
    """A call is refused; ``str()`` is the reason (safe to log and send back). ``node`` is the
    channel-proven id it is held against (None: nobody); ``strike``: it counts towards
    ``max_rejections``; ``fails`` (default: ``strike``): it ends the node's current task."""

    def __init__(self, reason: str, node: int | None = None, *, strike: bool = True,
                 fails: bool | None = None) -> None:
        super().__init__(reason)
        self.node, self.strike = node, strike
        self.fails = strike if fails is None else fails


class Busy(Refused):
    """The caller already holds as many calls as it may."""


class Watchdog:
    """One thread that cancels calls past their deadline (a timer thread per call would cost
    a thread start on every upload)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.heap: list[tuple[float, int, grpc.ServicerContext, dict[str, bool]]] = []
        self.count = 0
        self.thread: threading.Thread | None = None

    def watch(self, deadline: float, context: grpc.ServicerContext, state: dict[str, bool]) -> None:
        with self.cond:
            self.count += 1
            heapq.heappush(self.heap, (deadline, self.count, context, state))
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="gossamer-watchdog", daemon=True)
                self.thread.start()
            self.cond.notify()

    def _run(self) -> None:
        with self.cond:
            while True:
                now = time.monotonic()
                while self.heap and (self.heap[0][3]["done"] or self.heap[0][0] <= now):
                    _, _, context, state = heapq.heappop(self.heap)
                    if not state["done"]:
                        state["expired"] = True
                        context.cancel()
                self.cond.wait(self.heap[0][0] - now if self.heap else None)


class CallerGuard:
    def __init__(self, security: SecurityConfig, *, max_inflight: int, stream_timeout_s: float,
                 max_rejections: int) -> None:
        self.secret = security.node_secret()
        self.binds = security.binds_identity
        self.max_inflight, self.stream_timeout_s = max_inflight, stream_timeout_s
        self.max_rejections = max_rejections
        self.lock = threading.Lock()
        self.inflight: Counter[object] = Counter()
        self.strikes: Counter[int] = Counter()
        self.banned: set[int] = set()
        self.watchdog = Watchdog()
        if not self.binds:
            log.warning("node ids are not bound to the channel: any authenticated caller may act "
                        "as any node (set runtime.security.node_tokens_dir, or require client "
                        "certificates named node-<id>)")

    def bound(self, context: grpc.ServicerContext) -> int | None:
        """The node id the channel proves (None when nothing binds ids); refuses a caller that
        should be bound but is not, and a banned node."""
        if not self.binds:
            return None
        node = caller_node(context, self.secret)
        if node is None:
            raise Refused("the channel proves no node id (a client certificate must be named "
                          "node-<id>)", strike=False)
        if node in self.banned:
            raise Refused(f"node {node} is refused for this run after {self.max_rejections} "
                          "rejected messages", node, strike=False)
        return node

    def acting(self, context: grpc.ServicerContext, claimed: int) -> int:
        """The node a request naming ``claimed`` acts for: the proven id, which must equal it."""
        node = self.bound(context)
        if node is not None and node != claimed:
            raise Refused(f"node {node} may not act as node {claimed}", node)
        return claimed

    @contextmanager
    def stream(self, context: grpc.ServicerContext, key: object) -> Iterator[dict[str, bool]]:
        """Hold one of ``key``'s call slots while the body runs; the call is cancelled after
        ``stream_timeout_s`` (the yielded dict's ``expired`` says whether that happened)."""
        with self.lock:
            if self.inflight[key] >= self.max_inflight:
                raise Busy(f"{key} already has {self.max_inflight} calls in flight", strike=False)
            self.inflight[key] += 1
        state = {"expired": False, "done": False}
        self.watchdog.watch(time.monotonic() + self.stream_timeout_s, context, state)
        try:
            yield state
        finally:
            state["done"] = True
            with self.lock:
                self.inflight[key] -= 1
                if not self.inflight[key]:
                    del self.inflight[key]

    def strike(self, exc: Refused) -> bool:
        """Count a rejection against its proven node; True when that node is now refused."""
        if exc.node is None or not exc.strike:
            return False
        with self.lock:
            self.strikes[exc.node] += 1
            if self.strikes[exc.node] >= self.max_rejections and exc.node not in self.banned:
                self.banned.add(exc.node)
                log.warning("node %d refused for the rest of the run after %d rejected messages",
                            exc.node, self.strikes[exc.node])
                return True
        return False
