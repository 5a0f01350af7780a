"""The committed CRI stubs are what scripts/gen-cri.sh makes from runtime.proto, and the client's helpers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from cni_redirect.cri import pb, sandbox_netns

REPO = Path(__file__).resolve().parents[1]
CRI = REPO / "cni_redirect" / "cri"


def test_committed_stubs_match_the_proto(tmp_path):
    (tmp_path / "cni_redirect" / "cri").mkdir(parents=True)
    shutil.copy(CRI / "runtime.proto", tmp_path / "cni_redirect" / "cri" / "runtime.proto")
    command = [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.", "--grpc_python_out=."]
    subprocess.run([*command, "cni_redirect/cri/runtime.proto"], cwd=tmp_path, check=True)
    for name in ("runtime_pb2.py", "runtime_pb2.pyi", "runtime_pb2_grpc.py"):
        fresh = (tmp_path / "cni_redirect" / "cri" / name).read_text()
        assert fresh == (CRI / name).read_text(), f"{name} is stale: run scripts/gen-cri.sh"


def _status(info: dict | None) -> object:
    response = pb.PodSandboxStatusResponse()
    if info is not None:
        response.info["info"] = json.dumps(info)
    return response


def test_sandbox_netns_from_the_runtime_spec_or_the_pid():
    spec = {"runtimeSpec": {"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/x"}]}}}
    assert sandbox_netns(_status(spec)) == "/run/netns/x"
    assert sandbox_netns(_status({"pid": 4242, "runtimeSpec": {"linux": {"namespaces": [{"type": "network"}]}}})) == (
        "/proc/4242/ns/net"
    )
    assert sandbox_netns(_status({})) is None
    assert sandbox_netns(_status(None)) is None
