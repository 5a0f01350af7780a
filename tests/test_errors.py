"""The one exception tree: kernel errors carry their errno, parsed once, and say what they are."""

from __future__ import annotations

import errno
import os

import pytest

from cni_redirect.backend import TableOps
from cni_redirect.errors import CniError, InternalError, KernelError, TryAgainLater
from cni_redirect.fake import FakeEdge
from tests.support import render


@pytest.mark.parametrize(
    ("code", "exists", "transient", "cni_code"),
    [
        (errno.EEXIST, True, False, InternalError.code),
        (errno.EBUSY, False, True, TryAgainLater.code),
        (errno.EAGAIN, False, True, TryAgainLater.code),
        (errno.EINTR, False, True, TryAgainLater.code),
        (errno.ENOENT, False, False, InternalError.code),
        (errno.EINVAL, False, False, InternalError.code),
    ],
)
def test_libnftables_error_text_becomes_an_errno(code, exists, transient, cni_code):
    text = f"Error: Could not process rule: {os.strerror(code)}\nadd table inet cni_redirect\n^^^^^^^^^"
    error = KernelError.from_text("nftables rejected the apply transaction", text)
    assert (error.errno, error.exists, error.transient, error.code) == (code, exists, transient, cni_code)
    assert isinstance(error, CniError) and error.details == text


def test_text_without_a_known_errno_is_an_internal_error():
    error = KernelError.from_text("nftables rejected the apply transaction", "Error: syntax error, unexpected junk")
    assert error.errno is None and not error.exists and not error.transient and error.code == 999


def test_the_fakes_refusal_reaches_the_plugin_with_its_errno():
    ops = TableOps(FakeEdge())
    ops.apply(render("defaults"))
    with pytest.raises(KernelError) as caught:
        ops.run(render("defaults").create_batch(), "apply")
    assert caught.value.exists, "a second create is EEXIST, and apply() replaces on exactly that"
