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

The request is checked as the dispatcher checks it (a JSON object, a
supported `cniVersion` that allows the command; skel itself is not loaded:
its imports cost as much as the rest of the answer); the entry's own fields
are ADD's to validate.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from . import wire

LIBNFTABLES = "libnftables.so.1"
#: The versions that have STATUS and GC (1.1.0 on); tests/test_front.py ties it to result.SUPPORTED_VERSIONS.
STATUS_VERSIONS = ("1.1.0",)


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


def bindings_present() -> bool:
    """The nftables bindings, by path: frozen into the bundle, or a package on sys.path (not imported)."""
    if getattr(sys, "frozen", False):
        return True  # install/build-bundle.sh fails without them
    return any(
        os.path.exists(os.path.join(entry or ".", "nftables", "__init__.py"))
        or os.path.exists(os.path.join(entry or ".", "nftables.py"))
        for entry in sys.path
    )


def missing_parts() -> str:
    """What the in-process path would lack, or "" when everything is there."""
    if not bindings_present():
        return "the nftables Python bindings are not installed (Debian: python3-nftables)"
    if not any(os.path.exists(os.path.join(d, LIBNFTABLES)) for d in library_dirs()):
        return f"{LIBNFTABLES} is not in the bundle or the system's library dirs (Debian: libnftables1)"
    return ""


def answer(env: Mapping[str, str], stdin: bytes) -> tuple[int, bytes]:
    """The exit code and stdout for STATUS or GC.

    The usual request (a config whose `cniVersion` allows the command, on a node that has everything) is
    answered from the top-level scanner alone; anything else goes through `checked_answer`, which
    checks the request as the dispatcher does (json and the error tree are loaded only then)."""
    command = env.get("CNI_COMMAND", "")
    usual = command in ("STATUS", "GC") and wire.top_level_string(stdin, b"cniVersion") in STATUS_VERSIONS
    if usual and (command == "GC" or not missing_parts()):
        return 0, b""
    return checked_answer(command, stdin)


def checked_answer(command: str, stdin: bytes) -> tuple[int, bytes]:
    """As the dispatcher answers (tests/test_front.py holds the two to the same answers)."""
    import json

    from .errors import CniError, DecodeError, IncompatibleVersion, NotAvailable
    from .result import LATEST_VERSION, SUPPORTED_VERSIONS, require_supported

    try:
        config = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        return 1, json.dumps(DecodeError(f"stdin is not valid JSON: {exc}").to_dict(LATEST_VERSION)).encode()
    if not isinstance(config, dict):
        error = DecodeError(f"stdin must be a JSON object, got {type(config).__name__}")
        return 1, json.dumps(error.to_dict(LATEST_VERSION)).encode()
    declared = config.get("cniVersion")
    version = declared if isinstance(declared, str) and declared in SUPPORTED_VERSIONS else LATEST_VERSION
    try:
        require_supported(declared)
        if version not in STATUS_VERSIONS:
            raise IncompatibleVersion(f"config version {version} does not allow {command}")
        problem = missing_parts() if command == "STATUS" else ""
        if problem:
            raise NotAvailable(f"cni-redirect cannot program pods on this node: {problem}")
    except CniError as error:
        return 1, json.dumps(error.to_dict(version)).encode()
    return 0, b""
