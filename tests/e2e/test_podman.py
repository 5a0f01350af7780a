"""podman's CNI backend end to end: no annotations, so the conflist's defaults decide."""

from __future__ import annotations

import itertools
import subprocess

import pytest

from cni_redirect.testing.netlab import HOST, Netns, connect

PROXY_UID = 1337
APP_UID = 1000
_subnets = itertools.count(10)


def network(podman, cni_version: str | None = None, **entry) -> tuple[str, str]:
    index = next(_subnets)
    name = f"cnirpm{index}"
    podman.create_network(name, f"10.98.{index}.0/24", cni_version=cni_version, **entry)
    return name, f"10.98.{index}.1"


def run_container(podman, net: str, name: str) -> subprocess.CompletedProcess:
    return podman.podman("run", "-d", "--name", name, "--network", net, "localhost/cnir-busybox:e2e", "sleep", "600")


@pytest.mark.parametrize("cni_version", ["0.4.0", "1.0.0"])
def test_defaults_capture_a_containers_traffic_and_rm_deletes(podman, procs, cni_version):
    net, gateway = network(podman, cni_version=cni_version, defaults={"enabled": "true", "proxy-uid": "1337"})
    name = f"captured-{cni_version.replace('.', '')}"
    container_id = run_container(podman, net, name).stdout.strip()
    netns = Netns.at(podman.sandbox(name))
    assert "table inet cni_redirect" in netns.ruleset()

    port = 18090 + int(cni_version[0])
    procs.listen(netns, "proxy-out", 15001, uid=PROXY_UID)
    procs.listen(HOST, "host-peer", port, bind=gateway)
    answer = connect(netns, gateway, port, uid=APP_UID)
    assert (answer["listener"], answer["original_dst"]) == ("proxy-out", f"{gateway}:{port}")
    assert connect(netns, gateway, port, uid=PROXY_UID)["listener"] == "host-peer"

    (add,) = [e for e in podman.events(container_id) if e["command"] == "ADD"]
    assert add["outcome"] == "captured" and "exclude_namespaces does not apply" in add["note"]

    procs.stop()
    podman.podman("rm", "--force", "--time", "0", name)
    dels = [e for e in podman.events(container_id) if e["command"] == "DEL"]
    assert dels and dels[0]["outcome"] == "removed table"
    assert all(e["outcome"] != "error" for e in dels)


def test_run_rm_cleanup_process_runs_del(podman):
    net, _ = network(podman, defaults={"enabled": "true"})
    run = podman.podman("run", "--rm", "--network", net, "localhost/cnir-busybox:e2e", "true")
    assert run.returncode == 0
    commands = [(e["command"], e["outcome"]) for e in podman.all_events()]
    assert ("DEL", "removed table") in commands


def test_bad_default_fails_podman_run_with_our_message(podman):
    net, _ = network(podman, defaults={"enabled": "true", "proxy-uid": "envoy"})
    run = podman.podman(
        "run", "-d", "--name", "broken", "--network", net, "localhost/cnir-busybox:e2e", "sleep", "600", check=False
    )
    assert run.returncode != 0
    assert 'conflist defaults.proxy-uid: invalid value "envoy"' in run.stderr
    running = podman.podman("ps", "--format", "{{.Names}}").stdout.split()
    assert "broken" not in running
    events = podman.all_events()
    failed = [i for i, e in enumerate(events) if e["command"] == "ADD" and e["outcome"] == "error"]
    assert failed, "the failed ADD was not logged"
    after = [e for e in events[failed[-1] + 1 :] if e["command"] == "DEL"]
    assert after and all(e["outcome"] != "error" for e in after), (
        "DEL without prevResult after a failed ADD must succeed"
    )
    podman.podman("rm", "--force", "--time", "0", "broken", check=False)


def test_disabled_default_leaves_no_table(podman):
    net, _ = network(podman, defaults={"enabled": "false"})
    run_container(podman, net, "plain")
    assert "cni_redirect" not in Netns.at(podman.sandbox("plain")).ruleset()
    podman.podman("rm", "--force", "--time", "0", "plain")
