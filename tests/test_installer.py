"""The node agent against a temp "host": binaries, conflist edits, watching, uninstall, faults."""

from __future__ import annotations

import io
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cni_redirect import conflists
from cni_redirect.installer import BACKUP_PREFIX, BUNDLE_PREFIX, Installer, JsonLog, Options, load_entry, run

PRIMARY_DIR = Path(__file__).resolve().parents[1] / "conflist" / "primary"
GOLDEN_DIR = Path(__file__).resolve().parent / "golden" / "install"
PRIMARIES = sorted(p.name for p in PRIMARY_DIR.iterdir())
SETTINGS = {"defaults": {"proxy-uid": "1337"}, "exclude_namespaces": ["kube-system", "istio-system"]}
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


class Host:
    """A temp node: CNI bin and conf dirs, and a plugin bundle to install."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "opt-cni-bin"
        self.conf = root / "etc-cni-net.d"
        self.bundle = root / "bundle" / "cni-redirect"
        for path in (self.bin, self.conf, self.bundle / "_internal"):
            path.mkdir(parents=True)
        (self.bin / "bridge").write_text("#!/bin/sh\n")
        self.set_bundle_version("v1")
        self.log = io.StringIO()

    def set_bundle_version(self, version: str) -> None:
        exe = self.bundle / "cni-redirect"
        exe.write_text(f"#!/bin/sh\necho {version}\n")
        exe.chmod(0o755)
        (self.bundle / "_internal" / "lib.txt").write_text(version)

    def options(self, **overrides) -> Options:
        base = dict(
            cni_bin_dir=self.bin,
            cni_conf_dir=self.conf,
            plugin_source=self.bundle,
            poll_interval=0.02,
            uninstall_grace=0.0,
            wait_log_interval=0.1,
        )
        return Options(**{**base, **overrides})

    def installer(self, **overrides) -> Installer:
        return Installer(self.options(**overrides), JsonLog(self.log), conflists.entry(SETTINGS))

    def put(self, name: str, data: bytes | None = None) -> bytes:
        data = data if data is not None else (PRIMARY_DIR / name).read_bytes()
        (self.conf / name).write_bytes(data)
        return data

    def entries(self, name: str) -> list[dict]:
        document = json.loads((self.conf / name).read_text())
        return [p for p in document["plugins"] if p["type"] == "cni-redirect"]

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]


@pytest.fixture
def host(tmp_path) -> Host:
    return Host(tmp_path)


def _installed_name(name: str) -> str:
    return conflists.conflist_name(name) if name.endswith(".conf") else name


@pytest.mark.parametrize("name", PRIMARIES)
def test_install_then_uninstall_every_primary_golden(host, name):
    original = host.put(name)
    installer = host.installer()
    installer.install_binary()
    assert installer.reconcile()
    installed = host.conf / _installed_name(name)
    golden = GOLDEN_DIR / f"{name}.installed"
    if UPDATE:
        golden.write_bytes(installed.read_bytes())
    assert installed.read_bytes() == golden.read_bytes(), f"{golden.name} changed: UPDATE_GOLDEN=1 and review"
    assert len(host.entries(installed.name)) == 1 and host.entries(installed.name)[0]["defaults"]["proxy-uid"] == "1337"
    assert json.loads(installed.read_text())["plugins"][-1]["type"] == "cni-redirect"

    installer.uninstall()
    assert sorted(os.listdir(host.conf)) == [name]
    assert (host.conf / name).read_bytes() == original
    assert sorted(os.listdir(host.bin)) == ["bridge"]


def test_no_orphaned_install_golden():
    assert {p.name for p in GOLDEN_DIR.iterdir()} == {f"{n}.installed" for n in PRIMARIES}


def test_reconcile_writes_only_when_something_changed(host):
    host.put("10-calico.conflist")
    installer = host.installer()
    installer.install_binary()
    installer.reconcile()
    stat = (host.conf / "10-calico.conflist").stat()
    for _ in range(5):
        assert installer.reconcile()
    again = (host.conf / "10-calico.conflist").stat()
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_restarted_agent_adopts_its_entry_and_still_restores_exact_bytes(host):
    original = host.put("10-flannel.conflist")
    first = host.installer()
    first.install_binary()
    first.reconcile()
    written = (host.conf / "10-flannel.conflist").read_bytes()
    second = host.installer()  # a new agent process: no memory of the first
    second.install_binary()
    assert second.reconcile()
    assert (host.conf / "10-flannel.conflist").read_bytes() == written
    second.uninstall()
    assert (host.conf / "10-flannel.conflist").read_bytes() == original


def test_stale_entry_is_replaced_never_duplicated(host):
    host.put("20-stale-entry.conflist")
    installer = host.installer()
    installer.install_binary()
    installer.reconcile()
    (entry,) = host.entries("20-stale-entry.conflist")
    assert entry["defaults"] == {"proxy-uid": "1337"}
    plugins = json.loads((host.conf / "20-stale-entry.conflist").read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["ptp", "tuning", "cni-redirect"]


def test_configured_conf_file_wins_over_lexical_order(host):
    host.put("05-cilium.conflist")
    host.put("10-calico.conflist")
    installer = host.installer(conf_file="10-calico.conflist")
    installer.install_binary()
    installer.reconcile()
    assert host.entries("10-calico.conflist") and not host.entries("05-cilium.conflist")


def test_lexically_first_config_is_the_primary(host):
    host.put("10-calico.conflist")
    host.put("05-cilium.conflist")
    installer = host.installer()
    installer.install_binary()
    installer.reconcile()
    assert host.entries("05-cilium.conflist") and not host.entries("10-calico.conflist")


def test_backup_is_never_taken_for_a_config(host):
    host.put("10-legacy-bridge.conf")
    installer = host.installer()
    installer.install_binary()
    installer.reconcile()
    names = os.listdir(host.conf)
    backups = [n for n in names if n.startswith(BACKUP_PREFIX)]
    assert backups and all(not n.endswith(conflists.CONF_SUFFIXES) for n in backups)
    assert conflists.pick_primary(names) == "10-legacy-bridge.conflist"


def test_bundle_install_is_versioned_linked_and_keeps_one_previous(host):
    installer = host.installer()
    installer.install_binary()
    link = host.bin / "cni-redirect"
    assert link.is_symlink() and subprocess.run([str(link)], capture_output=True, text=True).stdout == "v1\n"
    v1 = os.readlink(link)
    installer.install_binary()  # same content: nothing copied, same link
    assert os.readlink(link) == v1
    host.set_bundle_version("v2")
    installer.install_binary()
    assert subprocess.run([str(link)], capture_output=True, text=True).stdout == "v2\n"
    host.set_bundle_version("v3")
    installer.install_binary()
    bundles = sorted(p.name for p in host.bin.glob(f"{BUNDLE_PREFIX}*"))
    assert len(bundles) == 2, "current and previous only"
    assert not [p for p in host.bin.iterdir() if ".tmp-" in p.name or ".link-" in p.name]


def test_single_file_plugin_source(host):
    single = host.root / "cni-redirect-single"
    single.write_text("#!/bin/sh\necho single\n")
    installer = host.installer(plugin_source=single)
    installer.install_binary()
    target = host.bin / "cni-redirect"
    assert not target.is_symlink() and os.access(target, os.X_OK)
    assert subprocess.run([str(target)], capture_output=True, text=True).stdout == "single\n"


def test_deleted_binary_is_reinstalled(host):
    host.put("10-calico.conflist")
    installer = host.installer()
    installer.install_binary()
    installer.reconcile()
    (host.bin / "cni-redirect").unlink()
    assert installer.reconcile()
    assert os.access(host.bin / "cni-redirect", os.X_OK)


def test_invalid_primary_is_left_untouched_and_retried(host):
    broken = host.put("10-calico.conflist", b'{"cniVersion": "0.3.1", "plugins": [ {"type": "calico"')
    installer = host.installer()
    installer.install_binary()
    assert not installer.reconcile()
    assert (host.conf / "10-calico.conflist").read_bytes() == broken
    assert "not valid JSON" in installer.ready_reason
    errors = [e for e in host.events() if e["level"] == "error"]
    assert len(errors) == 1 and "10-calico.conflist" in errors[0]["msg"]
    assert not installer.reconcile()
    assert len([e for e in host.events() if e["level"] == "error"]) == 1, "the same problem is logged once"
    host.put("10-calico.conflist")
    assert installer.reconcile() and host.entries("10-calico.conflist")


def test_load_entry_validates_the_admins_settings(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(SETTINGS))
    assert load_entry(good)["capabilities"] == {"io.kubernetes.cri.pod-annotations": True}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"defaults": {"proxy-uid": "0"}}))
    with pytest.raises(Exception, match="allow_root_proxy_uid"):
        load_entry(bad)


class Agent:
    """`run()` in a thread, as the DaemonSet runs it, stopped like SIGTERM would."""

    def __init__(self, host: Host, **overrides) -> None:
        self.stop = threading.Event()
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, args=(host.options(**overrides), JsonLog(host.log)))
        self.thread.start()

    def _run(self, options: Options, log: JsonLog) -> None:
        self.rc = run(options, log, self.stop)

    def terminate(self) -> int:
        self.stop.set()
        self.thread.join(timeout=30)
        return self.rc


def wait_for(predicate, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.005)
    raise AssertionError("condition not reached in time")


def test_agent_waits_for_primary_then_keeps_entry_through_50_rewrites(host, tmp_path):
    entry_file = tmp_path / "entry.json"
    entry_file.write_text(json.dumps(SETTINGS))
    agent = Agent(host, entry_file=entry_file)
    try:
        wait_for(lambda: any("waiting for the primary" in e["msg"] for e in host.events()))
        original = host.put("10-calico.conflist")
        wait_for(lambda: (host.conf / "10-calico.conflist").read_bytes() != original)
        latencies = []
        for index in range(50):
            document = json.loads(original)
            document["plugins"][0]["mtu"] = index  # the primary rewrites its own file, without our entry
            rewritten = json.dumps(document, indent=4).encode()
            host.put("10-calico.conflist", rewritten)
            latencies.append(wait_for(lambda: len(host.entries("10-calico.conflist")) == 1))
        final = json.loads((host.conf / "10-calico.conflist").read_text())
        assert len([p for p in final["plugins"] if p["type"] == "cni-redirect"]) == 1
        assert final["plugins"][0]["mtu"] == 49, "the primary's last write is kept"
        print(f"\n[installer] re-insert latency over 50 rewrites: max {max(latencies) * 1000:.0f} ms")

        def writes() -> int:
            return sum(1 for e in host.events() if e["msg"] == "added our entry to the primary CNI config")

        # One write for the first insert and one per rewrite; the log line follows the rename, so wait for it.
        wait_for(lambda: writes() == 51)
        time.sleep(0.3)
        assert writes() == 51, "no rewrite when nothing changed"
    finally:
        assert agent.terminate() == 0
    last = json.loads(original)
    last["plugins"][0]["mtu"] = 49
    assert (host.conf / "10-calico.conflist").read_bytes() == json.dumps(last, indent=4).encode()
    assert sorted(os.listdir(host.bin)) == ["bridge"]


def test_agent_readiness_endpoint(host):
    agent = Agent(host, readiness_port=18399)
    try:

        def status() -> int:
            try:
                return urllib.request.urlopen("http://127.0.0.1:18399/readyz", timeout=2).status
            except urllib.error.HTTPError as exc:
                return exc.code
            except OSError:
                return 0

        wait_for(lambda: status() == 503)
        host.put("10-flannel.conflist")
        wait_for(lambda: status() == 200)
        (host.conf / "10-flannel.conflist").write_text("{ broken")
        wait_for(lambda: status() == 503)
    finally:
        agent.terminate()


def test_agent_refuses_invalid_settings(host, tmp_path):
    entry_file = tmp_path / "entry.json"
    entry_file.write_text(json.dumps({"defaults": {"outbound-port": "http"}}))
    agent = Agent(host, entry_file=entry_file)
    assert agent.terminate() == 2
    (error,) = [e for e in host.events() if e["level"] == "error"]
    assert "outbound-port" in error["error"]
    assert sorted(os.listdir(host.bin)) == ["bridge"], "nothing installed"


def test_keep_on_exit_leaves_everything_in_place(host):
    host.put("10-calico.conflist")
    agent = Agent(host, uninstall_on_exit=False)
    wait_for(lambda: bool(host.entries("10-calico.conflist")))
    agent.terminate()
    assert host.entries("10-calico.conflist") and (host.bin / "cni-redirect").exists()


@pytest.fixture
def mounted(tmp_path):
    """Mount points under tmp_path for fault tests; always unmounted."""
    points: list[Path] = []

    def mount(*args: str, target: Path) -> Path:
        subprocess.run(["mount", *args, str(target)], check=True)
        points.append(target)
        return target

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_read_only_conf_dir_gives_a_clear_error_and_no_partial_file(host, mounted):
    original = host.put("10-calico.conflist")
    mounted("--bind", str(host.conf), target=host.conf)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(host.conf)], check=True)
    installer = host.installer()
    installer.install_binary()
    assert not installer.reconcile()
    assert "cannot write into --cni-conf-dir" in installer.ready_reason
    assert "Read-only file system" in installer.ready_reason
    assert os.listdir(host.conf) == ["10-calico.conflist"]
    assert (host.conf / "10-calico.conflist").read_bytes() == original


def test_full_conf_dir_gives_a_clear_error_and_no_truncated_file(host, mounted):
    full = host.root / "full"
    full.mkdir()
    mounted("-t", "tmpfs", "-o", "size=64k", "tmpfs", target=full)
    original = (PRIMARY_DIR / "10-calico.conflist").read_bytes()
    (full / "10-calico.conflist").write_bytes(original)
    fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: the dir is full
    finally:
        os.close(fd)
    installer = host.installer(cni_conf_dir=full)
    installer.install_binary()
    assert not installer.reconcile()
    assert "No space left on device" in installer.ready_reason
    assert sorted(os.listdir(full)) == ["10-calico.conflist", "filler"]
    assert (full / "10-calico.conflist").read_bytes() == original


def test_symlinked_primary_inside_conf_dir_is_edited_through_the_link(host):
    real = host.conf / "..data"
    real.mkdir()
    original = (PRIMARY_DIR / "10-calico.conflist").read_bytes()
    (real / "10-calico.conflist").write_bytes(original)
    (host.conf / "10-calico.conflist").symlink_to("..data/10-calico.conflist")
    installer = host.installer()
    installer.install_binary()
    assert installer.reconcile()
    assert (host.conf / "10-calico.conflist").is_symlink(), "the link is kept"
    assert host.entries("10-calico.conflist")
    installer.uninstall()
    assert (host.conf / "10-calico.conflist").is_symlink()
    assert (real / "10-calico.conflist").read_bytes() == original


def test_symlinked_primary_pointing_outside_is_left_untouched(host, tmp_path):
    outside = tmp_path / "elsewhere.conflist"
    original = outside.write_bytes((PRIMARY_DIR / "10-flannel.conflist").read_bytes()) and outside.read_bytes()
    (host.conf / "10-flannel.conflist").symlink_to(outside)
    installer = host.installer()
    installer.install_binary()
    assert not installer.reconcile()
    assert "outside --cni-conf-dir" in installer.ready_reason
    assert outside.read_bytes() == original and (host.conf / "10-flannel.conflist").is_symlink()


def test_agent_socket_is_served_and_named_in_the_entry(host):
    socket_path = Path(f"/run/cni-redirect/installer-{os.getpid()}.sock")
    host.put("10-calico.conflist")
    agent = Agent(host, agent_socket=socket_path)
    try:
        wait_for(lambda: bool(host.entries("10-calico.conflist")))
        (entry,) = host.entries("10-calico.conflist")
        assert entry["agent_socket"] == str(socket_path)
        assert socket_path.is_socket() and (socket_path.stat().st_mode & 0o777) == 0o600
    finally:
        assert agent.terminate() == 0
    assert not socket_path.exists()


def test_agent_socket_outside_the_trusted_dir_is_refused(host):
    agent = Agent(host, agent_socket=Path("/tmp/agent.sock"))
    assert agent.terminate() == 2
    assert any("--agent-socket" in e.get("error", "") for e in host.events())


def test_an_edit_the_primary_makes_while_we_write_is_not_overwritten(host, monkeypatch):
    from cni_redirect import installer as installer_module

    original = host.put("10-calico.conflist")
    installer = host.installer()
    installer.install_binary()
    edited = original.replace(b'"mtu": 0', b'"mtu": 1450')
    real_write = installer_module.write_atomic

    def primary_edits_first(path, data, mode=0o644, expect=None):
        if expect is not None:  # just before our rename of the primary's file
            (host.conf / "10-calico.conflist").write_bytes(edited)
        return real_write(path, data, mode, expect)

    monkeypatch.setattr(installer_module, "write_atomic", primary_edits_first)
    assert not installer.reconcile(), "the pass that lost the race does not claim readiness"
    assert (host.conf / "10-calico.conflist").read_bytes() == edited
    monkeypatch.setattr(installer_module, "write_atomic", real_write)
    assert installer.reconcile()
    document = json.loads((host.conf / "10-calico.conflist").read_text())
    assert document["plugins"][0]["mtu"] == 1450 and host.entries("10-calico.conflist")
    installer.uninstall()
    assert (host.conf / "10-calico.conflist").read_bytes() == edited
