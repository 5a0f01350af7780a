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
    ├── WireError                 the front <-> CNI server protocol: unreachable, malformed, too large
    └── NodeError                 the node agent (`cni-redirect install`)
        ├── ConfError             a CNI config file we cannot work with
        └── SettingsError         the admin's flags or entry settings are invalid

Messages name the field, annotation or file and the offending value, so the
operator can fix it without reading our source. This module imports nothing:
the thin front and the wire protocol use it too.
"""

from __future__ import annotations


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


class WireError(CniRedirectError):
    """The front and the CNI server could not complete an exchange."""


class NodeError(CniRedirectError):
    """The node agent cannot do what it was asked."""


class ConfError(NodeError, ValueError):
    """A CNI config we cannot work with; the message names the file and why."""


class SettingsError(NodeError, ValueError):
    """The admin's flags or entry settings are invalid; the message names the flag or field."""
