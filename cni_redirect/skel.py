"""The CNI entry point: parse env and stdin, dispatch, print result or error.

Like containernetworking's `pkg/skel`: env, stdin, stdout and stderr are
parameters, so tests drive the dispatcher without a process. Which CNI_*
variables each command needs is a table, not a chain of ifs.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from .errors import CniError, DecodeError, IncompatibleVersion, InternalError, InvalidEnvironment
from .result import LATEST_VERSION, SUPPORTED_VERSIONS, require_supported, version_tuple

#: CNI_* variables each command cannot do without. CNI_PATH is not listed:
#: we never exec another plugin, so we do not need it.
REQUIRED_ENV: dict[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "STATUS": (),
    "GC": (),
    "VERSION": (),
}

#: The oldest config version each command exists in (CNI spec).
MIN_VERSION: dict[str, tuple[int, ...]] = {"CHECK": (0, 4, 0), "STATUS": (1, 1, 0), "GC": (1, 1, 0)}


@dataclass(frozen=True)
class Request:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: str = ""
    path: str = ""
    cni_version: str = LATEST_VERSION
    config: Mapping[str, object] = field(default_factory=dict)


class Plugin(Protocol):
    def add(self, request: Request) -> dict: ...
    def delete(self, request: Request) -> None: ...
    def check(self, request: Request) -> None: ...
    def status(self, request: Request) -> None: ...
    def gc(self, request: Request) -> None: ...
    def report_failure(self, request: Request | None, error: CniError) -> None: ...


HANDLERS = {"ADD": "add", "DEL": "delete", "CHECK": "check", "STATUS": "status", "GC": "gc"}


def version_info() -> dict:
    return {"cniVersion": LATEST_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def decode_config(stdin: bytes) -> dict:
    try:
        config = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"stdin is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise DecodeError(f"stdin must be a JSON object, got {type(config).__name__}")
    return config


def build_request(env: Mapping[str, str], stdin: bytes) -> Request:
    command = env.get("CNI_COMMAND", "")
    if command not in REQUIRED_ENV:
        raise InvalidEnvironment(f'CNI_COMMAND "{command[:40]}" is not one of {", ".join(REQUIRED_ENV)}')
    config = decode_config(stdin)
    version = require_supported(config.get("cniVersion"))
    minimum = MIN_VERSION.get(command)
    if minimum and version_tuple(version) < minimum:
        raise IncompatibleVersion(f"config version {version} does not allow {command}")
    missing = [name for name in REQUIRED_ENV[command] if not env.get(name)]
    if missing:
        raise InvalidEnvironment(f"{command} requires environment variable {', '.join(missing)}")
    return Request(
        command=command,
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
        args=env.get("CNI_ARGS", ""),
        path=env.get("CNI_PATH", ""),
        cni_version=version,
        config=config,
    )


@dataclass(frozen=True)
class Reply:
    """How a command ended: the process's exit code, and the CNI error code (0: success) without re-reading stdout."""

    exit_code: int
    cni_code: int


def dispatch(plugin: Plugin, env: Mapping[str, str], stdin: bytes, stdout: TextIO, stderr: TextIO) -> int:
    """Run one CNI command; return the process exit code."""
    return answer(plugin, env, stdin, stdout, stderr).exit_code


def answer(plugin: Plugin, env: Mapping[str, str], stdin: bytes, stdout: TextIO, stderr: TextIO) -> Reply:
    """Run one CNI command, write its result or error object; the exit code and the CNI code."""
    if env.get("CNI_COMMAND") == "VERSION":
        stdout.write(json.dumps(version_info()))
        return Reply(0, 0)
    request: Request | None = None
    try:
        request = build_request(env, stdin)
        result = getattr(plugin, HANDLERS[request.command])(request)
        if result is not None:
            stdout.write(json.dumps(result))
        return Reply(0, 0)
    except CniError as error:
        failure = error
    except Exception as exc:  # a bug: still answer the runtime in CNI form
        stderr.write(traceback.format_exc())
        failure = InternalError(f"unexpected {type(exc).__name__}: {exc}")
    version = request.cni_version if request else error_version(stdin)
    stdout.write(json.dumps(failure.to_dict(version)))
    plugin.report_failure(request, failure)
    return Reply(1, failure.code)


def error_version(stdin: bytes) -> str:
    """The version to encode an early error in: the config's, if we speak it."""
    try:
        version = json.loads(stdin).get("cniVersion")
    except Exception:
        return LATEST_VERSION
    return version if version in SUPPORTED_VERSIONS else LATEST_VERSION
