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
its imports cost as much as the rest of the answer), and the entry's own
fields as ADD's parse would (`entry_problem`, with stdlib checks that
tests/test_status.py holds to `config.parse_conf`): a STATUS that succeeds
means ADD would not refuse the entry.
"""

from __future__ import annotations

import os
import sys

from . import wire

TYPE_CHECKING = False  # not typing's: importing typing costs more than the rest of the answer
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .errors import CniError

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


#: The entry's own fields that have a closed set of values. Held to profiles.PROFILE_NAMES, spec.CATALOGUE and
#: config.PluginConf by tests/test_status.py: this module must not load them (pydantic costs ~150 ms).
LOG_LEVELS = ("debug", "info", "warning", "error")
ANNOTATION_POLICIES = ("open", "restricted")
PROFILE_NAMES = ("cni-redirect", "istio", "linkerd")
CATALOGUE_KEYS = (
    "enabled", "proxy-uid", "proxy-gid", "exclude-uids", "outbound-port", "inbound-port", "inbound-mode",
    "include-outbound-ports", "exclude-outbound-ports", "capture-outbound-ports", "include-outbound-cidrs",
    "exclude-outbound-cidrs", "include-inbound-ports", "exclude-inbound-ports", "exclude-inbound-cidrs",
    "exclude-interfaces", "reroute-interfaces", "loopback-cidrs", "capture-own-ip", "capture-ipv6", "capture-dns",
    "dns-port", "proxy-mark", "loopback-mss", "tcp-rmem", "tcp-wmem",
)  # fmt: skip
MAX_SET_ELEMENTS = 1_000_000


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _one_of(names: tuple[str, ...]) -> str:
    return "must be one of " + ", ".join(repr(n) for n in names)


#: (field, is the value fine, why not): the entry's own fields as config.PluginConf types them, in its order.
_ENTRY_FIELDS: tuple[tuple[str, Callable[[object], bool], str], ...] = (
    ("name", lambda v: isinstance(v, str), "must be a string"),
    ("type", lambda v: isinstance(v, str), "must be a string"),
    (
        "capabilities",
        lambda v: isinstance(v, dict) and all(isinstance(x, bool) for x in v.values()),
        "must be an object of booleans",
    ),
    (
        "defaults",
        lambda v: isinstance(v, dict) and all(isinstance(x, str | int) for x in v.values()),
        "must be an object of strings (numbers and booleans are turned into strings)",
    ),
    (
        "exclude_namespaces",
        lambda v: _strings(v) and all(v),  # type: ignore[arg-type]
        "must be a list of non-empty namespace names",
    ),
    ("profile", lambda v: v in PROFILE_NAMES, _one_of(PROFILE_NAMES)),
    ("annotation_policy", lambda v: v in ANNOTATION_POLICIES, _one_of(ANNOTATION_POLICIES)),
    (
        "pod_settable",
        lambda v: _strings(v) and all(key in CATALOGUE_KEYS for key in v),  # type: ignore[attr-defined]
        "must be a list of catalogue keys (" + ", ".join(CATALOGUE_KEYS) + ")",
    ),
    ("allow_root_proxy_uid", lambda v: isinstance(v, bool), "must be true or false"),
    (
        "max_set_elements",
        lambda v: _is_int(v) and 1 <= v <= MAX_SET_ELEMENTS,  # type: ignore[operator]
        f"must be a whole number from 1 to {MAX_SET_ELEMENTS}",
    ),
    ("log_level", lambda v: v in LOG_LEVELS, _one_of(LOG_LEVELS)),
    ("log_file", lambda v: v is None or isinstance(v, str), "must be a path or null"),
    ("prevResult", lambda v: v is None or isinstance(v, dict), "must be an object"),
    ("runtimeConfig", lambda v: isinstance(v, dict), "must be an object"),
)


def entry_problem(config: Mapping[str, object]) -> str:
    """The first of the entry's own fields that ADD's parse (config.parse_conf) refuses, named with its value;
    "" when there is none. The pod's settings are ADD's to judge: annotations override `defaults`."""
    for name, fine, why in _ENTRY_FIELDS:
        if name in config and not fine(config[name]):
            from .errors import show

            return f"conflist field {name}: invalid value {show(config[name])}: {why}"
    return ""


def status_of(command: str, config: Mapping[str, object]) -> CniError | None:
    """STATUS's and GC's one answer for an entry, whoever gives it (the CNI server, the plugin in-process, the
    front without either): the error to report, or None. The request itself (JSON, `cniVersion`) is checked
    before, by the dispatcher or `checked_answer`.

    - the entry's own fields must be ones ADD accepts (code 7): a broken entry is not "ready";
    - STATUS also needs what ADD in-process needs on this node (code 50, `missing_parts`)."""
    problem = entry_problem(config)
    if problem:
        from .errors import InvalidConfig

        return InvalidConfig(problem)
    missing = missing_parts() if command == "STATUS" else ""
    if missing:
        from .errors import NotAvailable

        return NotAvailable(f"cni-redirect cannot program pods on this node: {missing}")
    return None


def answer(env: Mapping[str, str], stdin: bytes) -> tuple[int, bytes]:
    """The exit code and stdout for STATUS or GC.

    The usual request (a JSON object whose `cniVersion` allows the command, an entry with nothing wrong,
    on a node that has everything) is answered after the C scanner's read alone; anything else goes through
    `checked_answer`, which checks the request as the dispatcher does (json and the error tree are loaded
    only then)."""
    command = env.get("CNI_COMMAND", "")
    if command in ("STATUS", "GC"):
        config = wire.json_object(stdin)
        if config is not None and config.get("cniVersion") in STATUS_VERSIONS and status_of(command, config) is None:
            return 0, b""
    return checked_answer(command, stdin)


def checked_answer(command: str, stdin: bytes) -> tuple[int, bytes]:
    """As the dispatcher answers (tests/test_front.py holds the two to the same answers)."""
    import json

    from .errors import CniError, DecodeError, IncompatibleVersion
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
        problem = status_of(command, config)
        if problem is not None:
            raise problem
    except CniError as error:
        return 1, json.dumps(error.to_dict(version)).encode()
    return 0, b""
