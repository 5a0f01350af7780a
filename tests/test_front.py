"""The thin front: finding the agent socket without a JSON parser, and its error objects."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cni_redirect.front import _error, agent_socket


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"agent_socket": "/run/cni-redirect/agent.sock"}, "/run/cni-redirect/agent.sock"),
        ({"agent_socket": "/var/run/cni-redirect/a.sock"}, "/var/run/cni-redirect/a.sock"),
        ({"agent_socket": ""}, None),
        ({}, None),
        ({"agent_socket": "/tmp/agent.sock"}, None),
        ({"agent_socket": "/run/cni-redirect/../docker.sock"}, None),
        ({"agent_socket": "/run/cni-redirect/agent"}, None),
        ({"agent_socket": 5}, None),
    ],
)
def test_agent_socket_is_found_only_when_trustworthy(config, expected):
    stdin = json.dumps({"cniVersion": "1.0.0", "type": "cni-redirect", **config}).encode()
    assert agent_socket(stdin) == expected
    assert agent_socket(json.dumps({"cniVersion": "1.0.0", **config}, indent=4).encode()) == expected


def test_an_annotation_value_cannot_smuggle_a_socket_path():
    annotations = {"x": '"agent_socket": "/run/cni-redirect/evil.sock"'}
    stdin = json.dumps({"runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}}).encode()
    assert agent_socket(stdin) is None


def test_error_objects_are_valid_json_whatever_the_message():
    for msg in ["plain", 'with "quotes"', "back\\slash", "new\nline"]:
        obj = json.loads(_error(11, msg, 'd"etails'))
        assert obj["code"] == 11 and obj["cniVersion"] == "1.1.0"


def test_front_imports_only_the_standard_library_it_needs():
    code = (
        "import sys; before = set(sys.modules); import cni_redirect.front; "
        "print('\\n'.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(out.split())
    ours = {"cni_redirect", "cni_redirect.front"}
    assert ours <= loaded
    foreign = {m for m in loaded - ours if m.split(".")[0] not in sys.stdlib_module_names}
    assert not foreign, foreign
    assert not loaded & {"json", "re", "argparse", "pydantic", "pyroute2", "nftables", "ctypes"}


def test_version_is_answered_by_the_front_with_any_env():
    out = subprocess.run(
        [sys.executable, "-m", "cni_redirect"],
        env={"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy", "CNI_CONTAINERID": "dummy"},
        input=b"",
        capture_output=True,
        check=True,
    ).stdout
    assert "1.1.0" in json.loads(out)["supportedVersions"]
