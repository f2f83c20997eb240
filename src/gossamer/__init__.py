"""Gossamer: federated and fully decentralized learning, simulated and deployed.

The Python API (docs/api.md), loaded on first use so that ``import gossamer`` stays cheap::

    import gossamer
    result = gossamer.run("examples/quickstart.yaml", overrides={"stop.rounds": 3})
    print(result.metrics[["round", "test_accuracy"]])
"""

__version__ = "0.1.0"

_API = ("run", "load_run", "load_config", "RunResult", "register_algorithm", "register_model",
        "register_dataset", "register_partitioner", "register_aggregator", "register_attack",
        "register_compressor", "register_topology", "register_tracker")
_ELSEWHERE = {"ConfigError": "gossamer.config", "ExperimentConfig": "gossamer.config",
              "UserError": "gossamer.errors", "PluginError": "gossamer.registry",
              "load_plugins": "gossamer.registry"}

__all__ = ["__version__", *_API, *_ELSEWHERE]


def __getattr__(name: str):
    import importlib

    if name in _API:
        module = "gossamer.api"
    elif name in _ELSEWHERE:
        module = _ELSEWHERE[name]
    else:
        raise AttributeError(f"module 'gossamer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
