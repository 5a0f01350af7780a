"""One pod per mesh profile through a real containerd: annotated as the mesh's injector annotates it, captured,
and the mesh's own validator passes in the sandbox containerd made: Istio's real one (pilot-agent istio-iptables
--run-validation, built by scripts/peers.sh), and our reproductions of both (Linkerd's real one is not built here:
see docs/mesh-profiles.md)."""

from __future__ import annotations

import contextlib
import time

import pytest

from cni_redirect.testing.containerd import GATEWAY
from cni_redirect.testing.istio import run_validation
from cni_redirect.testing.netlab import HOST, Netns, connect, validate
from tests.support import injected


def captured(containerd, annotations: dict[str, str]) -> bool:
    """Run a throwaway pod: did the plugin capture it?"""
    pod = containerd.run_pod(f"probe-{time.monotonic_ns()}", annotations=annotations)
    try:
        return any(e.get("outcome") == "captured" for e in containerd.runtime.events(pod))
    finally:
        containerd.stop_pod(pod)
        containerd.remove_pod(pod)


def wait_until(containerd, annotations: dict[str, str], expect: bool, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if captured(containerd, annotations) == expect:
            return
        time.sleep(0.5)
    raise AssertionError(f"containerd did not reload its conflist (expecting captured={expect})")


@contextlib.contextmanager
def profile(containerd, mesh: str):
    """The node's entry switched to a mesh profile for the block; containerd reloads it live."""
    runtime = containerd.runtime
    runtime.write_conflist(runtime.conflist(profile=mesh))
    wait_until(containerd, injected(mesh), expect=True)
    try:
        yield
    finally:
        runtime.write_conflist(runtime.conflist())
        wait_until(containerd, injected(mesh), expect=False)  # our default entry ignores the mesh's annotations


@pytest.mark.parametrize("mesh", ["istio", "linkerd"])
def test_a_pod_injected_by_the_mesh_is_captured_and_its_validator_passes(containerd, procs, mesh):
    with profile(containerd, mesh):
        pod = containerd.run_pod(f"{mesh}-app", annotations=injected(mesh))
        netns = Netns.at(containerd.netns(pod))
        listing = netns.run("nft", "list", "table", "inet", "cni_redirect").stdout
        if mesh == "istio":
            real = run_validation(netns.path, injected(mesh))  # Istio's own: pilot-agent istio-iptables
            assert real.returncode == 0 and "Validation passed" in real.stdout + real.stderr, real.stdout[-2000:]
            rc, report = validate(netns, "istio", uid=1337)  # our reproduction, kept beside it
            assert (rc, report.get("original_port")) == (0, 15002), report
            assert "15008" in listing and "15090" in listing  # Istio's always-excluded inbound ports
            proxy_port, proxy_uid = 15001, 1337
        else:
            rc, report = validate(netns, "linkerd", uid=65534)
            assert (rc, report.get("token_echoed")) == (0, True), report
            assert "4190-4191" in listing
            proxy_port, proxy_uid = 4140, 2102
        procs.listen(netns, "proxy-out", proxy_port, uid=proxy_uid)
        procs.listen(HOST, "host-peer", 18090, bind=GATEWAY)
        answer = connect(netns, GATEWAY, 18090, uid=1000)
        assert (answer["listener"], answer["original_dst"]) == ("proxy-out", f"{GATEWAY}:18090")
        assert connect(netns, GATEWAY, 18090, uid=proxy_uid)["listener"] == "host-peer"
        (add,) = [e for e in containerd.runtime.events(pod) if e["command"] == "ADD"]
        assert add["outcome"] == "captured"
        containerd.stop_pod(pod)
        containerd.remove_pod(pod)
