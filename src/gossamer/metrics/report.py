"""``gossamer report``: one self-contained HTML page per set of run directories.

Figures are matplotlib SVGs inlined in the page (text kept as text), so the file opens with no
network access and no JavaScript library; a ten-line inline script only marks, for tests and
readers, how many figures the browser laid out. Each run gets: accuracy and loss against
round, simulated time and bytes; the per-node accuracy distribution over time (DL: quantile
bands of every evaluated node's accuracy from ``nodes.csv``, within the min-max band of
``metrics.csv``); personalized FL's per-client accuracy (mean, median and worst 10% against
round, and the clients' last accuracies from ``clients.csv``); per-client
participation, staleness and idle-time histograms (FL accounting in ``summary.json``); a fault
timeline (``faults.csv`` transitions, configured partitions, Byzantine nodes); the topology
rebuilt from the config with each node coloured by its final state; the config and the
summary. Several runs also get a comparison section with the curves overlaid.

``watch`` re-renders every few seconds until every run has its ``summary.json`` (or a
timeout), the page refreshing itself meanwhile.
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gossamer.errors import UserError
from gossamer.metrics.plot import read_metrics
from gossamer.metrics.runstore import atomic_write_text

MAX_TOPOLOGY_NODES = 500
MAX_TIMELINE_NODES = 200
CURVE_AXES = [("round", "round"), ("sim_time_s", "simulated time (s)"), ("bytes", "MB sent and received")]
STATE_COLORS = {"up": "#4c72b0", "down": "#d62728", "byzantine": "#8c2bb0", "removed": "#7f7f7f"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1240px;
padding:16px 24px;color:#222;background:#fff}
h1{font-size:1.6em;margin:.2em 0} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:1.6em}
h3{margin:1.1em 0 .4em} .meta{color:#666;font-size:.9em}
.watch{background:#fff3cd;border:1px solid #e0c36a;padding:6px 10px;border-radius:4px}
figure.fig{margin:8px 0;padding:0} figure.fig svg{max-width:100%;height:auto}
figcaption{color:#555;font-size:.85em}
table{border-collapse:collapse;font-size:.9em;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right} th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:8px;overflow:auto;max-height:480px;font-size:.82em}
details summary{cursor:pointer;font-weight:600;margin:6px 0}
.note{color:#666;font-style:italic;font-size:.9em} .scroll{overflow-x:auto} nav a{margin-right:12px}
"""

# Marks every figure the browser laid out (non-zero box); the body then carries the counts.
CHECK_JS = """
(function(){var figs=document.querySelectorAll('figure.fig'),ok=0;
for(var i=0;i<figs.length;i++){var s=figs[i].querySelector('svg');
if(s){var r=s.getBoundingClientRect();if(r.width>0&&r.height>0){ok++;figs[i].setAttribute('data-rendered','1');}}}
document.body.setAttribute('data-figures',figs.length);document.body.setAttribute('data-rendered',ok);})();
"""


# --- reading a run directory ------------------------------------------------------------------
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _node_quantiles(path: Path) -> dict[int, list[float]] | None:
    """Round -> the 10/25/50/75/90% quantiles of every evaluated node's accuracy (nodes.csv)."""
    if not path.exists():
        return None
    by_round: dict[int, list[float]] = {}
    try:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                by_round.setdefault(int(row["round"]), []).append(float(row["test_accuracy"]))
    except (OSError, ValueError, KeyError):
        return None
    return {r: [float(q) for q in np.quantile(v, QUANTILES)] for r, v in by_round.items()} or None


def _client_accuracy(path: Path) -> list[float] | None:
    """Each client's accuracy on its own test rows from ``clients.csv`` (None: no file)."""
    if not path.exists():
        return None
    with path.open(newline="") as f:
        values = [float(row["accuracy"]) for row in csv.DictReader(f) if row.get("accuracy")]
    return [v for v in values if not math.isnan(v)]


class Run:
    """What the report reads from one run directory (missing pieces are None)."""

    def __init__(self, run_dir: Path, *, partial: bool = False):
        self.dir = run_dir
        self.name = run_dir.name
        if not run_dir.is_dir():
            raise UserError(f"RUN_DIR: {run_dir} is not a directory")
        self.metrics: dict[str, list[float]] | None = None
        if (run_dir / "metrics.csv").exists() or not partial:
            self.metrics = read_metrics(run_dir)            # UserError when absent
            if not self.metrics.get("round"):
                if not partial:
                    raise UserError(f"RUN_DIR: {run_dir}/metrics.csv has no rows")
                self.metrics = None
        self.summary: dict[str, Any] | None = _read_json(run_dir / "summary.json")
        self.config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else None
        self.config: dict[str, Any] = (yaml.safe_load(self.config_text) or {}) if self.config_text else {}
        self.faults = _read_faults(run_dir / "faults.csv")
        self.node_quantiles = _node_quantiles(run_dir / "nodes.csv")
        self.client_accuracy = _client_accuracy(run_dir / "clients.csv")

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def algorithm(self) -> str:
        return str((self.summary or {}).get("algorithm") or self.config.get("algorithm", {}).get("name", "?"))

    @property
    def num_nodes(self) -> int | None:
        n = (self.summary or {}).get("num_nodes") or self.config.get("partition", {}).get("num_nodes")
        return int(n) if n else None

    @property
    def byzantine(self) -> list[int]:
        return [int(i) for i in (self.summary or {}).get("byzantine_nodes") or []]

    def column(self, key: str) -> list[float]:
        cols = self.metrics or {}
        if key == "bytes":
            return [(u + d) / 1e6 for u, d in zip(cols.get("bytes_up", []), cols.get("bytes_down", []), strict=True)]
        return cols.get(key, [])

    def has(self, key: str) -> bool:
        return any(not math.isnan(v) for v in self.column(key))


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg})") from None


def _read_faults(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                rows.append({"t_s": float(row["t_s"]), "node": int(row["node"]), "kind": row["kind"],
                             "state": row["state"]})
            except (KeyError, TypeError, ValueError):
                continue                                     # a row being written (watch mode)
    return rows


# --- figures ------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _svg(fig, name: str, caption: str = "") -> str:
    plt = _plt()
    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "gossamer"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]                          # drop the XML prologue and doctype
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure class="fig" data-figure="{html.escape(name)}">{text}{cap}</figure>'


def _curves(runs: list[Run], name: str) -> str:
    """Test accuracy (top) and test loss (bottom) against round, simulated time and bytes."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.4), squeeze=False)
    for row, (metric, label) in enumerate([("test_accuracy", "test accuracy"), ("test_loss", "test loss")]):
        for col, (key, xlabel) in enumerate(CURVE_AXES):
            ax = axes[row][col]
            for i, run in enumerate(runs):
                x, y = run.column(key), run.column(metric)
                pts = [(a, b) for a, b in zip(x, y, strict=True) if not math.isnan(b)]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=".", color=f"C{i}", label=run.name)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _svg(fig, name, "accuracy and loss of the global model (FL) or the mean over nodes (DL)")


def _personal_figure(run: Run) -> str:
    """Personalized FL: each client's accuracy on its own test split (mean, median, worst 10%
    of clients) against round, beside the global model's; the clients' last accuracies."""
    plt = _plt()
    hist = run.client_accuracy is not None and len(run.client_accuracy) > 0
    fig, axes = plt.subplots(1, 2 if hist else 1, figsize=(13 if hist else 6.5, 3.8), squeeze=False)
    ax = axes[0][0]
    rounds = run.column("round")
    for i, (key, label) in enumerate([("personal_accuracy", "mean over clients"),
                                      ("personal_median", "median client"),
                                      ("personal_worst10", "worst 10% of clients"),
                                      ("test_accuracy", "global model, shared test set")]):
        pts = [(a, b) for a, b in zip(rounds, run.column(key), strict=True) if not math.isnan(b)]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", color=f"C{i}", label=label,
                    linestyle="--" if key == "test_accuracy" else "-")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if hist:
        ax = axes[0][1]
        ax.hist(run.client_accuracy, bins=min(20, max(5, len(run.client_accuracy) // 2)), color="C0")
        ax.set_xlabel("a client's accuracy on its own test split (last evaluation, clients.csv)")
        ax.set_ylabel("clients")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _svg(fig, f"{run.name}:personal", "personalized FL: every client judged on its own test rows")


def _dl_figure(run: Run) -> str:
    """Per-node accuracy distribution against round and time, and the consensus distance."""
    plt = _plt()
    consensus = run.has("consensus_distance")
    fig, axes = plt.subplots(1, 3 if consensus else 2, figsize=(13, 3.8), squeeze=False)
    q = run.node_quantiles
    rounds = run.column("round")
    for ax, key, xlabel in [(axes[0][0], "round", "round"), (axes[0][-1], "sim_time_s", "simulated time (s)")]:
        x = run.column(key)
        ax.fill_between(x, run.column("acc_min"), run.column("acc_max"), color="C0", alpha=0.15,
                        label="min-max over nodes")
        if q is not None:                                  # the distribution, from nodes.csv
            at = [(xi, q[int(r)]) for xi, r in zip(x, rounds, strict=True) if int(r) in q]
            xs, qs = [a for a, _ in at], np.array([b for _, b in at])
            ax.fill_between(xs, qs[:, 0], qs[:, 4], color="C0", alpha=0.25, label="10-90% of nodes")
            ax.fill_between(xs, qs[:, 1], qs[:, 3], color="C0", alpha=0.35, label="25-75% of nodes")
        ax.plot(x, run.column("acc_median"), color="C0", marker=".", label="median node")
        if run.has("avg_model_accuracy"):
            ax.plot(x, run.column("avg_model_accuracy"), color="C1", linestyle="--", label="averaged model")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"per-node accuracy distribution against {xlabel}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if consensus:
        ax = axes[0][1]
        dist = [v if v > 0 else float("nan") for v in run.column("consensus_distance")]
        ax.plot(run.column("round"), dist, color="C2", marker=".")
        ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.set_title("consensus distance (1/N) Σ‖x_i − x̄‖²", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    bands = ("light band: min to max accuracy over the evaluated nodes at each evaluation; darker "
             "bands: 10-90% and 25-75% of the nodes (nodes.csv)" if q is not None else
             "band: min to max accuracy over the evaluated nodes at each evaluation (metrics.csv "
             "acc_min/acc_max)")
    return _svg(fig, f"{run.name}:nodes", f"{bands}; line: median node")


def _fl_figure(run: Run) -> str | None:
    """Participation per client, staleness histogram and client idle-time histogram."""
    s = run.summary or {}
    if "participation" not in s:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    part = s["participation"]
    byz = set(run.byzantine)
    axes[0].bar(range(len(part)), part, width=1.0 if len(part) > 60 else 0.8,
                color=[STATE_COLORS["byzantine"] if i in byz else "C0" for i in range(len(part))])
    axes[0].set_xlabel("client")
    axes[0].set_ylabel("updates used")
    axes[0].set_title(f"participation per client (mean {sum(part) / max(len(part), 1):.1f})", fontsize=10)
    hist = {int(k): v for k, v in (s.get("staleness_histogram") or {}).items()}
    if hist:
        axes[1].bar(list(hist), list(hist.values()), color="C1")
    axes[1].set_xlabel("staleness (server versions)")
    axes[1].set_ylabel("updates")
    axes[1].set_title(f"staleness (mean {s.get('mean_staleness', 0.0):.2f}, discarded "
                      f"{s.get('discarded_stale', 0)})", fontsize=10)
    idle = s.get("client_idle_s") or []
    if idle:
        axes[2].hist(idle, bins=min(30, max(5, len(idle) // 2)), color="C2")
    axes[2].set_xlabel("idle time per client (simulated s)")
    axes[2].set_ylabel("clients")
    axes[2].set_title(f"client idle time (server idle {s.get('server_idle_s', 0.0):.2f} s)", fontsize=10)
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _svg(fig, f"{run.name}:clients", "from summary.json (FL accounting)")


def _final_states(run: Run) -> dict[int, str]:
    """Each node's state at the end of the run: down (crashed, churned out), removed, byzantine."""
    states: dict[int, str] = {}
    for row in run.faults:
        states[row["node"]] = "up" if row["state"] == "up" else ("removed" if row["kind"] == "remove" else "down")
    for node in run.byzantine:
        if states.get(node, "up") == "up":
            states[node] = "byzantine"
    return {k: v for k, v in states.items() if v != "up"}


def _partitions(run: Run) -> list[tuple[float, float | None]]:
    faults = run.config.get("faults") or {}
    return [(float(p.get("at_s", 0.0)), p.get("heal_s")) for p in faults.get("partitions") or []]


def _timeline(run: Run) -> tuple[str | None, str]:
    """Per-node up/down bars over simulated time; partitions shaded; Byzantine nodes in purple."""
    parts, byz = _partitions(run), set(run.byzantine)
    if not run.faults and not parts and not byz:
        return None, ""
    end = max([run.column("sim_time_s")[-1] if run.metrics else 0.0] + [r["t_s"] for r in run.faults]) or 1.0
    nodes = sorted({r["node"] for r in run.faults} | byz)
    note = ""
    if len(nodes) > MAX_TIMELINE_NODES:
        note = f"{len(nodes)} nodes have a fault or are Byzantine; the first {MAX_TIMELINE_NODES} are drawn."
        nodes = nodes[:MAX_TIMELINE_NODES]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(13, min(1.6 + 0.22 * len(nodes), 9)))
    by_node: dict[int, list[dict[str, Any]]] = {}
    for r in run.faults:
        by_node.setdefault(r["node"], []).append(r)
    for y, node in enumerate(nodes):
        up_color = STATE_COLORS["byzantine"] if node in byz else STATE_COLORS["up"]
        t, state = 0.0, "up"
        for r in sorted(by_node.get(node, []), key=lambda r: r["t_s"]):
            ax.barh(y, r["t_s"] - t, left=t, color=up_color if state == "up" else STATE_COLORS["down"], height=0.7)
            t, state = r["t_s"], r["state"]
            if state == "down":
                ax.plot([t], [y], marker="x", color="k", markersize=5)
        ax.barh(y, end - t, left=t, color=up_color if state == "up" else STATE_COLORS["down"], height=0.7)
    for at, heal in parts:
        ax.axvspan(at, end if heal is None else float(heal), color="orange", alpha=0.2)
        ax.text(at, len(nodes) - 0.4 if nodes else 0.5, " partition", fontsize=8, va="bottom", color="#a05a00")
    ax.set_yticks(range(len(nodes)))
    ax.set_yticklabels([f"node {n}" + (" (Byzantine)" if n in byz else "") for n in nodes], fontsize=7)
    ax.set_ylim(-0.8, max(len(nodes), 1) + 0.2)
    ax.set_xlim(0, end)
    ax.set_xlabel("simulated time (s)")
    from matplotlib.patches import Patch
    handles = [Patch(color=STATE_COLORS["up"], label="up"), Patch(color=STATE_COLORS["down"], label="down")]
    if byz:
        handles.append(Patch(color=STATE_COLORS["byzantine"], label="Byzantine (up)"))
    if parts:
        handles.append(Patch(color="orange", alpha=0.2, label="network partition"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("fault timeline (nodes with a fault transition or Byzantine; the others stay up)", fontsize=10)
    fig.tight_layout()
    return _svg(fig, f"{run.name}:faults", "from faults.csv (every crash, churn and event transition), "
                "the config's partitions and summary.json byzantine_nodes"), note


def _topology(run: Run) -> tuple[str | None, str]:
    """The graph rebuilt from the config (DL) or the star of server and clients (FL)."""
    import networkx as nx
    import numpy as np

    n = run.num_nodes
    if not n:
        return None, "no node count in the config"
    if n > MAX_TOPOLOGY_NODES:
        return None, f"{n} nodes: the topology is drawn up to {MAX_TOPOLOGY_NODES} nodes."
    topo_cfg = run.config.get("topology")
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    title = ""
    if topo_cfg:
        try:
            from gossamer.topology import make_dynamic, make_topology, union_links

            seed, params = int(run.config.get("seed", 0)), topo_cfg.get("params") or {}
            dynamic = make_dynamic(topo_cfg["name"], n, seed, topo_cfg.get("resample", "never"), **params)
            if dynamic is not None:
                edges = union_links(dynamic).undirected().edges
                title = f"{topo_cfg['name']} (union of the first {dynamic.window} rounds)"
            else:
                edges = make_topology(topo_cfg["name"], n, seed, **params).edges
                title = topo_cfg["name"]
        except Exception as exc:                          # noqa: BLE001 (a figure, not the run)
            return None, f"topology not rebuilt: {exc}"
        graph.add_edges_from(np.asarray(edges).tolist())
        pos = (nx.circular_layout(graph) if topo_cfg["name"] in ("ring", "complete")
               else nx.spring_layout(graph, seed=0, iterations=60))
        nodes = list(range(n))
    else:
        graph.add_node("server")
        graph.add_edges_from(("server", i) for i in range(n))
        pos = nx.circular_layout(range(n))
        pos["server"] = np.zeros(2)
        title = "server and clients"
        nodes = list(range(n))
    states = _final_states(run)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    size = max(12, min(220, 9000 / n))
    nx.draw_networkx_edges(graph, pos, ax=ax, alpha=0.35 if n < 100 else 0.15, width=0.8)
    nx.draw_networkx_nodes(graph, pos, nodelist=nodes, ax=ax, node_size=size,
                           node_color=[STATE_COLORS[states.get(i, "up")] for i in nodes])
    if not topo_cfg:
        nx.draw_networkx_nodes(graph, pos, nodelist=["server"], ax=ax, node_size=size * 2.5,
                               node_color="#2ca02c", node_shape="s")
    if n <= 40:
        nx.draw_networkx_labels(graph, pos, labels={i: str(i) for i in nodes}, font_size=7,
                                font_color="white", ax=ax)
    from matplotlib.patches import Patch
    counts = {s: sum(1 for v in states.values() if v == s) for s in ("down", "removed", "byzantine")}
    handles = [Patch(color=STATE_COLORS["up"], label=f"up ({n - sum(counts.values())})")]
    handles += [Patch(color=STATE_COLORS[s], label=f"{s} ({c})") for s, c in counts.items() if c]
    ax.legend(handles=handles, fontsize=8, loc="lower left", bbox_to_anchor=(0.0, -0.08), ncol=4, frameon=False)
    ax.set_title(f"topology: {title}, {n} nodes, final node states", fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    return _svg(fig, f"{run.name}:topology", "node colour: state at the end of the run"), ""


# --- HTML ---------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


SUMMARY_KEYS = ["algorithm", "num_nodes", "num_params", "rounds", "stopped_by", "final_test_accuracy",
                "best_test_accuracy", "final_test_loss", "time_to_target_s", "sim_time_s",
                "bytes_sent_total", "wall_time_s", "mean_staleness", "mean_client_idle_s",
                "server_idle_s", "spectral_gap", "num_edges", "mean_bytes_per_node"]


def _status(run: Run) -> str:
    if run.finished:
        return "finished"
    return f"running (round {int(run.column('round')[-1])})" if run.metrics else "starting"


def _summary_table(runs: list[Run]) -> str:
    keys = [k for k in SUMMARY_KEYS if any(k in (r.summary or {}) for r in runs)]
    head = "<tr><th>run</th><th>status</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>"
    body = []
    for r in runs:
        status = _status(r)
        cells = "".join(f"<td>{_fmt((r.summary or {}).get(k, ''))}</td>" for k in keys)
        body.append(f"<tr><td>{html.escape(r.name)}</td><td>{status}</td>{cells}</tr>")
    return f"<div class=\"scroll\"><table>{head}{''.join(body)}</table></div>"


def _short_json(summary: dict[str, Any]) -> str:
    """summary.json with long per-node lists cut to their first 32 entries."""
    def cut(v: Any) -> Any:
        if isinstance(v, list) and len(v) > 32:
            return v[:32] + [f"... {len(v) - 32} more"]
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        return v
    return json.dumps(cut(summary), indent=2)


def _run_section(run: Run, idx: int) -> str:
    parts = [f'<section class="run" id="run-{idx}"><h2>{html.escape(run.name)}</h2>',
             f'<p class="meta">{html.escape(str(run.dir))} · algorithm {html.escape(run.algorithm)} · '
             f'{run.num_nodes or "?"} nodes · {_status(run)}</p>']
    if run.metrics is None:
        parts.append('<p class="note">waiting for metrics.csv</p></section>')
        return "".join(parts)
    if run.summary:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(run.summary[k])}</td></tr>"
                       for k in SUMMARY_KEYS if k in run.summary)
        parts.append(f"<table>{rows}</table>")
    parts.append("<h3>Accuracy and loss</h3>" + _curves([run], f"{run.name}:curves"))
    if run.has("acc_median"):
        parts.append("<h3>Per-node accuracy (decentralized)</h3>" + _dl_figure(run))
    if run.has("personal_accuracy"):
        parts.append("<h3>Per-client accuracy (personalized)</h3>" + _personal_figure(run))
    fl = _fl_figure(run)
    if fl:
        parts.append("<h3>Clients: participation, staleness, idle time</h3>" + fl)
    timeline, note = _timeline(run)
    parts.append("<h3>Faults</h3>")
    if timeline:
        counts = (run.summary or {}).get("fault_transitions") or {}
        if counts:
            keys = [k for k in ("crash", "churn_down", "churn_up", "remove", "restore", "down_now") if k in counts]
            parts.append("<table><tr>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr><tr>"
                         + "".join(f"<td>{counts[k]}</td>" for k in keys) + "</tr></table>")
        parts.append(timeline + (f'<p class="note">{html.escape(note)}</p>' if note else ""))
    else:
        parts.append('<p class="note">no faults configured and no Byzantine nodes</p>')
    topo, note = _topology(run)
    parts.append("<h3>Topology and node states</h3>" + (topo or "")
                 + (f'<p class="note">{html.escape(note)}</p>' if note else ""))
    if run.config_text is not None:
        parts.append(f"<details><summary>config.yaml</summary><pre>{html.escape(run.config_text)}</pre></details>")
    if run.summary is not None:
        parts.append("<details><summary>summary.json</summary>"
                     f"<pre>{html.escape(_short_json(run.summary))}</pre></details>")
    parts.append("</section>")
    return "".join(parts)


def render_html(runs: list[Run], *, refresh_s: float | None = None, note: str = "") -> str:
    title = "Gossamer report: " + ", ".join(r.name for r in runs)
    refresh = f'<meta http-equiv="refresh" content="{max(1, int(refresh_s))}">' if refresh_s else ""
    now = _dt.datetime.now().isoformat(timespec="seconds")
    out = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">", refresh,
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>Gossamer report</h1><p class=\"meta\">generated {now} · {len(runs)} run(s)</p>"]
    if refresh_s:
        out.append(f'<p class="watch">watching: this page refreshes every {int(refresh_s)} s until '
                   "every run has finished</p>")
    if note:
        out.append(f'<p class="watch">{html.escape(note)}</p>')
    if len(runs) > 1:
        out.append("<nav>" + "".join(f'<a href="#run-{i}">{html.escape(r.name)}</a>' for i, r in enumerate(runs))
                   + "</nav>")
    with_metrics = [r for r in runs if r.metrics is not None]
    if len(runs) > 1:
        out.append('<section id="overview"><h2>Overview</h2>' + _summary_table(runs))
        if len(with_metrics) > 1:
            out.append("<h3>Runs compared</h3>" + _curves(with_metrics, "compare:curves"))
        out.append("</section>")
    out += [_run_section(r, i) for i, r in enumerate(runs)]
    out.append(f"<script>{CHECK_JS}</script></body></html>\n")
    return "".join(out)


def load_runs(run_dirs: list[Path], *, partial: bool = False) -> list[Run]:
    if not run_dirs:
        raise UserError("RUN_DIR: give at least one run directory")
    runs = [Run(Path(d), partial=partial) for d in run_dirs]
    if len({r.name for r in runs}) < len(runs):         # e.g. sweep folders: <cell>/seed=0
        for r in runs:
            r.name = f"{r.dir.parent.name}/{r.dir.name}"
    return runs


def write_report(run_dirs: list[Path], out: Path, *, refresh_s: float | None = None,
                 partial: bool = False, note: str = "") -> list[Run]:
    """Render the report of ``run_dirs`` to ``out`` (atomically); returns the runs read."""
    runs = load_runs(run_dirs, partial=partial)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render_html(runs, refresh_s=refresh_s, note=note))
    return runs


def watch(run_dirs: list[Path], out: Path, *, every_s: float = 5.0, timeout_s: float = 3600.0,
          log=print) -> bool:
    """Re-render every ``every_s`` seconds until every run has a summary.json; True when they all
    finished, False at the timeout. The page refreshes itself until the last render."""
    for d in run_dirs:
        if not Path(d).is_dir():
            raise UserError(f"RUN_DIR: {d} is not a directory")
    deadline = time.monotonic() + timeout_s
    while True:
        runs = write_report(run_dirs, out, refresh_s=every_s, partial=True)
        if all(r.finished for r in runs):
            write_report(run_dirs, out)
            log(f"report: {out} (all {len(runs)} runs finished)")
            return True
        if time.monotonic() + every_s > deadline:
            write_report(run_dirs, out, partial=True,
                         note=f"watch stopped after {timeout_s:g} s with runs still in progress")
            log(f"report: {out} (timeout after {timeout_s:g} s; runs still in progress)")
            return False
        time.sleep(every_s)
