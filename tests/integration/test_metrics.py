"""The node agent's /metrics: Prometheus text that prometheus_client parses, counting what the CNI server served."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cni_redirect.testing.netlab import enabled, plugin_conf, run_plugin
from tests.support import AgentThread, wait_for

PORT = 18397


def scrape() -> dict[str, dict[tuple, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=5).read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_count_the_requests_the_cni_server_answered(host, pod):
    socket = Path(f"/run/cni-redirect/metrics-{os.getpid()}.sock")
    host.put("10-calico.conflist")
    agent = AgentThread(host, readiness_port=PORT, agent_socket=socket)
    try:
        wait_for(lambda: bool(host.entries("10-calico.conflist")))
        conf = plugin_conf(enabled(), agent_socket=str(socket))
        for _ in range(5):
            assert run_plugin("ADD", pod.path, conf).rc == 0
        assert run_plugin("CHECK", pod.path, conf).rc == 0
        bad = run_plugin("ADD", pod.path, plugin_conf(enabled(proxy_uid="root"), agent_socket=str(socket)))
        assert bad.rc == 1
        samples = scrape()
        requests = samples["cni_redirect_requests_total"]
        assert requests[(("code", "0"), ("command", "ADD"), ("outcome", "ok"))] == 5
        assert requests[(("code", "0"), ("command", "CHECK"), ("outcome", "ok"))] == 1
        assert requests[(("code", "7"), ("command", "ADD"), ("outcome", "error"))] == 1
        assert samples["cni_redirect_request_duration_seconds_count"][(("command", "ADD"),)] == 6
        assert samples["cni_redirect_agent_up"][()] == 1
        assert samples["process_resident_memory_bytes"][()] > 0
        assert samples["cni_redirect_conflist_reinsertions_total"][()] == 0

        (host.conf / "10-calico.conflist").write_bytes(
            (host.conf / "10-calico.conflist")
            .read_bytes()
            .replace(b'"type": "cni-redirect"', b'"type": "removed-by-the-primary"')
        )
        host.put("10-calico.conflist")  # the primary rewrites its file without our entry
        wait_for(lambda: scrape()["cni_redirect_conflist_reinsertions_total"][()] == 1)
        socket.unlink()  # the server's socket taken away: it is down, and says so
        assert scrape()["cni_redirect_agent_up"][()] == 0
    finally:
        agent.terminate()
