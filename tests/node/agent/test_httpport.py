"""The agent's HTTP port (node/agent/httpport.py): it answers on both families and sleeps while idle."""

from __future__ import annotations

import http.server
import threading
import time
import urllib.request
from pathlib import Path

from cni_redirect.node.agent.httpport import _probe_server
from tests.support import free_port


def _context_switches(thread) -> int:
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")))


def test_the_http_port_sleeps_while_idle_and_stops_at_once():
    """socketserver's own loop wakes twice a second to look for a shutdown (the largest share of an idle agent's
    CPU); ours sleeps until a connection or the shutdown, and still answers and stops."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    port = free_port()
    server = _probe_server(port, Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status == 200
        time.sleep(0.2)
        before = _context_switches(thread)
        time.sleep(2.0)
        assert _context_switches(thread) - before == 0  # socketserver's loop: 4 wakes in these 2 s
        assert urllib.request.urlopen(f"http://[::1]:{port}/", timeout=5).status == 200
    finally:
        server.shutdown()
        server.server_close()
    thread.join(timeout=5)
    assert not thread.is_alive()
