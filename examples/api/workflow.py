"""A whole workflow from Python: run, sweep over seeds, and write one HTML report.

    python examples/api/workflow.py [OUT_DIR]      (~30 s on a 2-core CPU)

1. runs a decentralized config with crashes and a Byzantine node (gossamer.run);
2. sweeps a FedBuff config over two buffer sizes at two seeds (`gossamer sweep`, as a
   subprocess: each run in its own process, finished runs reused; it prints the mean ± 95% CI
   table, also in sweep.md);
3. writes report.html: the DL run and one seed of each sweep cell compared, each with its
   curves, client histograms, fault timeline and topology (docs/report.md). Open it in any
   browser; it needs no network.
"""

# %% Setup: a scratch folder (or the one given) and a tiny base config on scikit-learn digits
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

import gossamer
from gossamer.metrics.report import write_report

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="gossamer-workflow-"))
out.mkdir(parents=True, exist_ok=True)
base = {
    "data": {"dataset": "digits"},
    "partition": {"name": "dirichlet", "num_nodes": 16, "params": {"alpha": 1.0}},
    "model": {"name": "mlp", "params": {"hidden": [32]}},
    "local": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "output": {"progress": False, "checkpoint_every": 0},
}

# %% 1. A decentralized run: D-PSGD on a 4-regular graph, a quarter of the nodes crash, node 3 attacks
dl = gossamer.run({**base, "name": "dpsgd-faults", "algorithm": {"name": "dpsgd"},
                   "topology": {"name": "random_regular", "params": {"degree": 4}},
                   "faults": {"crash": {"fraction": 0.25, "at_s": {"dist": "uniform", "low": 0.5, "high": 3.0}}},
                   "adversary": {"attack": "sign_flip", "nodes": [3], "params": {"scale": 2.0}},
                   "stop": {"rounds": 20}, "output": {**base["output"], "dir": str(out / "dl")}})
print(f"D-PSGD with faults: final mean accuracy {dl.summary['final_test_accuracy']:.3f} ({dl.run_dir})")

# %% 2. A sweep: FedBuff, buffer size 2 and 4, seeds 0 and 1 (finished runs are reused on a rerun)
config = out / "fedbuff.yaml"
config.write_text(yaml.safe_dump({**base, "name": "fedbuff", "algorithm": {"name": "fedbuff"},
                                   "system": {"sample_time_s": {"dist": "lognormal", "median": 0.002, "sigma": 1.0}},
                                   "stop": {"rounds": 20}}))
subprocess.run([sys.executable, "-m", "gossamer", "sweep", str(config), "--grid",
                "algorithm.params.buffer_size=2,4", "--seeds", "2", "--targets", "0.5",
                "--out", str(out / "sweep")], check=True)

# %% 3. One report: the DL run and seed 0 of each sweep cell, overlaid and one section each
cells = sorted(p.parent for p in (out / "sweep").glob("*/seed=0/summary.json"))
report = out / "report.html"
write_report([Path(dl.run_dir), *cells], report)
print(f"wrote {report}")
