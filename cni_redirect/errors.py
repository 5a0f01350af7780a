"""The plugin's error tree. Every failure the runtime sees is one of these.

    CniError                  (code carried by each subclass)
    ├── IncompatibleVersion   1   cniVersion we do not speak
    ├── UnsupportedField      2   a field valid in general but not here
    ├── InvalidEnvironment    4   a required CNI_* variable is missing or bad
    ├── DecodeError           6   stdin is not the JSON object we expect
    ├── InvalidConfig         7   a conflist field or pod annotation is wrong
    ├── TryAgainLater        11   a transient condition (netns busy, agent down)
    ├── NotAvailable         50   STATUS: the plugin cannot do its job now
    └── InternalError       999   a bug or an unexpected kernel answer

Messages name the field or annotation and the offending value so the
operator can fix the pod spec without reading our source.
"""

from __future__ import annotations

from typing import ClassVar


class CniError(Exception):
    """Base of all errors reported to the runtime as a CNI error object."""

    code: ClassVar[int] = 999

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
