"""The one pattern table names, for every algorithm's pattern, a protocol and executors that
exist; the runtime's process tables are read from it."""

import importlib

from gossamer.algorithms import ALGORITHMS
from gossamer.protocols.patterns import PATTERNS


def _load(target):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def test_every_algorithm_pattern_has_a_protocol_and_a_simulator_executor():
    for name in ALGORITHMS.names():
        pattern = ALGORITHMS.get(name).pattern
        assert pattern in PATTERNS, name
    for entry in PATTERNS.values():
        importlib.import_module(entry.protocol)
        assert callable(_load(entry.simulator))
        assert (entry.runtime is None) == (entry.role is None)
        if entry.runtime is not None:
            assert callable(_load(entry.runtime))
        if entry.role == "coordinator":
            assert callable(_load(entry.client))


def test_the_runtime_tables_come_from_the_pattern_table():
    from gossamer.runtime import roles
    from gossamer.sim.drivers import driver_for

    assert set(roles.COORDINATORS) == {"sync_fl", "async_fl", "islands", "zo_fl", "experts", "coded"}
    assert roles.client_class("zo_fl").__name__ == "ZOClient"
    assert roles.client_class("experts").__name__ == "ExpertsClient"
    assert roles.client_class("coded").__name__ == "CodedClient"
    assert roles.client_class("islands").__name__ == "IslandsWorker"
    assert roles.client_class("sync_fl").__name__ == "Client"
    assert set(roles.PEER_ROLES) == {"sync_dl", "gradient_tracking", "async_gossip", "sampled_dl",
                                     "random_walk", "choco"}
    assert driver_for("zo_fl").__name__ == "ZOFLDriver"
