"""The new-node guard: the node registers with a NoSchedule taint (the kubelet's `--register-with-taints`), the
scheduler keeps opted-in pods off it, and the agent takes the taint off once it is installed and chained.

Without it, a node that joins runs pods from the moment its primary CNI is ready, which can be before our agent
has put our entry in the chain: those pods would start uncaptured and stay so. The taint is removed with a JSON
patch that first `test`s the taints it read, so a concurrent change (another controller's taint) is never lost:
a conflict reads again. One GET when the node never had the taint; nothing at all when `NOT_READY_TAINT` is
empty. Called from the agent's loop, never from the CNI path.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import NodeApiError

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: The taint's key in the shipped manifests and chart.
DEFAULT_TAINT = "cni-redirect.io/agent-not-ready"
TIMEOUT = 5.0


@dataclass(frozen=True)
class NodeApi:
    """The API server, as this pod's service account, bound to one node."""

    host: str
    port: int
    node: str
    token_file: Path = SERVICE_ACCOUNT / "token"
    ca_file: Path = SERVICE_ACCOUNT / "ca.crt"

    @classmethod
    def in_cluster(cls, node: str) -> NodeApi:
        """From the environment the kubelet gives every pod (KUBERNETES_SERVICE_HOST/PORT), or NodeApiError."""
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST", ""), os.environ.get("KUBERNETES_SERVICE_PORT", "")
        if not node:
            raise NodeApiError("NODE_NAME is empty: the manifest passes it from spec.nodeName")
        if not host or not port.isdigit():
            raise NodeApiError(f"no API server in the environment (KUBERNETES_SERVICE_HOST={host!r}, PORT={port!r})")
        return cls(host, int(port), node)

    def _request(self, method: str, body: object = None) -> tuple[int, dict[str, Any]]:
        try:
            token = self.token_file.read_text().strip()  # re-read every time: the kubelet rotates it
            context = ssl.create_default_context(cafile=str(self.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise NodeApiError(f"service account credentials: {exc}") from exc
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json-patch+json"
        connection = http.client.HTTPSConnection(self.host, self.port, timeout=TIMEOUT, context=context)
        try:
            connection.request(method, f"/api/v1/nodes/{self.node}", body=data, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise NodeApiError(f"{method} node {self.node}: {type(exc).__name__}: {exc}") from exc
        finally:
            connection.close()
        try:
            document = json.loads(payload) if payload else {}
        except ValueError:
            document = {}
        return response.status, document if isinstance(document, dict) else {}

    def remove_taint(self, key: str, attempts: int = 3) -> bool:
        """Take every taint with this key off the node: True if one was there, False if none was."""
        for _ in range(attempts):
            status, node = self._request("GET")
            if status != 200:
                raise NodeApiError(f"GET node {self.node}: HTTP {status}: {node.get('message', '')}")
            taints = node.get("spec", {}).get("taints") or []
            kept = [t for t in taints if t.get("key") != key]
            if len(kept) == len(taints):
                return False
            patch = [{"op": "test", "path": "/spec/taints", "value": taints}]
            patch.append({"op": "replace", "path": "/spec/taints", "value": kept})
            status, answer = self._request("PATCH", patch)
            if status == 200:
                return True
            if status not in (409, 422):  # 422: the test failed (the taints changed since the GET): read again
                raise NodeApiError(f"PATCH node {self.node}: HTTP {status}: {answer.get('message', '')}")
        raise NodeApiError(f"node {self.node}: its taints kept changing ({attempts} attempts)")
