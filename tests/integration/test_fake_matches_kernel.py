"""The kernel refuses every batch the fake refuses (tests/test_fake.py), and the fake accepts what the kernel does."""

from __future__ import annotations

import os

import pytest

from cni_redirect.backend import KernelBackend, libnftables
from cni_redirect.fake import MemoryBackend
from cni_redirect.netns import entered, open_netns
from cni_redirect.testing.sessions import at
from tests.support import CASES, REFUSED, REFUSED_FOLLOW_UP, render


@pytest.mark.parametrize("case", REFUSED)
def test_the_kernel_refuses_it_too(pod, case):
    at(KernelBackend(), pod.path).apply(render("defaults"))
    before = pod.ruleset()
    fd = open_netns(pod.path)
    try:
        with entered(fd):
            rc, _, error = libnftables().json_cmd({"nftables": [REFUSED[case], *REFUSED_FOLLOW_UP.get(case, [])]})
    finally:
        os.close(fd)
    assert rc != 0, f"the kernel accepted {case}: the fake is stricter than the kernel"
    assert error
    assert pod.ruleset() == before


@pytest.mark.parametrize("case", CASES)
def test_fake_and_kernel_list_the_same_table(pod, case):
    kernel, fake = KernelBackend(), MemoryBackend()
    for backend in (kernel, fake):
        at(backend, pod.path).apply(render(case))
    assert at(fake, pod.path).read() == at(kernel, pod.path).read()
