"""Nothing in the conf dir is trusted (#36 items 2 and 3): a hostile journal, a FIFO under our temp name, a race
between our own writers, a primary writing in place as we swap, libcni's own reading of the fields we decide
on, an entry that would fail pods that never opted in, and a node taken back from a successor."""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest

from cni_redirect.errors import SettingsError
from cni_redirect.logs import JsonLog
from cni_redirect.node import files
from cni_redirect.node.admin.uninstall import leftovers
from cni_redirect.node.agent.ownership import State
from cni_redirect.node.chaining.chain import check_entry
from cni_redirect.node.chaining.confdir import DROPIN_NAME, ChainMode, libcni_bool, read_conf_dir
from cni_redirect.node.chaining.edit import JOURNAL
from cni_redirect.node.files import Folder, remove_stale_temps, write_atomic

# --- the journal names only files of ours, inside the conf dir ---


@pytest.mark.parametrize(
    "step",
    [
        {"op": "restore", "single": "../outside.conf", "conflist": "../outside.conflist"},
        {"op": "convert", "single": "../bin/x.conf", "conflist": "../bin/x.conflist"},
        {"op": "restore", "single": "/etc/passwd.conf", "conflist": "/etc/passwd.conflist"},
        {"op": "restore", "single": "10-calico.conflist", "conflist": "10-calico.conflist"},
        {"op": "convert", "single": "10-legacy-bridge.conf", "conflist": "10-calico.conflist"},
        {"op": "unlink", "single": "10-legacy-bridge.conf", "conflist": "10-legacy-bridge.conflist"},
        {"op": "restore", "single": ".cni-redirect-original-x.conf", "conflist": ".cni-redirect-original-x.conflist"},
    ],
    ids=["dotdot", "into-bin", "absolute", "not-single", "wrong-conflist", "unknown-op", "hidden"],
)
def test_a_hostile_journal_is_refused_and_nothing_outside_is_touched(host, step):
    """On main a journal naming ../ made the agent and uninstall delete a file outside the conf dir, and
    uninstall move a conf-dir file into the bin dir as an executable."""
    original = host.put("10-calico.conflist")
    outside = host.root / "outside.conflist"
    outside.write_bytes(b"{}")
    (host.root / "outside.conf").write_bytes(b'{"type": "x"}')
    (host.conf / JOURNAL).write_text(json.dumps(step))
    before_bin = sorted(os.listdir(host.bin))
    agent = host.agent()
    agent.install()
    assert not agent.reconcile()
    assert "not" in agent.ready_reason and JOURNAL in agent.ready_reason
    refused = [e for e in host.events() if e["msg"].startswith("refused a journal")]
    assert len(refused) == 1 and JOURNAL in refused[0]["error"], host.events()
    assert agent.reconcile(), "the journal removed, the next pass chains"
    assert outside.read_bytes() == b"{}" and (host.root / "outside.conf").exists(), "nothing outside touched"
    (host.conf / JOURNAL).write_text(json.dumps(step))
    host.uninstall()
    assert len([e for e in host.events() if e["msg"].startswith("refused a journal")]) == 2, "uninstall reports it"
    assert outside.read_bytes() == b"{}" and (host.root / "outside.conf").exists()
    assert sorted(os.listdir(host.bin)) == [n for n in before_bin if n == "bridge"], "nothing moved into the bin dir"
    assert (host.conf / "10-calico.conflist").read_bytes() == original


# --- a FIFO never blocks a pass ---


def _passes_within(seconds: float, work) -> bool:
    done = threading.Event()

    def run() -> None:
        work()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(seconds)


def test_a_fifo_named_like_our_temp_file_blocks_nothing(host):
    """On main `remove_stale_temps` opened it for reading: every pass hung there, SIGTERM did not stop the
    agent, uninstall hung."""
    host.put("10-calico.conflist")
    os.mkfifo(host.conf / ".10-calico.conflist.cni-redirect-tmp-0123456789abcdef")
    os.mkfifo(host.bin / ".cni-redirect.cni-redirect-tmp-0123456789abcdef")
    agent = host.agent()
    agent.install()
    assert _passes_within(5, agent.reconcile), "the pass finished"
    assert agent.ready_reason == ""
    assert _passes_within(5, lambda: remove_stale_temps(host.conf))
    assert _passes_within(5, host.uninstall)


def test_a_fifo_as_the_primary_is_a_reason_not_a_hang(host):
    os.mkfifo(host.conf / "00-fifo.conflist")
    host.put("10-calico.conflist")
    agent = host.agent()
    agent.install()
    assert _passes_within(5, agent.reconcile)
    assert "not a regular file (a FIFO)" in agent.ready_reason


def test_a_pass_that_does_not_finish_is_reported_by_the_probes(host):
    """The safety net behind the non-blocking reads: a pass blocked for longer than its deadline turns
    readiness, then liveness, to a reason (on main the probe said ok while every pass hung)."""
    import time

    from cni_redirect.node.agent.daemon import PASS_DEADLINE_HEALTHY, PASS_DEADLINE_READY, _Services

    host.put("10-calico.conflist")
    agent = host.agent()
    agent.install()
    assert agent.reconcile() and agent.stuck(PASS_DEADLINE_READY) == ""
    services = _Services(host.options(), JsonLog(host.log), agent, lambda: None)
    services.state = State.OWNER
    assert services.answer("ready") == "" and services.answer("healthy") == ""
    agent.pass_started = time.monotonic() - PASS_DEADLINE_READY - 1
    assert "has not finished" in services.answer("ready") and services.answer("healthy") == ""
    agent.pass_started = time.monotonic() - PASS_DEADLINE_HEALTHY - 1
    assert "has not finished" in services.answer("healthy")


def test_reads_of_the_conf_dir_are_bounded(host):
    (host.conf / "00-huge.conflist").write_bytes(b" " * (files.MAX_FILE_BYTES + 1))
    snapshot = read_conf_dir(host.conf)
    assert "larger than" in snapshot.problem


# --- our own writers never race each other ---


def test_a_cleanup_during_a_swap_never_takes_what_was_swapped_out(tmp_path, monkeypatch):
    """On main, after RENAME_EXCHANGE the temp name held the primary's bytes unlocked: another process of ours
    (uninstall --force beside the agent) removed it, the swap failed with FileNotFoundError and, had the
    primary changed, its newer bytes were lost."""
    path = tmp_path / "10-calico.conflist"
    path.write_bytes(b'{"v": 1}')
    real_exchange = Folder.exchange
    removed: list[list[str]] = []

    def exchange_then_cleanup(self, a, b):
        swapped = real_exchange(self, a, b)
        result: list[str] = []
        thread = threading.Thread(target=lambda: result.extend(remove_stale_temps(tmp_path)))  # another writer
        thread.start()
        thread.join()
        removed.append(result)
        return swapped

    monkeypatch.setattr(Folder, "exchange", exchange_then_cleanup)
    assert write_atomic(path, b'{"v": 2}', expect=b'{"v": 1}')
    assert removed and removed[0] == [], "the cleanup left the swapped-out file alone"
    assert path.read_bytes() == b'{"v": 2}' and os.listdir(tmp_path) == ["10-calico.conflist"]


def test_a_write_in_place_into_the_file_we_swapped_out_is_put_back(host):
    """The primary opened its file before our swap and wrote after it: its newest bytes went into the file
    we had swapped out, seen by no reader (2 of 40 bursts on main). The held fd sees it; the next pass puts
    their bytes back, then our entry into them."""
    path = host.conf / "10-calico.conflist"
    data = host.put("10-calico.conflist")
    agent = host.agent()
    agent.install()
    assert agent.reconcile()
    theirs = json.loads(data)
    path.write_bytes(json.dumps({**theirs, "x-version": 1}).encode())
    fd = os.open(path, os.O_WRONLY)  # the primary opens its file...
    try:
        assert agent.reconcile()  # ...we swap our entry in...
        newest = json.dumps({**theirs, "x-version": 2}).encode()
        os.pwrite(fd, newest, 0)  # ...and it writes into the file it holds, which no longer has the name
        os.ftruncate(fd, len(newest))
    finally:
        os.close(fd)
    assert agent.chain.wants_pass_in() is not None, "a pass soon, to look at the held file"
    agent.reconcile()
    agent.reconcile()
    document = json.loads(path.read_bytes())
    assert document["x-version"] == 2 and [p["type"] for p in document["plugins"]][-1] == "cni-redirect"
    host.uninstall()
    assert path.read_bytes() == newest


# --- libcni's own reading of the fields we decide on ---


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, (True, "")), (False, (False, "")), ("true", (True, "")), ("TRUE", (True, "")), ("False", (False, ""))],
)
def test_booleans_as_libcni_reads_them(value, expected):
    assert libcni_bool({"loadOnlyInlinedPlugins": value}, "loadOnlyInlinedPlugins") == expected


@pytest.mark.parametrize("value", ["yes", 1, None, [], "1"])
def test_a_boolean_libcni_refuses_is_a_refusal(value):
    flag, why = libcni_bool({"loadOnlyInlinedPlugins": value}, "loadOnlyInlinedPlugins")
    assert not flag and "libcni refuses" in why


@pytest.mark.parametrize("value", ["true", "TRUE", "yes", 7])
def test_load_only_inlined_plugins_in_any_spelling_means_editing(host, value):
    data = json.loads(host.put("10-calico.conflist"))
    host.put("10-calico.conflist", json.dumps({**data, "loadOnlyInlinedPlugins": value}).encode())
    agent = host.agent(chain_mode="dropin")
    agent.install()
    assert agent.reconcile() and agent.chain.mode == ChainMode.EDIT
    assert not list(host.conf.rglob(DROPIN_NAME)), "no drop-in the runtime would not load"


def test_a_network_dir_that_is_a_link_or_a_file_is_never_written_through(host, tmp_path):
    data = json.loads(host.put("10-calico.conflist"))
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, host.conf / data["name"])
    agent = host.agent(chain_mode="dropin")
    agent.install()
    assert agent.reconcile() and agent.chain.mode == ChainMode.EDIT
    assert "symlink" in agent.chain.fallback and list(outside.iterdir()) == []
    for _ in range(5):
        assert agent.reconcile()
    assert agent.chain.writes == 1, "one write, not one per pass"
    with Folder.open(host.conf) as folder, pytest.raises(OSError) as refused:
        folder.sub(data["name"], create=True)
    assert refused.value.errno in (errno.ELOOP, errno.ENOTDIR)


# --- the entry must be one every pod can live with ---


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"defaults": {"enabled": "maybe"}}, "enabled"),
        ({"defaults": {"proxy-uid": "true"}}, "proxy-uid"),
        ({"defaults": {"outbound-port": "0"}}, "outbound-port"),
    ],
)
def test_an_entry_that_fails_any_pod_is_refused_naming_the_field(settings, field):
    """On main `enabled: maybe` was installed and reported ready; every pod without the opt-in annotation then
    failed ADD with code 7: no pod started on the node."""
    with pytest.raises(SettingsError) as refused:
        check_entry(settings, "entry.json")
    assert field in str(refused.value) and "entry.json" in str(refused.value)


def test_an_agent_refuses_to_chain_an_entry_that_fails_unannotated_pods(host, tmp_path):
    from cni_redirect.node.agent.daemon import run

    host.put("10-calico.conflist")
    entry = tmp_path / "entry.json"
    entry.write_text(json.dumps({"defaults": {"enabled": "maybe"}}))
    assert run(host.options(entry_file=entry), JsonLog(host.log)) == 2
    (error,) = [e for e in host.events() if e["level"] == "error"]
    assert "enabled" in error["error"] and "a pod without annotations" in error["error"]
    assert read_conf_dir(host.conf).mode() is None, "nothing chained"


# --- the bin dir: the link is the running agent's, and nothing of ours is missed ---


def test_an_agent_taking_the_node_back_links_its_own_bundle(host):
    """On main an agent taking the node back from a successor that went away left the link at the
    successor's bundle."""
    host.put("10-calico.conflist")
    old = host.agent()
    old.install()
    assert old.reconcile()
    ours = os.readlink(host.bin / "cni-redirect")
    host.set_bundle_version("v2")
    successor = host.agent()
    successor.install()
    assert os.readlink(host.bin / "cni-redirect") != ours
    host.set_bundle_version("v1")  # the old agent's image: its bundle source never changed
    assert old.reconcile()
    assert os.readlink(host.bin / "cni-redirect") == ours


def test_uninstall_check_sees_what_a_killed_install_left(host):
    host.put("10-calico.conflist")
    agent = host.agent()
    agent.install()
    agent.reconcile()
    (host.bin / ".cni-redirect.cni-redirect-link-0123456789abcdef").symlink_to("nowhere")
    (host.bin / ".cni-redirect.cni-redirect-tmp-0123456789abcdef").write_bytes(b"half")
    (host.bin / ".cni-redirect-bundle-x.cni-redirect-staging-abc").mkdir()
    left, _ = leftovers(host.bin, host.conf)
    assert {".cni-redirect.cni-redirect-link-0123456789abcdef", ".cni-redirect.cni-redirect-tmp-0123456789abcdef",
            ".cni-redirect-bundle-x.cni-redirect-staging-abc"} <= set(left)  # fmt: skip
    host.uninstall()
    assert leftovers(host.bin, host.conf) == ([], []), sorted(os.listdir(host.bin))
    assert sorted(os.listdir(host.bin)) == ["bridge"]


# --- the DEL stub: only where a runtime may still run DEL of a pod from a cached config ---


def _cache_naming_us(cache):
    import base64

    (cache / "results").mkdir(parents=True)
    config = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": [{"type": "calico"}, {"type": "cni-redirect"}],
    }
    cached = {
        "kind": "cniCacheV1",
        "containerId": "c1",
        "config": base64.b64encode(json.dumps(config).encode()).decode(),
    }
    (cache / "results" / "k8s-pod-network-c1-eth0").write_text(json.dumps(cached))


SOCKETS = [("/run/containerd/containerd.sock", False), ("/var/run/crio/crio.sock", True), ("/run/other.sock", True)]


@pytest.mark.parametrize(("cri_socket", "stub"), SOCKETS)
def test_uninstall_leaves_a_del_stub_only_where_a_cached_sandbox_may_get_del_from_us(host, cri_socket, stub):
    """CRI-O tears pods down with the config libcni cached at ADD; containerd with the one it loads now. The
    agent records the runtime (CRI's answer, else its CRI socket's name); uninstall keeps a stub for CRI-O and
    an unknown runtime while the cache names us, and a later uninstall removes it once nothing cached does."""
    from cni_redirect.node.admin.uninstall import uninstall
    from cni_redirect.node.chaining.bundle import DEL_STUB

    host.put("10-calico.conflist")
    agent = host.agent(cri_socket=cri_socket)
    agent.install()
    assert agent.reconcile()
    cache = host.root / "cni-cache"
    _cache_naming_us(cache)
    assert uninstall(host.bin, host.conf, JsonLog(host.log), grace=0.0, cache_dir=cache) == []
    assert (host.bin / "cni-redirect").exists() == stub
    left, kept = leftovers(host.bin, host.conf)
    assert left == [] and kept == (["cni-redirect (the DEL stub)"] if stub else [])
    if stub:
        assert (host.bin / "cni-redirect").read_bytes() == DEL_STUB
        (cache / "results" / "k8s-pod-network-c1-eth0").unlink()  # the pod is gone: its DEL ran
        assert uninstall(host.bin, host.conf, JsonLog(host.log), grace=0.0, cache_dir=cache) == []
    assert sorted(os.listdir(host.bin)) == ["bridge"]


def test_the_del_stub_answers_version_and_del_and_refuses_the_rest(tmp_path):
    import subprocess

    from cni_redirect.node.chaining.bundle import DEL_STUB

    stub = tmp_path / "cni-redirect"
    stub.write_bytes(DEL_STUB)
    stub.chmod(0o755)

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(stub)], input=b'{"cniVersion": "1.0.0"}', capture_output=True,
                              env={"CNI_COMMAND": command, "PATH": "/usr/bin:/bin"}, timeout=10)  # fmt: skip

    version = run("VERSION")
    assert version.returncode == 0 and json.loads(version.stdout)["supportedVersions"][-1] == "1.1.0"
    assert run("DEL").returncode == 0 and run("DEL").stdout == b""
    add = run("ADD")
    assert add.returncode == 1 and json.loads(add.stdout)["code"] == 4
