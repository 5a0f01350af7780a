"""The node agent live: installed against containerd's own dirs, then SIGTERMed.

This is what the DaemonSet does on a node, minus Kubernetes: the agent is the
bundle's own executable (as in the image), serving requests on its socket as
with the `agent` overlay; the node's CNI config starts without us, and
containerd reloads it live. `--chain-mode` is left at auto: containerd 2.4
(libcni 1.3) gets our drop-in and its conflist is never written, byte for byte
at every read of a watcher; containerd 1.6 gets the edit, as before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

from cni_redirect.node.chaining.confdir import DROPIN_NAME, ChainMode, read_conf_dir
from cni_redirect.testing.netlab import Netns
from tests.support import free_port, wait_for

READINESS_PORT = free_port()


class Watcher:
    """Reads a file every few milliseconds while the test runs: every distinct content it ever saw."""

    def __init__(self, path: Path) -> None:
        self.path, self.reads = path, 0
        self.seen: set[bytes] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(0.005):
            try:
                self.seen.add(self.path.read_bytes())
            except FileNotFoundError:
                self.seen.add(b"<missing>")
            self.reads += 1

    def close(self) -> set[bytes]:
        self.stop.set()
        self.thread.join()
        return self.seen


def readiness() -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{READINESS_PORT}/readyz", timeout=2).status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_agent_installs_into_containerd_keeps_it_on_sigterm_and_uninstall_removes_it(bare_containerd, bundle, tmp_path):
    runtime = bare_containerd.runtime
    mode = ChainMode.DROPIN if runtime.version == "2.4" else ChainMode.EDIT
    (conflist_path,) = runtime.conf_dir.glob("*.conflist")
    original = conflist_path.read_bytes()
    watcher = Watcher(conflist_path)
    entry_file = tmp_path / "entry.json"
    entry_file.write_text(json.dumps({"log_file": str(runtime.log_path), "exclude_namespaces": ["kube-system"]}))

    before = bare_containerd.run_pod("before-install", annotations={"cni-redirect.io/enabled": "true"})
    assert "cni_redirect" not in Netns.at(bare_containerd.netns(before)).ruleset()

    agent_socket = Path(f"/run/cni-redirect/live-{os.getpid()}.sock")
    agent_log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(
        [
            str(bundle / "cni-redirect"),
            "install",
            f"--cni-bin-dir={runtime.bin_dir}",
            f"--cni-conf-dir={runtime.conf_dir}",
            f"--plugin-source={bundle}",
            f"--entry-file={entry_file}",
            f"--readiness-port={READINESS_PORT}",
            f"--agent-socket={agent_socket}",
            f"--cri-socket={runtime.socket}",
        ],
        stdout=agent_log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: readiness() == 200, timeout=30)
        view = read_conf_dir(runtime.conf_dir)
        assert view.mode() == mode, view.describe_mode()
        assert (runtime.bin_dir / "cni-redirect").resolve().is_file()
        entry = view.entry()
        assert entry is not None and entry["agent_socket"] == str(agent_socket), "pods go through the warm agent"
        if mode == ChainMode.DROPIN:
            assert (runtime.conf_dir / json.loads(original)["name"] / DROPIN_NAME).is_file()

        bare_containerd.wait_for_reload(expect_plugin=True)
        captured = bare_containerd.run_pod("after-install", annotations={"cni-redirect.io/enabled": "true"})
        assert "table inet cni_redirect" in Netns.at(bare_containerd.netns(captured)).ruleset()
    finally:
        agent.send_signal(signal.SIGTERM)
        rc = agent.wait(timeout=30)
        agent_log.close()
    lines = [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines()]
    assert rc == 0, lines[-5:]
    assert read_conf_dir(runtime.conf_dir).mode() == mode, "a stop (a restart as far as the agent knows) keeps it"
    assert any(line["msg"] == "chain mode" and line["mode"] == mode for line in lines)
    removed = subprocess.run(
        [
            str(bundle / "cni-redirect"),
            "uninstall",
            f"--cni-bin-dir={runtime.bin_dir}",
            f"--cni-conf-dir={runtime.conf_dir}",
            "--uninstall-grace=1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert removed.returncode == 0, removed.stderr
    assert conflist_path.read_bytes() == original, "the primary's file is back to its exact bytes"
    assert sorted(os.listdir(runtime.conf_dir)) == [conflist_path.name], "nothing of ours is left in the conf dir"
    seen = watcher.close()
    print(f"\n[live {mode}] {watcher.reads} reads of the primary, {len(seen)} distinct contents")
    if mode == ChainMode.DROPIN:
        assert seen == {original}, "drop-in mode never writes the primary's file"
    else:
        assert all(json.loads(content) for content in seen), "valid JSON at every read"
    assert not (runtime.bin_dir / "cni-redirect").exists()
    assert not list(runtime.bin_dir.glob("cni-redirect-bundle-*"))
    assert any(line["msg"].startswith("agent stopped") for line in lines)
    assert any(line["msg"] == "agent serving CNI requests" for line in lines)
    assert not agent_socket.exists()

    bare_containerd.wait_for_reload(expect_plugin=False)
    after = bare_containerd.run_pod("after-uninstall", annotations={"cni-redirect.io/enabled": "true"})
    assert "cni_redirect" not in Netns.at(bare_containerd.netns(after)).ruleset()

    # The pod captured while the agent ran still tears down cleanly.
    bare_containerd.stop_pod(captured)
    bare_containerd.remove_pod(captured)
