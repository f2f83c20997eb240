

def test_metrics_rows_are_flushed_always_and_fsynced_when_durable_or_synced(tmp_path, monkeypatch):
    """The simulator's metrics are flushed per row (a killed process loses none) and fsynced
    with each checkpoint (MetricsWriter.sync); durable writers fsync every append."""
    from gossamer.metrics import runstore

    synced = []
    monkeypatch.setattr(runstore.os, "fsync", lambda fd: synced.append(fd))
    lazy = runstore.MetricsWriter(tmp_path / "lazy.csv", ["round", "x"], durable=False)
    for r in range(3):
        lazy.append({"round": r, "x": 0.5})
    assert synced == []
    assert (tmp_path / "lazy.csv").read_text().splitlines() == ["round,x", "0,0.5", "1,0.5", "2,0.5"]
    lazy.sync()
    lazy.sync()                                   # nothing new: no second fsync
    assert len(synced) == 1
    durable = runstore.MetricsWriter(tmp_path / "durable.csv", ["round"])
    durable.append({"round": 0})
    durable.append({"round": 1})
    assert len(synced) == 3
