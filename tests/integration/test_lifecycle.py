"""ADD / CHECK / DEL against the real kernel, over every CNI version, plus input that must be refused."""

from __future__ import annotations

import json
import os

import pytest

from cni_redirect.result import SUPPORTED_VERSIONS
from cni_redirect.testing.netlab import POD_V4, enabled, plugin_conf, run_plugin

TABLE_LINE = "table inet cni_redirect"


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_add_check_del_roundtrip_every_version(pod, version):
    conf = plugin_conf(enabled(exclude_outbound_cidrs="10.0.0.0/8"), version=version)
    run = run_plugin("ADD", pod.path, conf)
    assert run.rc == 0, run.stdout + run.stderr
    result = run.json
    assert result["cniVersion"] == version
    assert result["ips"][0]["address"] == f"{POD_V4}/24"
    assert ("version" in result["ips"][0]) == (version < "1.0.0")
    assert pod.ruleset().count(TABLE_LINE) == 1

    check = run_plugin("CHECK", pod.path, conf)
    if version in ("0.3.0", "0.3.1"):
        assert check.rc == 1 and check.json["code"] == 1  # CHECK did not exist before 0.4.0
    else:
        assert check.rc == 0, check.stdout + check.stderr
        assert check.stdout == ""

    for _ in range(2):  # containerd sends DEL twice
        delete = run_plugin("DEL", pod.path, conf)
        assert delete.rc == 0, delete.stdout + delete.stderr
        assert delete.stdout == ""
    assert TABLE_LINE not in pod.ruleset()


def test_repeated_add_leaves_one_table_with_new_content(pod):
    assert run_plugin("ADD", pod.path, plugin_conf(enabled(exclude_outbound_ports="22"))).rc == 0
    first = pod.ruleset()
    assert run_plugin("ADD", pod.path, plugin_conf(enabled(exclude_outbound_ports="22"))).rc == 0
    assert pod.ruleset() == first
    assert run_plugin("ADD", pod.path, plugin_conf(enabled(exclude_outbound_ports="2222"))).rc == 0
    again = pod.ruleset()
    assert again.count(TABLE_LINE) == 1
    assert "2222" in again and "elements = { 22 }" not in again


def test_del_without_netns_and_after_netns_is_gone(pod):
    conf = plugin_conf(enabled())
    assert run_plugin("ADD", pod.path, conf).rc == 0
    assert run_plugin("DEL", "", plugin_conf(prev=False)).rc == 0
    pod.delete()
    gone = run_plugin("DEL", pod.path, conf)
    assert gone.rc == 0, gone.stdout + gone.stderr


def _tamper_and_check(pod, conf, *nft_command: str) -> dict:
    pod.run("nft", *nft_command)
    check = run_plugin("CHECK", pod.path, conf)
    assert check.rc == 1, f"CHECK missed drift after nft {' '.join(nft_command)}"
    return check.json


@pytest.mark.parametrize(
    "tamper",
    [
        ("delete", "element", "inet", "cni_redirect", "out_exclude_v4", "{ 10.0.0.0/8 }"),
        ("add", "element", "inet", "cni_redirect", "out_exclude_v4", "{ 192.168.0.0/16 }"),
        ("flush", "chain", "inet", "cni_redirect", "output"),
        ("add", "rule", "inet", "cni_redirect", "output", "meta", "skuid", "4242", "return"),
        ("insert", "rule", "inet", "cni_redirect", "prerouting", "tcp", "dport", "22", "return"),
        ("delete", "table", "inet", "cni_redirect"),
    ],
    ids=["missing-element", "extra-element", "flushed-chain", "appended-rule", "inserted-rule", "missing-table"],
)
def test_check_detects_drift(pod, tamper):
    conf = plugin_conf(enabled(exclude_outbound_cidrs="10.0.0.0/8"))
    assert run_plugin("ADD", pod.path, conf).rc == 0
    assert run_plugin("CHECK", pod.path, conf).rc == 0
    error = _tamper_and_check(pod, conf, *tamper)
    assert error["code"] == 999
    assert "table inet cni_redirect" in error["msg"]


def test_check_detects_changed_annotations_and_unwanted_table(pod):
    assert run_plugin("ADD", pod.path, plugin_conf(enabled(exclude_outbound_ports="22"))).rc == 0
    changed = run_plugin("CHECK", pod.path, plugin_conf(enabled(exclude_outbound_ports="23")))
    assert changed.rc == 1 and "differs" in changed.json["msg"]
    disabled = run_plugin("CHECK", pod.path, plugin_conf({"cni-redirect.io/enabled": "false"}))
    assert disabled.rc == 1 and "should not be captured" in disabled.json["msg"]


def test_bad_annotation_fails_with_code_7_and_no_table(pod):
    run = run_plugin("ADD", pod.path, plugin_conf(enabled(outbound_port="99999")))
    assert run.rc == 1
    error = run.json
    assert error["code"] == 7
    assert "cni-redirect.io/outbound-port" in error["msg"] and "99999" in error["msg"]
    assert set(error) == {"cniVersion", "code", "msg", "details"}
    assert TABLE_LINE not in pod.ruleset()


def test_failed_add_after_good_add_keeps_previous_table(pod):
    assert run_plugin("ADD", pod.path, plugin_conf(enabled())).rc == 0
    before = pod.ruleset()
    assert run_plugin("ADD", pod.path, plugin_conf(enabled(exclude_interfaces="bad/name"))).rc == 1
    assert pod.ruleset() == before


def test_add_refuses_host_netns(host_unchanged):
    run = run_plugin("ADD", f"/proc/{os.getpid()}/ns/net", plugin_conf(enabled()))
    assert run.rc == 1
    assert "host network namespace" in run.json["msg"]


@pytest.mark.parametrize("kind", ["missing", "regular-file", "directory", "mount-namespace"])
def test_add_refuses_what_is_not_a_pod_netns(tmp_path, host_unchanged, kind):
    path = {
        "missing": str(tmp_path / "nope"),
        "regular-file": str(tmp_path / "file"),
        "directory": str(tmp_path),
        "mount-namespace": "/proc/self/ns/mnt",
    }[kind]
    if kind == "regular-file":
        (tmp_path / "file").write_text("")
    run = run_plugin("ADD", path, plugin_conf(enabled()))
    assert run.rc == 1
    assert run.json["code"] == 4
    assert path in run.json["msg"]


def test_del_tolerates_unmounted_netns_file(tmp_path, host_unchanged):
    stale = tmp_path / "netns-file"
    stale.write_text("")  # what a bind-mount target looks like after the runtime unmounted it
    assert run_plugin("DEL", str(stale), plugin_conf(enabled())).rc == 0


def test_add_without_prev_result_is_refused(pod):
    run = run_plugin("ADD", pod.path, plugin_conf(enabled(), prev=False))
    assert run.rc == 1 and run.json["code"] == 7
    assert "chained plugin" in run.json["msg"]


def test_status_gc_and_version(pod):
    conf = plugin_conf(version="1.1.0", prev=False)
    status = run_plugin("STATUS", "", conf)
    assert (status.rc, status.stdout) == (0, "")
    gc = run_plugin("GC", "", {**conf, "cni.dev/valid-attachments": []})
    assert (gc.rc, gc.stdout) == (0, "")
    version = run_plugin("VERSION", "dummy", b'{"cniVersion":"0.4.0"}')
    assert version.rc == 0
    assert set(SUPPORTED_VERSIONS) <= set(version.json["supportedVersions"])


def test_log_file_gets_one_json_line_per_command(pod, tmp_path):
    log = tmp_path / "cni-redirect.log"
    conf = plugin_conf(enabled(), log_file=str(log))
    assert run_plugin("ADD", pod.path, conf).rc == 0
    assert run_plugin("ADD", pod.path, plugin_conf(enabled(dns_port="0"), log_file=str(log))).rc == 1
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["command"], e["outcome"]) for e in lines] == [("ADD", "captured"), ("ADD", "error")]
    assert lines[0]["pod"] == "default/demo" and lines[0]["duration_ms"] > 0
    assert "dns-port" in lines[1]["msg"]


def test_the_in_process_path_never_starts_a_program(pod):
    """pyroute2 left alone finds libc via ctypes.util.find_library, which runs ldconfig: we hand it libc."""
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "events = []\n"
        "launch = {'subprocess.Popen', 'os.posix_spawn', 'os.exec', 'os.fork', 'os.forkpty', 'os.system', 'os.spawn'}\n"
        "sys.addaudithook(lambda event, args: events.append((event, str(args)[:200])) if event in launch else None)\n"
        "from cni_redirect.plugin import run_in_process\n"
        "rc = run_in_process(sys.stdin.buffer.read())\n"
        "sys.stderr.write(f'EVENTS={events} RC={rc}')\n"
    )
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "audit", "CNI_NETNS": pod.path, "CNI_IFNAME": "eth0",
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(plugin_conf(enabled())).encode(), env=env, capture_output=True
    )
    assert b"RC=0" in proc.stderr, proc.stderr
    assert b"EVENTS=[]" in proc.stderr, proc.stderr
    assert "table inet cni_redirect" in pod.ruleset()
