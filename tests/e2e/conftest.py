"""The end-to-end tier: a real containerd over CRI runs the real CNI chain. Nothing here skips."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.e2e.harness import Containerd, HostSnapshot, compile_cri, new_workdir


@pytest.fixture(scope="session")
def host_snapshot():
    assert os.geteuid() == 0, "the e2e tier must run as root (it starts containerd)"
    return HostSnapshot.take()


@pytest.fixture(scope="session")
def containerd(host_snapshot, tmp_path_factory):
    workdir = new_workdir()
    runtime = Containerd(workdir)
    client = None
    try:
        runtime.start()
        messages, stubs = compile_cri(tmp_path_factory.mktemp("cri"))
        client = runtime.connect(messages, stubs)
        yield client
    finally:
        try:
            if client is not None:
                client.remove_all()
                client.channel.close()
        finally:
            runtime.stop()
            host_snapshot.restore()
            shutil.rmtree(workdir, ignore_errors=True)
    problems = host_snapshot.differences()
    assert not problems, f"the e2e tier left the host changed: {problems}"
