"""doctor's checks on made-up processes and conf dirs (no root); tests/e2e/test_observe.py runs them for real."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from cni_redirect.backend import Observed
from cni_redirect.config import PodRef, parse_conf
from cni_redirect.evaluation import Outcome, compare
from cni_redirect.node.admin.doctor import TRAP, node_findings, pod_findings
from cni_redirect.node.pods.procs import Process
from cni_redirect.node.pods.survey import PodView
from cni_redirect.testing.netlab import enabled, plugin_conf
from tests.support import PRIMARY_DIR, decide


def view_for(netns, **annotations: str) -> PodView:
    evaluation = decide(parse_conf(plugin_conf(enabled(**annotations))), PodRef("default", "web", None))
    assert evaluation.ruleset is not None
    return PodView(
        "abc123",
        "default",
        "web",
        "u",
        enabled(**annotations),
        Outcome.CAPTURED,
        netns=str(netns),
        evaluation=evaluation,
        observed=Observed(evaluation.ruleset.objects()),  # the table as it should be: state ok
    )


def proc(pid: int, comm: str, uid: int, ppid: int = 1, listening=(), started: float = 100.0, netns: int = 0) -> Process:
    return Process(pid, ppid, comm, uid, uid, netns, started, set(listening))


@pytest.fixture
def netns_inode(tmp_path):
    """A file stands for the pod's netns: doctor finds the pod's processes by its inode, as by a real netns's."""
    path = tmp_path / "netns"
    path.write_text("")
    return path, path.stat().st_ino


@pytest.fixture
def pod(netns_inode):
    return lambda **annotations: view_for(netns_inode[0], **annotations)


@pytest.fixture
def in_pod(netns_inode):
    def members(*processes: Process) -> list[Process]:
        for process in processes:
            process.netns = netns_inode[1]
        return [*processes, proc(999, "elsewhere", 101)]  # another pod's process: never considered

    return members


def test_the_seeds_trap_nginx_and_envoy_both_as_uid_101(pod, in_pod):
    envoy = proc(10, "envoy", 101, listening={10000})
    nginx = proc(20, "nginx", 101, listening={80})
    findings = pod_findings(pod(proxy_uid="101", outbound_port="10000", inbound_port="10000"), in_pod(envoy, nginx), [])
    assert [(f.check, f.severity) for f in findings] == [("proxy-uid", TRAP)]
    assert findings[0].message.startswith("default/web: nginx (pid 20) runs as UID 101, the proxy UID")


def test_the_fix_nginx_on_its_own_uid(pod, in_pod):
    envoy = proc(10, "envoy", 101, listening={10000})
    nginx = proc(20, "nginx", 102, listening={80})
    assert (
        pod_findings(pod(proxy_uid="101", outbound_port="10000", inbound_port="10000"), in_pod(envoy, nginx), []) == []
    )


def test_what_the_proxy_starts_may_share_its_uid(pod, in_pod):
    envoy = proc(10, "envoy", 1337, listening={15001})
    worker = proc(11, "envoy-worker", 1337, ppid=10)
    grandchild = proc(12, "hot-restart", 1337, ppid=11)
    assert pod_findings(pod(), in_pod(envoy, worker, grandchild), []) == []


def test_the_proxy_gid_counts_too(pod, in_pod):
    envoy = proc(10, "envoy", 1337, listening={15001})
    app = Process(20, 1, "app", 1000, 1337, 0, 100.0)
    (finding,) = pod_findings(pod(proxy_gid="1337"), in_pod(envoy, app), [])
    assert "runs as GID 1337, the proxy GID" in finding.message


def test_no_proxy_listening_on_the_outbound_port(pod, in_pod):
    (finding,) = pod_findings(pod(), in_pod(proc(20, "app", 1000, listening={8080})), [])
    assert finding.check == "proxy" and "nothing listens on :15001 as the proxy UID 1337" in finding.message


def test_an_exempt_uid_that_outlives_the_init_containers(pod, in_pod):
    envoy = proc(10, "envoy", 1337, listening={15001})
    job = proc(20, "curl", 1000, started=100.0)
    view = pod(exclude_uids="1000")
    assert pod_findings(view, in_pod(envoy, job), [50.0]) == [], "no container started after it: an init container"
    (finding,) = pod_findings(view, in_pod(envoy, job), [150.0])
    assert finding.check == "exempt" and "curl (pid 20) runs as UID 1000, in exclude-uids" in finding.message


def test_a_port_of_the_proxy_taken_by_the_app(pod, in_pod):
    envoy = proc(10, "envoy", 1337, listening={15001})
    app = proc(20, "python3", 1000, listening={15006, 8080})
    (finding,) = pod_findings(pod(), in_pod(envoy, app), [])
    assert finding.check == "port" and "python3 (pid 20, UID 1000) listens on 15006" in finding.message


def test_a_missing_table_is_a_finding(pod, in_pod):
    view = pod()
    assert view.evaluation is not None
    view = replace(view, observed=Observed(None), drift=compare(view.evaluation, Observed(None)))
    assert view.state == "missing"
    (finding,) = pod_findings(view, in_pod(proc(10, "envoy", 1337, listening={15001})), [])
    assert finding.check == "table" and "is missing" in finding.message


def _conf_dir(tmp_path, entry: dict, extra_plugins=(), name="10-calico.conflist"):
    document = json.loads((PRIMARY_DIR / "10-calico.conflist").read_text())
    document["plugins"] += [entry, *extra_plugins]
    (tmp_path / name).write_text(json.dumps(document))
    return tmp_path


OURS = {"type": "cni-redirect", "capabilities": {"io.kubernetes.cri.pod-annotations": True}}


def test_a_healthy_node_has_no_finding(tmp_path):
    assert node_findings(_conf_dir(tmp_path, OURS)) == []


@pytest.mark.parametrize(
    ("entry", "extra", "check", "words"),
    [
        ({"type": "cni-redirect"}, (), "capability", "lacks"),
        (OURS, ({"type": "tuning"},), "last", "not last"),
        ({**OURS, "agent_socket": "/run/cni-redirect/nobody.sock"}, (), "cni-server", "does not answer"),
    ],
)
def test_node_traps(tmp_path, entry, extra, check, words):
    (finding,) = node_findings(_conf_dir(tmp_path, entry, extra))
    assert (finding.check, finding.severity) == (check, TRAP) and words in finding.message


def test_a_malformed_first_file_names_what_crio_would_use(tmp_path):
    _conf_dir(tmp_path, OURS)
    (tmp_path / "05-broken.conflist").write_text('{"plugins": [')
    (finding,) = node_findings(tmp_path)
    assert (
        finding.check == "conf-file"
        and "CRI-O skips an invalid file and would start pods with 10-calico" in finding.message
    )


def test_not_chained_at_all(tmp_path):
    (tmp_path / "10-calico.conflist").write_bytes((PRIMARY_DIR / "10-calico.conflist").read_bytes())
    (finding,) = node_findings(tmp_path)
    assert finding.check == "chained" and "not in 10-calico.conflist's chain" in finding.message


def test_what_a_pod_controls_reaches_the_terminal_escaped(pod, in_pod):
    """A process name is the pod's to choose: `\\x1b[2J\\x1b[8m` would clear the admin's screen and hide the rest."""
    envoy = proc(10, "envoy", 1337, listening={15001})
    hostile = proc(20, "\x1b[2J\x1b[8mx", 1337)
    (finding,) = pod_findings(pod(), in_pod(envoy, hostile), [])
    assert "\x1b" not in finding.message and "\\x1b[2J\\x1b[8mx" in finding.message
