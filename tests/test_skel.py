"""The dispatcher, driven with injected env, stdin and stdout over every CNI version."""

from __future__ import annotations

import io
import json
from contextlib import contextmanager

import pytest

from cni_redirect.errors import NotAvailable
from cni_redirect.fake import MemoryBackend
from cni_redirect.logs import EventLog
from cni_redirect.plugin import RedirectPlugin
from cni_redirect.result import SUPPORTED_VERSIONS
from cni_redirect.skel import dispatch
from cni_redirect.testing.netlab import enabled, plugin_conf
from tests.support import FAKE_NETNS as NETNS
from tests.support import call


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_add_passes_prev_result_through_in_requested_version(version):
    run = call("ADD", plugin_conf(enabled(), version=version))
    rc, out, backend = run.rc, run.out, run.backend
    assert rc == 0
    assert out["cniVersion"] == version and out["interfaces"][0]["name"] == "eth0"
    assert backend.calls == [("apply", NETNS)]


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_not_opted_in_returns_fast_without_touching_the_kernel(version):
    run = call("ADD", plugin_conf({"unrelated": "x"}, version=version))
    rc, out, backend = run.rc, run.out, run.backend
    assert rc == 0 and out["cniVersion"] == version
    assert backend.calls == []


def test_excluded_namespace_is_left_alone_even_when_annotated():
    conf = plugin_conf(enabled(), log_level="info")
    run = call("ADD", conf, CNI_ARGS="K8S_POD_NAMESPACE=kube-system")
    rc, backend, err = run.rc, run.backend, run.stderr
    assert rc == 0 and backend.calls == []
    assert "exclude_namespaces" in err


def test_excluded_namespace_skips_even_invalid_annotations():
    run = call("ADD", plugin_conf(enabled(proxy_uid="x")), CNI_ARGS="K8S_POD_NAMESPACE=kube-system")
    rc, backend = run.rc, run.backend
    assert rc == 0 and backend.calls == []


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_error_object_shape_and_version(version):
    run = call("ADD", plugin_conf(enabled(proxy_uid="x"), version=version))
    rc, out, backend = run.rc, run.out, run.backend
    assert rc == 1
    assert set(out) == {"cniVersion", "code", "msg", "details"}
    assert out["cniVersion"] == version and out["code"] == 7
    assert backend.calls == []


@pytest.mark.parametrize(
    ("stdin", "code"),
    [
        (b"{not json", 6),
        (b"[1,2]", 6),
        (b"", 6),
        (b'{"type":"cni-redirect"}', 1),
        (b'{"cniVersion":"0.2.0"}', 1),
        (b'{"cniVersion":"9.9.9"}', 1),
    ],
)
def test_undecodable_or_unsupported_config(stdin, code):
    run = call("ADD", stdin)
    rc, out = run.rc, run.out
    assert rc == 1 and out["code"] == code
    assert out["cniVersion"] == "1.1.0"


@pytest.mark.parametrize(
    ("command", "missing"),
    [("ADD", "CNI_NETNS"), ("ADD", "CNI_CONTAINERID"), ("CHECK", "CNI_IFNAME"), ("DEL", "CNI_CONTAINERID")],
)
def test_required_env_per_command(command, missing):
    run = call(command, plugin_conf(enabled()), **{missing: None})
    rc, out = run.rc, run.out
    assert rc == 1 and out["code"] == 4 and missing in out["msg"]


def test_del_does_not_need_netns_or_prev_result():
    run = call("DEL", plugin_conf(enabled(), prev=False), CNI_NETNS=None)
    rc, out, backend = run.rc, run.out, run.backend
    assert (rc, out, backend.calls) == (0, None, [])


def test_del_tolerates_a_broken_config_and_still_cleans_up():
    backend = MemoryBackend()
    call("ADD", plugin_conf(enabled()), backend)
    run = call("DEL", plugin_conf(enabled(), log_level="loud"), backend)
    rc, out, backend, err = run.rc, run.out, run.backend, run.stderr
    assert (rc, out) == (0, None)
    assert backend.tables == {} and "DEL continues" in err


def test_unknown_command():
    run = call("FROB", plugin_conf())
    rc, out = run.rc, run.out
    assert rc == 1 and out["code"] == 4 and "FROB" in out["msg"]


@pytest.mark.parametrize("stdin", [b"", b"garbage", b'{"cniVersion":"0.4.0"}'])
def test_version_answers_with_any_input(stdin):
    run = call("VERSION", stdin, CNI_CONTAINERID="dummy", CNI_NETNS="dummy")
    rc, out = run.rc, run.out
    assert rc == 0 and out["supportedVersions"] == list(SUPPORTED_VERSIONS)


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_check_exists_from_0_4_0(version):
    backend = MemoryBackend()
    call("ADD", plugin_conf(enabled(), version=version), backend)
    run = call("CHECK", plugin_conf(enabled(), version=version), backend)
    rc, out = run.rc, run.out
    if version in ("0.3.0", "0.3.1"):
        assert rc == 1 and out["code"] == 1
    else:
        assert (rc, out) == (0, None)


@pytest.mark.parametrize("command", ["STATUS", "GC"])
@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_status_and_gc_exist_from_1_1_0(command, version):
    run = call(command, plugin_conf(version=version, prev=False))
    rc, out = run.rc, run.out
    if version == "1.1.0":
        assert (rc, out) == (0, None)
    else:
        assert rc == 1 and out["code"] == 1


def test_status_reports_unavailable_backend():
    class Broken(MemoryBackend):
        def status(self):
            raise NotAvailable("libnftables cannot be loaded: nope")

    run = call("STATUS", plugin_conf(version="1.1.0", prev=False), Broken())
    rc, out = run.rc, run.out
    assert rc == 1 and out["code"] == 50 and "libnftables" in out["msg"]


def test_unexpected_exception_becomes_code_999_with_traceback_on_stderr():
    class Exploding(MemoryBackend):
        @contextmanager
        def session(self, netns):
            raise RuntimeError("boom")
            yield

    run = call("ADD", plugin_conf(enabled()), Exploding())
    rc, out, err = run.rc, run.out, run.stderr
    assert rc == 1 and out["code"] == 999 and "boom" in out["msg"]
    assert "Traceback" in err


def test_stdout_carries_only_the_result():
    stdout = io.StringIO()
    dispatch(
        RedirectPlugin(MemoryBackend(), EventLog(io.StringIO(), level="debug")),
        {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "a", "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0"},
        json.dumps(plugin_conf(enabled())).encode(),
        stdout,
        io.StringIO(),
    )
    json.loads(stdout.getvalue())  # exactly one JSON document, nothing else


def test_stderr_is_quiet_by_default_and_verbose_on_request():
    quiet = call("ADD", plugin_conf(enabled())).stderr
    assert quiet == ""
    verbose = call("ADD", plugin_conf(enabled(), log_level="info")).stderr
    assert "outcome=captured" in verbose


def test_podman_style_args_note_the_missing_namespace(tmp_path):
    log = tmp_path / "log"
    conf = plugin_conf(None, defaults={"enabled": "true"}, log_file=str(log), exclude_namespaces=["default"])
    run = call("ADD", conf, CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=box")
    rc, backend = run.rc, run.backend
    assert rc == 0 and backend.calls == [("apply", NETNS)]
    event = json.loads(log.read_text())
    assert event["pod"] == "-/box" and "exclude_namespaces does not apply" in event["note"]


def test_missing_annotations_capability_is_warned_about():
    conf = plugin_conf(None, defaults={"enabled": "true"})
    del conf["capabilities"]
    run = call("ADD", conf)
    rc, backend, err = run.rc, run.backend, run.stderr
    assert rc == 0 and backend.calls == [("apply", NETNS)]
    assert "lacks" in err and "io.kubernetes.cri.pod-annotations" in err
    quiet = call("ADD", plugin_conf(None, defaults={"enabled": "true"})).stderr
    assert "lacks" not in quiet
