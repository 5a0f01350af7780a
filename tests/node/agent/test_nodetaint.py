"""The new-node taint's removal against a small API server stand-in over real TLS: what it reads, what it patches,
how it answers a conflict and a refusal. The real API server and kubelet run it in tests/cluster."""

from __future__ import annotations

import http.server
import json
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from cni_redirect.errors import NodeApiError
from cni_redirect.node.agent.nodetaint import DEFAULT_TAINT, NodeApi

OURS = {"key": DEFAULT_TAINT, "value": "true", "effect": "NoSchedule"}
OTHER = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}


class ApiServer:
    """Answers GET and PATCH of /api/v1/nodes/<name>, applying JSON patches' `test` and `replace` as the API
    server does; `conflicts` makes the next PATCHes fail their test (another writer got there first)."""

    def __init__(self, tmp_path: Path, taints: list[dict]) -> None:
        self.taints, self.conflicts, self.status = list(taints), 0, 200
        self.requests: list[tuple[str, str, str | None, Any]] = []  # method, path, a header, the body
        cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
        self.ca = cert
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests.append(("GET", self.path, self.headers["Authorization"], None))
                if api.status != 200:
                    return self._send(api.status, {"message": "nodes is forbidden: User cannot get"})
                self._send(200, {"metadata": {"name": "n1"}, "spec": {"taints": api.taints}})

            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append(("PATCH", self.path, self.headers["Content-Type"], body))
                test, replace = body
                if api.conflicts:
                    api.conflicts -= 1
                    api.taints.append({"key": f"late-{api.conflicts}", "effect": "NoSchedule"})
                if test["value"] != api.taints:
                    return self._send(422, {"message": "the server rejected our request: test failed"})
                api.taints = replace["value"]
                self._send(200, {"spec": {"taints": api.taints}})

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def client(self, tmp_path: Path) -> NodeApi:
        token = tmp_path / "token"
        token.write_text("t0ken\n")
        return NodeApi("127.0.0.1", self.server.server_address[1], "n1", token_file=token, ca_file=self.ca)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api(tmp_path, request):
    server = ApiServer(tmp_path, getattr(request, "param", [OTHER, OURS]))
    yield server
    server.close()


def test_takes_only_our_taint_off_with_a_patch_that_tests_what_it_read(api, tmp_path):
    assert api.client(tmp_path).remove_taint(DEFAULT_TAINT) is True
    assert api.taints == [OTHER]
    (get, patch) = api.requests
    assert get[:3] == ("GET", "/api/v1/nodes/n1", "Bearer t0ken")
    assert patch[2] == "application/json-patch+json"
    assert patch[3] == [
        {"op": "test", "path": "/spec/taints", "value": [OTHER, OURS]},
        {"op": "replace", "path": "/spec/taints", "value": [OTHER]},
    ]


@pytest.mark.parametrize("api", [[OTHER]], indirect=True)
def test_a_node_without_the_taint_costs_one_get(api, tmp_path):
    assert api.client(tmp_path).remove_taint(DEFAULT_TAINT) is False
    assert [r[0] for r in api.requests] == ["GET"] and api.taints == [OTHER]


def test_a_concurrent_change_is_read_again_and_kept(api, tmp_path):
    api.conflicts = 1  # another controller adds a taint between our GET and our PATCH
    assert api.client(tmp_path).remove_taint(DEFAULT_TAINT) is True
    assert api.taints == [OTHER, {"key": "late-0", "effect": "NoSchedule"}]
    assert [r[0] for r in api.requests] == ["GET", "PATCH", "GET", "PATCH"]


def test_taints_that_keep_changing_give_up_with_an_error(api, tmp_path):
    api.conflicts = 5
    with pytest.raises(NodeApiError, match="kept changing"):
        api.client(tmp_path).remove_taint(DEFAULT_TAINT, attempts=3)
    assert OURS in api.taints


def test_a_refusal_names_the_status_and_the_servers_message(api, tmp_path):
    api.status = 403
    with pytest.raises(NodeApiError, match=r"GET node n1: HTTP 403: nodes is forbidden"):
        api.client(tmp_path).remove_taint(DEFAULT_TAINT)


def test_an_unknown_ca_is_an_error_not_a_request(api, tmp_path):
    client = api.client(tmp_path)
    (tmp_path / "other").mkdir()
    other = ApiServer(tmp_path / "other", [])
    try:
        stranger = NodeApi(client.host, other.server.server_address[1], "n1", client.token_file, client.ca_file)
        with pytest.raises(NodeApiError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            stranger.remove_taint(DEFAULT_TAINT)
    finally:
        other.close()
    assert other.requests == []


def test_in_cluster_needs_the_node_name_and_the_service_environment(monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert NodeApi.in_cluster("n1").port == 443
    with pytest.raises(NodeApiError, match="NODE_NAME is empty"):
        NodeApi.in_cluster("")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(NodeApiError, match="KUBERNETES_SERVICE_HOST=''"):
        NodeApi.in_cluster("n1")
