"""DL runs record every evaluated node's accuracy in nodes.csv (not in metrics.csv), and a
resumed run's record equals an uninterrupted one's."""

import csv

import gossamer
from tests.conftest import small_config


def _read(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_nodes_csv_holds_every_node_at_every_evaluation_and_resumes_exactly(tmp_path):
    cfg = small_config("dpsgd", stop={"rounds": 4})
    whole = gossamer.run(cfg, out=tmp_path / "whole")
    nodes, metrics = _read(whole.run_dir / "nodes.csv"), _read(whole.run_dir / "metrics.csv")
    assert "node" not in metrics[0] and len(nodes) == 8 * len(metrics)
    for row in metrics:                         # test_accuracy is the mean over the nodes
        accs = [float(n["test_accuracy"]) for n in nodes if n["round"] == row["round"]]
        assert sorted(int(n["node"]) for n in nodes if n["round"] == row["round"]) == list(range(8))
        assert abs(sum(accs) / len(accs) - float(row["test_accuracy"])) < 1e-6
        assert min(accs) == float(row["acc_min"]) and max(accs) == float(row["acc_max"])
    split = tmp_path / "split"
    gossamer.run(cfg, out=split, overrides={"stop.rounds": 2})
    gossamer.run(None, out=split, resume=True, overrides={"stop.rounds": 4})
    assert (split / "nodes.csv").read_bytes() == (whole.run_dir / "nodes.csv").read_bytes()
    assert (split / "metrics.csv").read_bytes() == (whole.run_dir / "metrics.csv").read_bytes()


def test_federated_runs_write_no_nodes_csv(tmp_path):
    result = gossamer.run(small_config("fedavg", stop={"rounds": 1}), out=tmp_path / "fl")
    assert not (result.run_dir / "nodes.csv").exists()
