"""Gossamer from Python: run a config, read the metrics table, plug in your own part.

    python examples/api/quickstart_api.py          (~10 s on a laptop CPU)

Each cell below works as is in a notebook. See docs/api.md.
"""

# %% Run a config: a path, a dict (the YAML sections) or an ExperimentConfig
import tempfile

import torch

import gossamer

config = {
    "name": "api-quickstart",
    "data": {"dataset": "digits"},                        # ships with scikit-learn: no download
    "partition": {"name": "dirichlet", "num_nodes": 20, "params": {"alpha": 0.5}},
    "model": {"name": "mlp", "params": {"hidden": [32]}},
    "algorithm": {"name": "fedavg", "params": {"client_fraction": 0.5}},
    "local": {"epochs": 2, "batch_size": 16, "lr": 0.2},
    "stop": {"rounds": 10},
    "output": {"dir": tempfile.mkdtemp(prefix="gossamer-api-"), "checkpoint_every": 5},
}
result = gossamer.run(config, overrides={"stop.rounds": 8})   # overrides work like --set

# %% The metrics: a pandas DataFrame of metrics.csv, one row per evaluation
print(result.metrics[["round", "sim_time_s", "bytes_up", "test_accuracy", "test_loss"]]
      .to_string(index=False))
print(f"final accuracy {result.summary['final_test_accuracy']:.4f}, "
      f"{result.summary['bytes_sent_total'] / 1e6:.2f} MB sent; run directory {result.run_dir}")


# %% Your own aggregation rule, selectable by name without editing the package
@gossamer.register_aggregator("api_coordinate_median", replace=True)   # replace: rerunnable cell
def coordinate_median(updates, weights=None, *, f=0):
    """[B, P] -> [P] (or [G, B, P] -> [G, P]): the median of every coordinate."""
    return updates.median(dim=-2).values


robust = gossamer.run(config, overrides={"stop.rounds": 8,
                                         "algorithm.params.aggregator": "api_coordinate_median"})
print(f"with api_coordinate_median: final accuracy {robust.summary['final_test_accuracy']:.4f}")

# %% A finished run read back later (e.g. from another notebook), and its final model
again = gossamer.load_run(result.run_dir)
model = again.model()
x = torch.zeros(1, 64)                                     # digits: 8x8 images, flattened
print(type(model).__name__, "logits shape", tuple(model(x).shape))
