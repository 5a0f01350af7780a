"""STATUS and GC answered by the thin front, when no CNI server answers: stdlib only, nothing heavy loaded.

containerd 2.x runs STATUS through the chain on every CRI `Status` call
(every few seconds) for a `cniVersion` 1.1.0 conflist. An in-process
answer would load pydantic, pyroute2 and libnftables (~150 ms of CPU) to say
what paths can say:

- STATUS succeeds when ADD would work in-process: the nftables bindings can
  be found and libnftables.so.1 is present (looked up by path, never loaded,
  no program run). A CNI server that is down is not a reason to fail: ADD
  then works in-process, so the node's network must not turn NotReady.
  Code 50 (not available) names what is missing.
- GC has nothing to collect: every rule we make lives and dies with its pod
  netns.

The request is checked as the dispatcher checks it (`skel.build_request`: a
JSON object, a supported `cniVersion` that allows the command); the entry's
own fields are ADD's to validate.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

from .errors import CniError, NotAvailable
from .skel import build_request, error_version

LIBNFTABLES = "libnftables.so.1"


def library_dirs() -> list[str]:
    """Where the dynamic loader would find libnftables: the bundle's own dir, LD_LIBRARY_PATH, the system's."""
    dirs = []
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle:
        dirs.append(str(bundle))
    dirs += [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    multiarch = getattr(sys.implementation, "_multiarch", "")
    for root in ("/lib", "/usr/lib", "/usr/local/lib"):
        if multiarch:
            dirs.append(f"{root}/{multiarch}")
        dirs.append(root)
    return dirs


def missing_parts() -> str:
    """What the in-process path would lack, or "" when everything is there."""
    from importlib.util import find_spec

    try:
        found = find_spec("nftables") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return "the nftables Python bindings are not installed (Debian: python3-nftables)"
    if not any(os.path.exists(os.path.join(d, LIBNFTABLES)) for d in library_dirs()):
        return f"{LIBNFTABLES} is not in the bundle or the system's library dirs (Debian: libnftables1)"
    return ""


def answer(env: Mapping[str, str], stdin: bytes) -> tuple[int, bytes]:
    """The exit code and stdout for STATUS or GC, the config checked as the dispatcher checks it."""
    try:
        request = build_request(env, stdin)
    except CniError as error:
        return 1, json.dumps(error.to_dict(error_version(stdin))).encode()
    problem = missing_parts() if request.command == "STATUS" else ""
    if problem:
        unavailable = NotAvailable(f"cni-redirect cannot program pods on this node: {problem}")
        return 1, json.dumps(unavailable.to_dict(request.cni_version)).encode()
    return 0, b""
