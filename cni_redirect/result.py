"""CNI versions we speak and conversion of the previous plugin's result.

A chained plugin returns `prevResult` untouched except for its encoding,
which must match the `cniVersion` of the config it was called with.
Between 0.3.0 and 1.1.0 the only difference in the result fields we pass
through is `ips[].version`, present before 1.0.0 and gone from it on.
"""

from __future__ import annotations

import copy

from .errors import DecodeError, IncompatibleVersion

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]


def version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        raise IncompatibleVersion(f'cniVersion "{version[:40]}" is not a version number') from None


def require_supported(version: object) -> str:
    if not isinstance(version, str) or not version:
        raise IncompatibleVersion(
            f"cniVersion {version!r:.60} is missing or not a string",
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if version not in SUPPORTED_VERSIONS:
        raise IncompatibleVersion(
            f'cniVersion "{version[:40]}" is not supported',
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def convert_result(prev_result: object, to_version: str) -> dict:
    """Return prevResult encoded for `to_version`; raise DecodeError if it is no result."""
    if not isinstance(prev_result, dict):
        raise DecodeError(f"prevResult must be a JSON object, got {type(prev_result).__name__}")
    result = copy.deepcopy(prev_result)
    ips = result.get("ips", [])
    if not isinstance(ips, list) or not all(isinstance(ip, dict) for ip in ips):
        raise DecodeError("prevResult.ips must be a list of objects")
    legacy = version_tuple(to_version) < (1, 0, 0)
    for ip in ips:
        if legacy:
            address = ip.get("address")
            if "version" not in ip:
                if not isinstance(address, str):
                    raise DecodeError(f"prevResult.ips[].address must be a string, got {address!r:.60}")
                ip["version"] = "6" if ":" in address else "4"
        else:
            ip.pop("version", None)
    result["cniVersion"] = to_version
    return result
