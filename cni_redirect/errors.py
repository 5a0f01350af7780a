"""Every error cni-redirect raises, in one tree.

    CniRedirectError
    ├── CniError                  reported to the runtime as a CNI error object; code per class
    │   ├── IncompatibleVersion   1   cniVersion we do not speak
    │   ├── UnsupportedField      2   a field valid in general but not here
    │   ├── InvalidEnvironment    4   a required CNI_* variable is missing or bad
    │   │   ├── NetnsGone             CNI_NETNS does not exist (any more): fatal for ADD, fine for DEL
    │   │   ├── NotANetns             CNI_NETNS exists but is not a network namespace
    │   │   └── HostNetns             CNI_NETNS is our own netns: we only ever program pods
    │   ├── DecodeError           6   stdin is not the JSON object we expect
    │   ├── InvalidConfig         7   a conflist field or pod annotation is wrong
    │   ├── TryAgainLater        11   a transient condition (netns busy, kernel busy)
    │   ├── NotAvailable         50   STATUS: the plugin cannot do its job now
    │   └── InternalError       999   a bug, an unexpected kernel answer, or CHECK drift
    │       └── KernelError 11 or 999 the kernel refused (nftables, netlink): errno parsed once;
    │                                 a transient errno is code 11
    ├── WireError                 the front <-> CNI server protocol: unreachable, malformed, too large
    └── NodeError                 the node agent (`cni-redirect install`, repair, inspect, doctor)
        ├── ConfError             a CNI config file we cannot work with
        ├── SettingsError         the admin's flags or entry settings are invalid
        ├── CriError              the container runtime's CRI answered with an error
        └── NodeApiError          the API server, asked to take the new-node taint off, failed or refused

Messages name the field, annotation or file and the offending value (`show`), so the
operator can fix it without reading our source. This module imports only `errno` and
`os` (loaded in every process anyway): the thin front and the wire protocol use it too.
"""

from __future__ import annotations

import errno as _errno
import os as _os


class CniRedirectError(Exception):
    """Base of everything cni-redirect raises on purpose."""


class CniError(CniRedirectError):
    """An error the runtime sees as a CNI error object (`code`, `msg`, `details`)."""

    code: int = 999

    def __init__(self, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict[str, object]:
        return {
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        }


class IncompatibleVersion(CniError):
    code = 1


class UnsupportedField(CniError):
    code = 2


class InvalidEnvironment(CniError):
    code = 4


class NetnsGone(InvalidEnvironment):
    """CNI_NETNS does not exist (any more): fatal for ADD, fine for DEL."""


class NotANetns(InvalidEnvironment):
    """CNI_NETNS exists but is not a network namespace (e.g. an unmounted bind target)."""


class HostNetns(InvalidEnvironment):
    """CNI_NETNS is our own netns: refusing, we only ever program pods."""


class DecodeError(CniError):
    code = 6


class InvalidConfig(CniError):
    code = 7


class TryAgainLater(CniError):
    code = 11


class NotAvailable(CniError):
    code = 50


class InternalError(CniError):
    code = 999


#: Kernel answers that say "busy, try again": the runtime retries code 11.
TRANSIENT_ERRNOS = frozenset({_errno.EBUSY, _errno.EAGAIN, _errno.EINTR})
#: The errnos libnftables reports by their strerror text, most specific first.
_KNOWN_ERRNOS = (
    _errno.EEXIST, _errno.ENOENT, _errno.EBUSY, _errno.EAGAIN, _errno.EINTR, _errno.ENOMEM, _errno.ENOBUFS,
    _errno.ENOSPC, _errno.EPERM, _errno.EACCES, _errno.EOPNOTSUPP, _errno.EAFNOSUPPORT, _errno.ERANGE,
    _errno.E2BIG, _errno.EMSGSIZE, _errno.EINVAL,
)  # fmt: skip


class KernelError(InternalError):
    """The kernel refused an operation (through libnftables or netlink); `errno` is parsed once, here."""

    def __init__(self, msg: str, details: str = "", errno: int | None = None) -> None:
        super().__init__(msg, details)
        self.errno = errno
        self.code = TryAgainLater.code if self.transient else InternalError.code

    @classmethod
    def from_text(cls, msg: str, text: str) -> KernelError:
        """From libnftables' error output, which carries the errno only as its strerror text."""
        found = next((code for code in _KNOWN_ERRNOS if _os.strerror(code) in text), None)
        return cls(msg, text, found)

    @property
    def exists(self) -> bool:
        return self.errno == _errno.EEXIST

    @property
    def transient(self) -> bool:
        return self.errno in TRANSIENT_ERRNOS


class WireError(CniRedirectError):
    """The front and the CNI server could not complete an exchange."""


class NodeError(CniRedirectError):
    """The node agent cannot do what it was asked."""


class ConfError(NodeError, ValueError):
    """A CNI config we cannot work with; the message names the file and why."""


class SettingsError(NodeError, ValueError):
    """The admin's flags or entry settings are invalid; the message names the flag or field."""


class NodeApiError(NodeError):
    """The API server could not be asked, or refused (the new-node taint): logged, tried again."""


class CriError(NodeError):
    """The container runtime's CRI answered with an error (`status`: the gRPC status code's name)."""

    def __init__(self, msg: str, status: str = "") -> None:
        super().__init__(msg)
        self.status = status


_MAX_SHOWN = 120  # characters of an offending value echoed back in a message


def show(value: object) -> str:
    """Quote a value for a message, cut short so hostile input cannot flood logs.

    Strings are shown in double quotes; anything else (a JSON number or list in the wrong place) as its repr.
    """
    text = value if isinstance(value, str) else repr(value)
    text = text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."
    if not isinstance(value, str):
        return text.encode("unicode_escape").decode("ascii")
    return '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
