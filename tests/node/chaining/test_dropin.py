"""Drop-in chaining (#31 item 1): our entry as libcni's `<network>/99-cni-redirect.conf`, the primary's file never
written; the fall-backs to editing, the switches between the modes, a primary that changes, uninstall."""

from __future__ import annotations

import json
import os

import pytest

from cni_redirect.node.admin.doctor import node_findings
from cni_redirect.node.admin.uninstall import leftovers
from cni_redirect.node.chaining.confdir import DROPIN_NAME, ChainMode, read_conf_dir
from cni_redirect.node.chaining.dropin import RELOAD_MARKER, choose_mode, loads_dropins


def snapshot_of(conf_dir) -> dict[str, bytes]:
    """Every file under the conf dir, with its bytes: what "byte-identical" compares."""
    return {
        str(path.relative_to(conf_dir)): path.read_bytes() for path in sorted(conf_dir.rglob("*")) if path.is_file()
    }


def dropin_path(host, network: str = "k8s-pod-network"):
    return host.conf / network / DROPIN_NAME


def test_dropin_mode_writes_our_drop_in_and_never_the_primary(host):
    original = host.put("10-calico.conflist")
    agent = host.agent(chain_mode="dropin")
    agent.install()
    assert agent.reconcile() and agent.chain.mode == ChainMode.DROPIN
    network = json.loads(original)["name"]
    assert (host.conf / "10-calico.conflist").read_bytes() == original
    plugin = json.loads(dropin_path(host, network).read_bytes())
    assert plugin["type"] == "cni-redirect" and plugin["defaults"]["proxy-uid"] == "1337"
    assert "cniVersion" not in plugin and "name" not in plugin, "a drop-in holds one plugin object"
    assert (host.conf / RELOAD_MARKER).exists(), "the runtime is told to reload through the top dir"
    view = read_conf_dir(host.conf)
    assert view.mode() == ChainMode.DROPIN
    entry = view.entry()
    assert entry is not None and entry["name"] == network and entry["type"] == "cni-redirect"
    marker = (host.conf / RELOAD_MARKER).stat().st_mtime_ns
    writes = agent.chain.writes
    for _ in range(3):
        idle = agent.reconcile()
        assert idle.ready and idle.wrote == 0 and idle.reason == "" and idle.mode == ChainMode.DROPIN
    assert agent.chain.writes == writes and (host.conf / RELOAD_MARKER).stat().st_mtime_ns == marker, "idle: no write"
    dropin_path(host, network).unlink()
    repaired = agent.reconcile()
    assert repaired.ready and repaired.wrote == 1, "a pass that put the entry back says so"


@pytest.mark.parametrize(
    ("name", "change", "why"),
    [
        ("10-calico.conflist", {"loadOnlyInlinedPlugins": True}, "loadOnlyInlinedPlugins"),
        ("10-legacy-bridge.conf", None, "single-plugin"),
        ("10-calico.conflist", {"name": ""}, "cannot name a drop-in directory"),
        ("10-calico.conflist", {"name": "../etc"}, "cannot name a drop-in directory"),
    ],
)
def test_a_primary_that_refuses_drop_ins_is_edited_with_a_log_line_and_a_count(host, name, change, why):
    data = host.put(name)
    if change is not None:
        host.put(name, json.dumps({**json.loads(data), **change}).encode())
    agent = host.agent(chain_mode="dropin")
    agent.install()
    first = agent.reconcile()
    assert first.ready and first.mode == ChainMode.EDIT and first.fell_back and first.wrote == 1
    assert why in agent.chain.fallback and agent.chain.fallbacks == 1
    (warning,) = [e for e in host.events() if e["level"] == "warning" and "refuses drop-ins" in e["msg"]]
    assert why in warning["why"]
    assert read_conf_dir(host.conf).mode() == ChainMode.EDIT and not [p for p in host.conf.rglob(DROPIN_NAME)]
    again = agent.reconcile()
    assert again and not again.fell_back and not again.wrote and agent.chain.fallbacks == 1, "counted once"


def test_switching_from_edit_to_drop_in_restores_the_primary_byte_for_byte(host):
    original = host.put("10-calico.conflist")
    edit = host.agent(chain_mode="edit")
    edit.install()
    assert edit.reconcile() and host.entries("10-calico.conflist")
    dropin = host.agent(chain_mode="dropin")  # an upgraded agent on a runtime that loads drop-ins
    assert dropin.reconcile() and dropin.chain.mode == ChainMode.DROPIN
    assert (host.conf / "10-calico.conflist").read_bytes() == original
    assert not [n for n in os.listdir(host.conf) if n.startswith(".cni-redirect-original-")], "no backup left"
    assert read_conf_dir(host.conf).files_naming_us() == [f"k8s-pod-network/{DROPIN_NAME}"]


def test_switching_from_drop_in_to_edit_takes_the_drop_in_out(host):
    host.put("10-calico.conflist")
    dropin = host.agent(chain_mode="dropin")
    dropin.install()
    assert dropin.reconcile()
    edit = host.agent(chain_mode="edit")
    assert edit.reconcile() and edit.chain.mode == ChainMode.EDIT
    assert len(host.entries("10-calico.conflist")) == 1
    assert not dropin_path(host).exists() and not (host.conf / "k8s-pod-network").exists()
    assert read_conf_dir(host.conf).files_naming_us() == ["10-calico.conflist"]


def test_a_new_primary_network_moves_the_drop_in_and_cleans_the_old_one(host):
    calico = json.loads(host.put("10-calico.conflist"))
    agent = host.agent(chain_mode="dropin")
    agent.install()
    assert agent.reconcile() and dropin_path(host, calico["name"]).exists()
    os.unlink(host.conf / "10-calico.conflist")
    flannel = json.loads(host.put("05-cilium.conflist"))
    assert flannel["name"] != calico["name"]
    assert agent.reconcile()
    assert dropin_path(host, flannel["name"]).exists()
    assert not (host.conf / calico["name"]).exists(), "the old network's drop-in and its folder are gone"


def test_uninstall_leaves_the_conf_dir_as_it_was_and_keeps_an_admins_drop_in(host):
    host.put("10-calico.conflist")
    (host.conf / "k8s-pod-network").mkdir()
    (host.conf / "k8s-pod-network" / "50-admin.conf").write_text('{"type": "tuning"}')
    before = snapshot_of(host.conf)
    agent = host.agent(chain_mode="dropin")
    agent.install()
    assert agent.reconcile()
    assert leftovers(host.bin, host.conf)[0]
    assert host.uninstall() == []
    assert snapshot_of(host.conf) == before and sorted(os.listdir(host.conf)) == [
        "10-calico.conflist",
        "k8s-pod-network",
    ]
    assert leftovers(host.bin, host.conf) == ([], [])


@pytest.mark.parametrize(
    ("runtime", "version", "loads"),
    [
        ("containerd", "v2.4.2", True),
        ("containerd", "v2.1.0", True),
        ("containerd", "2.1.0-rc.1", True),
        ("containerd", "v2.0.5", False),
        ("containerd", "1.6.20~ds1", False),
        ("containerd", "1.7.24", False),
        ("cri-o", "1.33.0", True),
        ("cri-o", "1.32.4", False),
        ("docker", "28.2.2", False),
        ("containerd", "devel", False),
    ],
)
def test_which_runtimes_load_drop_ins(runtime, version, loads):
    assert loads_dropins(runtime, version) is loads


def test_auto_asks_the_runtime_and_edits_when_it_cannot_tell():
    assert choose_mode("auto", lambda: ("containerd", "v2.4.2")).mode == ChainMode.DROPIN
    assert choose_mode("auto", lambda: ("containerd", "1.6.20~ds1")).mode == ChainMode.EDIT

    def unreachable() -> tuple[str, str]:
        raise OSError("no CRI socket")

    choice = choose_mode("auto", unreachable)
    assert choice.mode == ChainMode.EDIT and "no CRI socket" in choice.why
    assert choose_mode("dropin", unreachable).mode == ChainMode.DROPIN
    assert choose_mode("edit", unreachable).mode == ChainMode.EDIT


def test_doctor_and_inspect_say_which_mode_the_node_is_in(host):
    host.put("10-calico.conflist")
    agent = host.agent(chain_mode="dropin")
    agent.install()
    assert agent.reconcile()
    assert read_conf_dir(host.conf).describe_mode() == (
        f"drop-in: k8s-pod-network/{DROPIN_NAME}, 10-calico.conflist untouched"
    )
    assert node_findings(host.conf) == [], "a healthy drop-in is no finding"
    plugin = json.loads(dropin_path(host).read_text())
    del plugin["capabilities"]
    dropin_path(host).write_text(json.dumps(plugin))
    (finding,) = node_findings(host.conf)
    assert finding.check == "capability" and DROPIN_NAME in finding.message
