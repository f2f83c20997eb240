"""The simulator's experiment: the shared parts (:func:`gossamer.experiment.build`) plus what
only a simulation has: the clock's device and network profiles, availability and the fault
schedule."""

from __future__ import annotations

import dataclasses

import numpy as np

from gossamer.config import ConfigError, ExperimentConfig
from gossamer.experiment import Experiment, build
from gossamer.sim.faults import Faults
from gossamer.sim.system import Availability, SystemProfile

__all__ = ["Experiment", "build_experiment"]


def build_experiment(cfg: ExperimentConfig, *, population: bool = True) -> Experiment:
    """Build and check every part of a simulated run. ``population``: the caller will hold
    the simulator's ``[N, P]`` model buffers, so a population that cannot fit in memory is
    refused before anything is allocated."""
    exp = build(cfg, population=population)
    n = exp.num_nodes
    if exp.population is not None:          # registered: profiles drawn when clients act
        from gossamer.population.profiles import lazy_profile

        factor = 2.0 if exp.trainer.optimizer.sam_rho else 1.0
        exp.system = lazy_profile(cfg.system, cfg.seed, factor)
        exp.availability = Availability("always", n, cfg.seed)
        exp.faults = Faults.from_config(cfg, 0, degrees=None, has_data=np.zeros(0, dtype=bool))
        return exp
    if exp.algorithm.family == "dl":
        for field in ("latency_up_s", "latency_down_s"):
            if getattr(cfg.system, field) is not None:
                raise ConfigError(f"system.{field}", "decentralized algorithms send peer to peer "
                                  "with one latency per node: set system.latency_s")
    system = SystemProfile.from_config(cfg.system, n, cfg.seed)
    if exp.trainer is not None and exp.trainer.optimizer.sam_rho:   # SAM: two gradients a step
        system = dataclasses.replace(system, sample_time_s=2 * system.sample_time_s)
    exp.system, exp.availability = system, Availability.from_config(cfg.system, n, cfg.seed)
    degrees = exp.topology.degrees() if exp.topology is not None else None
    has_data = exp.trainer.sizes > 0 if exp.trainer is not None else np.ones(n, dtype=bool)  # grank
    exp.faults = Faults.from_config(cfg, n, degrees=degrees, has_data=has_data)
    return exp
