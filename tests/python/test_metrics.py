"""Metrics from Python: engine.metrics() and the /metrics endpoint that
SHARDWIRE_METRICS_ADDR starts, parsed by prometheus_client's own parser."""
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from shardwire import TransferEngine

WAIT_S = 10.0


def wait_for(engine, key, want):
    deadline = time.monotonic() + WAIT_S
    while True:
        m = engine.metrics()
        if m.get(key, 0.0) == want:
            return m
        assert time.monotonic() < deadline, f"{key} never reached {want}: {m}"
        time.sleep(0.02)


def test_metrics_dict_and_scrape(monkeypatch, shardwire_target):
    target = shardwire_target
    monkeypatch.setenv("SHARDWIRE_METRICS_ADDR", "127.0.0.1:0")
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    try:
        addr = e.metrics_address()
        assert addr and addr.startswith("127.0.0.1:")
        buf = e.allocate_managed_buffer(1 << 20)
        transport = e.transport_for(target.name)
        labels = f'op="write",transport="{transport}",side="initiator"'
        key = "shardwire_transfer_bytes_total{" + labels + "}"
        before = e.metrics().get(key, 0.0)
        for _ in range(5):
            assert e.transfer_sync_write(target.name, buf, target.buffer, 65536) == 0
        m = wait_for(e, key, before + 5 * 65536)
        count = "shardwire_transfer_duration_seconds_count{" + f'op="write",transport="{transport}"' + "}"
        assert m[count] >= 5

        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = r.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        # prometheus_client names a counter's family without `_total`.
        assert families["shardwire_transfer_bytes"].type == "counter"
        assert families["shardwire_transfer_duration_seconds"].type == "histogram"
        assert families["shardwire_transfer_bytes"].documentation
        scraped = [
            s.value
            for s in families["shardwire_transfer_bytes"].samples
            if s.labels == {"op": "write", "transport": transport, "side": "initiator"}
        ]
        assert scraped == [e.metrics()[key]]
    finally:
        e.shutdown()
