"""gossamer report: the HTML of an FL, a DL (crashes, a Byzantine node) and an async FL run
(crashes), its structure, --watch, errors, and the page in headless Chromium."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import gossamer
from gossamer.cli import main
from gossamer.metrics import report
from tests.conftest import small_config

CRASH = {"crash": {"fraction": 0.25, "at_s": {"dist": "uniform", "low": 0.0, "high": 2.0}}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    cfgs = {"fl": small_config("fedavg", stop={"rounds": 4}),
            "dl": small_config("dpsgd", stop={"rounds": 6}, faults=CRASH,
                               adversary={"attack": "sign_flip", "nodes": [1], "params": {"scale": 4.0}}),
            "async": small_config("fedbuff", stop={"rounds": 8}, faults=CRASH)}
    out = {}
    for key, cfg in cfgs.items():
        cfg["output"]["dir"] = str(base / key)
        out[key] = Path(gossamer.run(cfg).run_dir)
    return out


@pytest.fixture(scope="module")
def pages(runs, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pages")
    out = {}
    for key, run_dir in runs.items():
        out[key] = base / f"{key}.html"
        report.write_report([run_dir], out[key])
    out["all"] = base / "all.html"
    assert main(["report", *map(str, runs.values()), "--out", str(out["all"])]) == 0
    return out


def _figures(text: str) -> list[str]:
    return re.findall(r'<figure class="fig" data-figure="([^"]+)">', text)


def test_sections_and_figures(runs, pages):
    fl, dl, asy = (pages[k].read_text() for k in ("fl", "dl", "async"))
    for text, run in ((fl, runs["fl"]), (dl, runs["dl"]), (asy, runs["async"])):
        assert "<h2>Overview</h2>" not in text and "Accuracy and loss" in text and "Topology and node states" in text
        assert "<summary>config.yaml</summary>" in text and "<summary>summary.json</summary>" in text
        assert f"{run.name}:curves" in _figures(text) and f"{run.name}:topology" in _figures(text)
        assert text.count("<svg") == len(_figures(text))
    assert f"{runs['dl'].name}:nodes" in _figures(dl) and "consensus distance" in dl
    assert "10-90% and 25-75% of the nodes (nodes.csv)" in dl       # the distribution, not only min-max
    assert f"{runs['dl'].name}:faults" in _figures(dl) and "node 1 (Byzantine)" in dl
    assert f"{runs['async'].name}:clients" in _figures(asy) and "staleness" in asy
    assert f"{runs['async'].name}:faults" in _figures(asy)
    assert "no faults configured" in fl and f"{runs['fl'].name}:clients" in _figures(fl)
    assert "topology: ring" in dl and "topology: server and clients" in fl
    every = pages["all"].read_text()
    assert "compare:curves" in _figures(every) and "Runs compared" in every and "<h2>Overview</h2>" in every
    assert len(_figures(every)) == len(_figures(fl)) + len(_figures(dl)) + len(_figures(asy)) + 1


def test_self_contained(pages):
    for page in pages.values():
        text = page.read_text()
        refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', text)
        assert all(r.startswith("#") for r in refs), refs      # only in-page links; SVG xlink:href="#..."
        assert "<link" not in text and "@import" not in text and "url(http" not in text
        assert "<script src" not in text and "http-equiv=\"refresh\"" not in text


def test_errors_are_one_line(tmp_path, runs, capsys):
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "has no metrics.csv" in err and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()


def test_watch(tmp_path, runs):
    running = tmp_path / "running"
    shutil.copytree(runs["fl"], running)
    (running / "summary.json").unlink()
    waiting = tmp_path / "waiting"                       # a run directory before its first row
    waiting.mkdir()
    out = tmp_path / "watch.html"
    assert not report.watch([running, waiting], out, every_s=0.2, timeout_s=0.5, log=lambda *_: None)
    text = out.read_text()
    assert "waiting for metrics.csv" in text and "running (round 4)" in text and "watch stopped" in text
    assert 'http-equiv="refresh"' not in text               # the last render stops refreshing
    assert report.watch([runs["fl"]], out, every_s=0.2, timeout_s=5, log=lambda *_: None)
    assert 'http-equiv="refresh"' not in out.read_text()
    page = report.render_html(report.load_runs([running], partial=True), refresh_s=5)
    assert '<meta http-equiv="refresh" content="5">' in page and "this page refreshes" in page


# --- headless Chromium --------------------------------------------------------------------------
def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None and os.environ.get("GOSSAMER_INSTALL_CHROMIUM") == "1" and os.geteuid() == 0 \
            and shutil.which("apt-get"):
        subprocess.run("(apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1",
                       shell=True, check=False, timeout=600)
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium not found (apt-get install chromium, or set GOSSAMER_INSTALL_CHROMIUM=1 "
                    "as root); the report's browser tests are skipped")
    return exe


def _browse(exe: str, page: Path, shot: Path | None = None) -> tuple[str, list[str]]:
    """The DOM after load and every console message Chromium logged (the report logs none)."""
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--enable-logging=stderr", "--v=0", "--window-size=1280,3000"]
    extra = [f"--screenshot={shot}"] if shot is not None else []   # one launch does both
    dom = subprocess.run(flags + ["--dump-dom", *extra, page.resolve().as_uri()], capture_output=True,
                         text=True, timeout=60)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return dom.stdout, console


def test_console_check_can_fail(tmp_path):
    exe = _chromium()
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('deliberate'); missing();</script></body></html>")
    _, console = _browse(exe, bad)
    assert any("deliberate" in c for c in console) and any("Uncaught" in c for c in console)


def test_reports_in_chromium(pages, tmp_path):
    import numpy as np
    from PIL import Image

    exe = _chromium()
    for key in ("fl", "dl", "async"):
        shot = tmp_path / f"{key}.png"
        dom, console = _browse(exe, pages[key], shot)
        assert console == [], (key, console)
        body = re.search(r'<body data-figures="(\d+)" data-rendered="(\d+)"', dom)
        assert body, f"{key}: the figure check did not run"
        expected = len(_figures(pages[key].read_text()))
        assert int(body.group(1)) == expected and int(body.group(2)) == expected, (key, body.groups())
        pixels = np.asarray(Image.open(shot).convert("RGB"))
        assert pixels.shape[:2] == (3000, 1280)
        assert pixels.std() > 10, key                    # not a blank page
        assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 200, key


def test_a_personalized_run_shows_each_clients_accuracy(tmp_path, pages):
    """A personalized run (per-client test splits) gets its own figure: mean, median and worst
    10% of the clients' accuracies against round and the histogram of clients.csv; a run
    without per-client splits gets none."""
    cfg = small_config("ditto", stop={"rounds": 2})
    cfg["algorithm"] = {"name": "ditto", "params": {"lam": 0.1}}
    cfg["partition"] = {"name": "dirichlet", "num_nodes": 6, "params": {"alpha": 0.3}, "test_fraction": 0.25}
    cfg["output"]["dir"] = str(tmp_path / "ditto")
    run_dir = Path(gossamer.run(cfg).run_dir)
    page = tmp_path / "ditto.html"
    report.write_report([run_dir], page)
    text = page.read_text()
    assert f"{run_dir.name}:personal" in _figures(text) and "worst 10% of clients" in text
    assert "own test split (last evaluation, clients.csv)" in text
    assert report.Run(run_dir).client_accuracy == pytest.approx(
        [float(line.split(",")[2]) for line in (run_dir / "clients.csv").read_text().splitlines()[1:]])
    assert not any(name.endswith(":personal") for name in _figures(pages["fl"].read_text()))
