"""The thin front: its error objects, its import budget, VERSION from constants."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cni_redirect.front import VERSIONS
from cni_redirect.result import SUPPORTED_VERSIONS


def test_the_fronts_version_answer_is_the_result_modules_list():
    """VERSION is answered from constants: they must be the versions the plugin converts results to."""
    answer = json.loads(VERSIONS)
    assert answer["supportedVersions"] == list(SUPPORTED_VERSIONS)
    assert answer["cniVersion"] == SUPPORTED_VERSIONS[-1]


def test_front_imports_only_the_standard_library_it_needs():
    """Loading the front (what every pod start pays) adds the package, front, wire and the C `_socket`."""
    code = (
        "import sys; before = set(sys.modules); import cni_redirect.front; "
        "print('\\n'.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    assert set(out.split()) == {"cni_redirect", "cni_redirect.front", "cni_redirect.wire", "_socket"}


def test_version_is_answered_by_the_front_with_any_env():
    out = subprocess.run(
        [sys.executable, "-m", "cni_redirect"],
        env={"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy", "CNI_CONTAINERID": "dummy"},
        input=b"",
        capture_output=True,
        check=True,
    ).stdout
    assert "1.1.0" in json.loads(out)["supportedVersions"]


HEAVY = ("pydantic", "pyroute2", "nftables", "grpc", "prometheus_client")


def front_run(command: str, conf: dict) -> tuple[int, bytes, list[str]]:
    return front_run_raw(command, json.dumps(conf).encode())


def front_run_raw(command: str, stdin: bytes) -> tuple[int, bytes, list[str]]:
    """The front's main() in a fresh interpreter: exit code, stdout, and which heavy modules it loaded."""
    code = (
        "import io, json, os, sys\n"
        f"os.environ['CNI_COMMAND'] = {command!r}\n"
        f"sys.stdin = io.TextIOWrapper(io.BytesIO({stdin!r}))\n"
        "import cni_redirect.front as front\n"
        "rc = front.main()\n"
        f"print(json.dumps([rc, sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})]), file=sys.stderr)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    rc, loaded = json.loads(run.stderr.decode().strip().splitlines()[-1])
    return rc, run.stdout, loaded


@pytest.mark.parametrize("command", ["STATUS", "GC"])
def test_status_and_gc_without_a_server_load_nothing_heavy(command):
    rc, out, loaded = front_run(command, {"cniVersion": "1.1.0", "name": "n", "type": "cni-redirect"})
    assert (rc, out, loaded) == (0, b"", [])


def test_status_with_a_server_that_does_not_answer_loads_nothing_heavy():
    conf = {"cniVersion": "1.1.0", "name": "n", "type": "cni-redirect", "agent_socket": "/run/cni-redirect/none.sock"}
    assert front_run("STATUS", conf) == (0, b"", [])


def test_status_is_checked_as_the_dispatcher_checks_it():
    rc, out, loaded = front_run("STATUS", {"cniVersion": "1.0.0", "name": "n", "type": "cni-redirect"})
    assert rc == 1 and json.loads(out)["code"] == 1 and "does not allow STATUS" in json.loads(out)["msg"]
    assert loaded == []


def test_status_names_what_the_in_process_path_would_lack(monkeypatch):
    from cni_redirect import status

    stdin = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "cni-redirect"}).encode()
    assert status.answer({"CNI_COMMAND": "STATUS"}, stdin) == (0, b"")
    monkeypatch.setattr(status, "library_dirs", lambda: ["/nonexistent"])
    rc, out = status.answer({"CNI_COMMAND": "STATUS"}, stdin)
    error = json.loads(out)
    assert rc == 1 and error["code"] == 50 and "libnftables.so.1" in error["msg"]
    assert status.answer({"CNI_COMMAND": "GC"}, stdin) == (0, b""), "GC needs no libnftables"


@pytest.mark.parametrize(
    "stdin",
    [
        b"",
        b"[]",
        b"{not json",
        b'{"cniVersion": "9.9.9", "name": "n", "type": "cni-redirect"}',
        b'{"cniVersion": 1, "name": "n", "type": "cni-redirect"}',
        b'{"cniVersion": "1.0.0", "name": "n", "type": "cni-redirect"}',
        b'{"cniVersion": "1.1.0", "name": "n", "type": "cni-redirect"}',
    ],
    ids=["empty", "a-list", "not-json", "unknown-version", "version-not-a-string", "too-old", "fine"],
)
@pytest.mark.parametrize("command", ["STATUS", "GC"])
def test_the_fronts_status_answers_as_the_dispatcher_does(command, stdin):
    import io

    from cni_redirect import status
    from cni_redirect.fake import MemoryBackend
    from cni_redirect.logs import EventLog
    from cni_redirect.plugin import RedirectPlugin
    from cni_redirect.skel import dispatch

    out = io.StringIO()
    rc = dispatch(RedirectPlugin(MemoryBackend(), EventLog(io.StringIO())), {"CNI_COMMAND": command}, stdin, out, out)
    assert status.answer({"CNI_COMMAND": command}, stdin) == (rc, out.getvalue().encode())


def test_the_status_versions_are_the_supported_ones_from_1_1_0_on():
    from cni_redirect.result import version_tuple
    from cni_redirect.skel import MIN_VERSION
    from cni_redirect.status import STATUS_VERSIONS

    expected = tuple(v for v in SUPPORTED_VERSIONS if version_tuple(v) >= MIN_VERSION["STATUS"])
    assert expected == STATUS_VERSIONS and MIN_VERSION["STATUS"] == MIN_VERSION["GC"]


@pytest.mark.parametrize("key", [b'"na\\qme"', b'"agent\\qsocket"'])
def test_an_invalid_escape_in_a_top_level_key_is_no_traceback(key):
    """An invalid JSON escape in a key (a KeyError in the scanner) must end in the in-process path's error."""
    from cni_redirect.wire import config_agent_socket, top_level_string

    doc = b'{"cniVersion": "1.1.0", ' + key + b': 1, "agent_socket": "/run/cni-redirect/\\x41.sock"}'
    assert config_agent_socket(doc) is None and top_level_string(doc, b"cniVersion") is None
    rc, out, loaded = front_run_raw("STATUS", doc)
    assert rc == 1 and json.loads(out)["code"] == 6 and loaded == []
