"""Chaining our entry into a temp node's CNI configs: goldens, adoption, races, symlinks, uninstall."""

from __future__ import annotations

import json
import os

import pytest

from cni_redirect.errors import SettingsError
from cni_redirect.node.chaining import conflists
from cni_redirect.node.chaining.chain import BACKUP_PREFIX, load_entry_settings
from cni_redirect.node.chaining.confdir import read_conf_dir
from tests.support import NODE_SETTINGS as SETTINGS
from tests.support import PRIMARY_DIR, TESTS

GOLDEN_DIR = TESTS / "golden" / "install"
PRIMARIES = sorted(p.name for p in PRIMARY_DIR.iterdir())
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def _installed_name(name: str) -> str:
    return conflists.conflist_name(name) if name.endswith(".conf") else name


@pytest.mark.parametrize("name", PRIMARIES)
def test_install_then_uninstall_every_primary_golden(host, name):
    original = host.put(name)
    installer = host.agent()
    installer.install()
    assert installer.reconcile()
    installed = host.conf / _installed_name(name)
    golden = GOLDEN_DIR / f"{name}.installed"
    if UPDATE:
        golden.write_bytes(installed.read_bytes())
    assert installed.read_bytes() == golden.read_bytes(), f"{golden.name} changed: UPDATE_GOLDEN=1 and review"
    assert len(host.entries(installed.name)) == 1 and host.entries(installed.name)[0]["defaults"]["proxy-uid"] == "1337"
    assert json.loads(installed.read_text())["plugins"][-1]["type"] == "cni-redirect"

    host.uninstall()
    assert sorted(os.listdir(host.conf)) == [name]
    document, _ = conflists.parse(name, original)
    if conflists.names_us(document):  # a stale entry of ours: restoring it byte for byte would break every pod
        assert (host.conf / name).read_bytes() == conflists.render(conflists.without_entry(document))
    else:
        assert (host.conf / name).read_bytes() == original
    assert sorted(os.listdir(host.bin)) == ["bridge"]


def test_no_orphaned_install_golden():
    assert {p.name for p in GOLDEN_DIR.iterdir()} == {f"{n}.installed" for n in PRIMARIES}


def test_reconcile_writes_only_when_something_changed(host):
    host.put("10-calico.conflist")
    installer = host.agent()
    installer.install()
    installer.reconcile()
    stat = (host.conf / "10-calico.conflist").stat()
    for _ in range(5):
        assert installer.reconcile()
    again = (host.conf / "10-calico.conflist").stat()
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_restarted_agent_adopts_its_entry_and_still_restores_exact_bytes(host):
    original = host.put("10-flannel.conflist")
    first = host.agent()
    first.install()
    first.reconcile()
    written = (host.conf / "10-flannel.conflist").read_bytes()
    second = host.agent()  # a new agent process: no memory of the first
    second.install()
    assert second.reconcile()
    assert (host.conf / "10-flannel.conflist").read_bytes() == written
    host.uninstall()
    assert (host.conf / "10-flannel.conflist").read_bytes() == original


def test_stale_entry_is_replaced_never_duplicated(host):
    host.put("20-stale-entry.conflist")
    installer = host.agent()
    installer.install()
    installer.reconcile()
    (entry,) = host.entries("20-stale-entry.conflist")
    assert entry["defaults"] == {"proxy-uid": "1337"}
    plugins = json.loads((host.conf / "20-stale-entry.conflist").read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["ptp", "tuning", "cni-redirect"]


def test_configured_conf_file_wins_over_lexical_order(host):
    host.put("05-cilium.conflist")
    host.put("10-calico.conflist")
    installer = host.agent(conf_file="10-calico.conflist")
    installer.install()
    installer.reconcile()
    assert host.entries("10-calico.conflist") and not host.entries("05-cilium.conflist")


def test_lexically_first_config_is_the_primary(host):
    host.put("10-calico.conflist")
    host.put("05-cilium.conflist")
    installer = host.agent()
    installer.install()
    installer.reconcile()
    assert host.entries("05-cilium.conflist") and not host.entries("10-calico.conflist")


def test_backup_is_never_taken_for_a_config(host):
    host.put("10-legacy-bridge.conf")
    installer = host.agent()
    installer.install()
    installer.reconcile()
    names = os.listdir(host.conf)
    backups = [n for n in names if n.startswith(BACKUP_PREFIX)]
    assert backups and all(not n.endswith(conflists.CONF_SUFFIXES) for n in backups)
    assert conflists.pick_primary(names) == "10-legacy-bridge.conflist"


def test_invalid_primary_is_left_untouched_and_retried(host):
    broken = host.put("10-calico.conflist", b'{"cniVersion": "0.3.1", "plugins": [ {"type": "calico"')
    installer = host.agent()
    installer.install()
    assert not installer.reconcile()
    assert (host.conf / "10-calico.conflist").read_bytes() == broken
    assert "not valid JSON" in installer.ready_reason
    errors = [e for e in host.events() if e["level"] == "error"]
    assert len(errors) == 1 and "10-calico.conflist" in errors[0]["msg"]
    assert not installer.reconcile()
    assert len([e for e in host.events() if e["level"] == "error"]) == 1, "the same problem is logged once"
    host.put("10-calico.conflist")
    assert installer.reconcile() and host.entries("10-calico.conflist")


def test_symlinked_primary_inside_conf_dir_is_edited_through_the_link(host):
    real = host.conf / "..data"
    real.mkdir()
    original = (PRIMARY_DIR / "10-calico.conflist").read_bytes()
    (real / "10-calico.conflist").write_bytes(original)
    (host.conf / "10-calico.conflist").symlink_to("..data/10-calico.conflist")
    installer = host.agent()
    installer.install()
    assert installer.reconcile()
    assert (host.conf / "10-calico.conflist").is_symlink(), "the link is kept"
    assert host.entries("10-calico.conflist")
    host.uninstall()
    assert (host.conf / "10-calico.conflist").is_symlink()
    assert (real / "10-calico.conflist").read_bytes() == original


def test_symlinked_primary_pointing_outside_is_left_untouched(host, tmp_path):
    outside = tmp_path / "elsewhere.conflist"
    original = outside.write_bytes((PRIMARY_DIR / "10-flannel.conflist").read_bytes()) and outside.read_bytes()
    (host.conf / "10-flannel.conflist").symlink_to(outside)
    installer = host.agent()
    installer.install()
    assert not installer.reconcile()
    assert "outside --cni-conf-dir" in installer.ready_reason
    assert outside.read_bytes() == original and (host.conf / "10-flannel.conflist").is_symlink()


def test_an_edit_the_primary_makes_while_we_write_is_not_overwritten(host, monkeypatch):
    from cni_redirect.node.files import Folder

    original = host.put("10-calico.conflist")
    installer = host.agent()
    installer.install()
    edited = original.replace(b'"mtu": 0', b'"mtu": 1450')
    real_write = Folder.write_atomic

    def primary_edits_first(self, name, data, mode=None, expect=None, held=None):
        if expect is not None:  # just before our rename of the primary's file
            (host.conf / "10-calico.conflist").write_bytes(edited)
        return real_write(self, name, data, mode, expect, held)

    monkeypatch.setattr(Folder, "write_atomic", primary_edits_first)
    assert not installer.reconcile(), "the pass that lost the race does not claim readiness"
    assert (host.conf / "10-calico.conflist").read_bytes() == edited
    monkeypatch.setattr(Folder, "write_atomic", real_write)
    assert installer.reconcile()
    document = json.loads((host.conf / "10-calico.conflist").read_text())
    assert document["plugins"][0]["mtu"] == 1450 and host.entries("10-calico.conflist")
    host.uninstall()
    assert (host.conf / "10-calico.conflist").read_bytes() == edited


def test_load_entry_validates_the_admins_settings(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(SETTINGS))
    assert load_entry_settings(good)["capabilities"] == {"io.kubernetes.cri.pod-annotations": True}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"defaults": {"proxy-uid": "0"}}))
    with pytest.raises(SettingsError, match="allow_root_proxy_uid"):
        load_entry_settings(bad)


def test_uninstall_keeps_what_another_installer_added_and_drops_only_our_entry(host):
    """[calico] -> [calico, us] -> another installer appends itself after us -> uninstall -> [calico, other]."""
    host.put("10-calico.conflist")
    installer = host.agent()
    installer.install()
    assert installer.reconcile()
    document = json.loads((host.conf / "10-calico.conflist").read_text())
    document["plugins"].append({"type": "other-chained", "x": 1})
    (host.conf / "10-calico.conflist").write_text(json.dumps(document))  # keeps our entry, not last any more
    assert installer.reconcile()
    assert [p["type"] for p in json.loads((host.conf / "10-calico.conflist").read_text())["plugins"]][-2:] == [
        "other-chained",
        "cni-redirect",
    ]
    host.uninstall()
    plugins = json.loads((host.conf / "10-calico.conflist").read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["calico", "portmap", "bandwidth", "other-chained"]
    assert not read_conf_dir(host.conf).files_naming_us()
    assert sorted(os.listdir(host.bin)) == ["bridge"]


def test_the_binary_stays_while_any_config_still_names_us(host):
    host.put("10-calico.conflist")
    someone_elses = {"cniVersion": "1.0.0", "name": "extra", "plugins": [{"type": "bridge"}, {"type": "cni-redirect"}]}
    (host.conf / "99-extra.conflist").write_text(json.dumps(someone_elses))
    installer = host.agent()
    installer.install()
    assert installer.reconcile()
    host.uninstall()
    assert "cni-redirect" not in (host.conf / "10-calico.conflist").read_text()
    assert (host.bin / "cni-redirect").exists(), "99-extra.conflist still execs cni-redirect"
    assert any(e["msg"].startswith("left the plugin in the bin dir") for e in host.events())


def test_uninstall_keeps_the_file_mode_when_the_primary_changed_the_file(host):
    original = host.put("10-calico.conflist")
    os.chmod(host.conf / "10-calico.conflist", 0o600)
    installer = host.agent()
    installer.install()
    assert installer.reconcile()
    edited = json.loads((host.conf / "10-calico.conflist").read_text())
    edited["plugins"][0]["mtu"] = 1400  # the primary rewrote its file in place (mode kept)
    (host.conf / "10-calico.conflist").write_text(json.dumps(edited))
    host.uninstall()
    path = host.conf / "10-calico.conflist"
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["plugins"][0]["mtu"] == 1400 and "cni-redirect" not in path.read_text()
    assert original


def test_a_conf_is_never_converted_over_a_conflist_we_did_not_write(host):
    conf = host.put("10-net.conf", b'{"cniVersion": "0.4.0", "name": "net", "type": "bridge"}')
    conflist = host.put("10-net.conflist", (PRIMARY_DIR / "10-flannel.conflist").read_bytes())
    installer = host.agent()
    installer.install()
    assert not installer.reconcile()
    assert "would overwrite 10-net.conflist" in installer.ready_reason
    assert (host.conf / "10-net.conf").read_bytes() == conf and (host.conf / "10-net.conflist").read_bytes() == conflist
    host.uninstall()
    assert (host.conf / "10-net.conflist").read_bytes() == conflist, "uninstall deletes nothing it did not write"
    assert sorted(os.listdir(host.conf)) == ["10-net.conf", "10-net.conflist"]


def test_a_malformed_first_file_says_what_crio_would_use_instead(host):
    host.put("05-broken.conflist", b'{"cniVersion": "1.0.0", "plugins": [')
    host.put("10-calico.conflist")
    installer = host.agent()
    installer.install()
    assert not installer.reconcile()
    assert "CRI-O skips an invalid file and would start pods with 10-calico.conflist" in installer.ready_reason
    assert "cni-redirect" not in (host.conf / "10-calico.conflist").read_text()


def test_another_valid_network_is_a_warning_and_conf_file_silences_it(host):
    host.put("10-calico.conflist")
    host.put("20-stale-entry.conflist")
    installer = host.agent()
    installer.install()
    assert installer.reconcile()
    assert "other network configs exist (20-stale-entry.conflist)" in installer.chain.warning
    assert [e["msg"] for e in host.events()].count(installer.chain.warning) == 1
    assert installer.reconcile() and [e["msg"] for e in host.events()].count(installer.chain.warning) == 1, "once"
    pinned = host.agent(conf_file="10-calico.conflist")
    assert pinned.reconcile() and pinned.chain.warning == ""


def test_restart_then_uninstall_restores_a_converted_conf(host):
    """The agent turned a .conf into a .conflist, then restarted: uninstall still brings the .conf back."""
    original = host.put("10-legacy-bridge.conf")
    first = host.agent()
    first.install()
    first.reconcile()
    assert sorted(p.name for p in host.conf.iterdir() if not p.name.startswith(".")) == ["10-legacy-bridge.conflist"]
    second = host.agent()  # restarted: no memory of the conversion
    second.install()
    assert second.reconcile()
    host.uninstall()
    assert sorted(p.name for p in host.conf.iterdir()) == ["10-legacy-bridge.conf"], "no .conflist, no backup left"
    assert (host.conf / "10-legacy-bridge.conf").read_bytes() == original


def test_an_upgrade_that_changes_the_entry_keeps_the_primarys_bytes(host):
    """A new version with other entry settings: uninstall still restores what the primary wrote, byte for byte."""
    from cni_redirect.logs import JsonLog
    from cni_redirect.node.agent.daemon import NodeAgent

    document = json.loads((PRIMARY_DIR / "10-flannel.conflist").read_text())
    original = host.put("10-flannel.conflist", json.dumps(document, indent=3).encode() + b"\n\n")  # its own style
    old = host.agent()
    old.install()
    old.reconcile()
    settings = {**SETTINGS, "defaults": {"proxy-uid": "2000"}}
    new = NodeAgent(host.options(), JsonLog(host.log), conflists.entry(settings))
    new.install()
    assert new.reconcile()
    assert host.entries("10-flannel.conflist")[0]["defaults"] == {"proxy-uid": "2000"}
    host.uninstall()
    assert (host.conf / "10-flannel.conflist").read_bytes() == original


@pytest.mark.parametrize("old", ["10-flannel.conflist", "10-legacy-bridge.conf"])
@pytest.mark.parametrize("flannel_file", ["kept", "removed"])
def test_a_new_primary_cleans_the_former_ones_entry_and_backup(host, old, flannel_file):
    """flannel to Calico: Calico's conflist sorts first and becomes the primary; the file we edited before gets
    its exact bytes back (or is gone with its backup), and uninstall completes."""
    flannel = host.put(old)
    installer = host.agent()
    installer.install()
    assert installer.reconcile()
    if flannel_file == "removed":
        os.unlink(host.conf / _installed_name(old))
    calico = host.put("05-cilium.conflist")
    assert installer.reconcile() and host.entries("05-cilium.conflist")
    names = sorted(os.listdir(host.conf))
    assert not [n for n in names if n.startswith(BACKUP_PREFIX) and "cilium" not in n], names
    if flannel_file == "kept":
        assert (host.conf / old).read_bytes() == flannel, "the former primary's exact bytes"
        assert old == _installed_name(old) or not (host.conf / _installed_name(old)).exists(), "a conversion undone"
    assert read_conf_dir(host.conf).files_naming_us() == ["05-cilium.conflist"]
    assert host.uninstall() == []
    assert (host.conf / "05-cilium.conflist").read_bytes() == calico
    assert not [n for n in os.listdir(host.conf) if n.startswith(".cni-redirect")]
