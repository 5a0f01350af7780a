"""Layering: which source each setting's value comes from, lowest first.

built-in catalogue < the mesh profile's defaults < the conflist entry's
`defaults` < the mesh's own annotations < the values the mesh always adds <
our `cni-redirect.io/*` annotations. Each `Setting` remembers its `Origin`
(for machines) and a source naming the exact annotation or conflist field
(for people and error messages).

Under `annotation_policy: restricted` a pod may only opt in (`enabled:
"true"` where the admin's default is false); every other annotation is
ignored, and reported, unless the admin lists its key in `pod_settable`.

Only `evaluation.evaluate` calls `merge_settings`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Protocol

from .errors import InvalidConfig
from .spec import ANNOTATION_PREFIX, CATALOGUE, OPT_IN_KEY
from .values import parse_bool, show


class Origin(Enum):
    """Where a setting's value came from, lowest layer first."""

    BUILT_IN = "built-in"
    PROFILE_DEFAULT = "profile-default"
    ENTRY_DEFAULT = "entry-default"
    MESH_ANNOTATION = "mesh-annotation"
    MESH_ALWAYS = "mesh-always"
    ANNOTATION = "annotation"


@dataclass(frozen=True)
class Setting:
    """One effective value, where it came from (a kind and a human name), and why (when a mesh profile decided it)."""

    value: str
    source: str
    why: str = ""
    origin: Origin = Origin.BUILT_IN


@dataclass(frozen=True)
class PeerSetting:
    """A catalogue setting read from a mesh's own annotation (profiles.py), before layering.

    `append` adds the value to what applies below it (Linkerd's `skip-inbound-ports` adds to the
    configured list) instead of replacing it.
    """

    key: str
    annotation: str
    value: str
    append: bool = False
    why: str = ""


class MeshProfile(Protocol):
    """What merge_settings needs from a profile: its defaults, what it reads, what it always adds."""

    @property
    def name(self) -> str: ...

    @property
    def defaults(self) -> Mapping[str, str]: ...

    @property
    def always(self) -> Mapping[str, str]: ...

    def read(self, annotations: Mapping[str, str]) -> list[PeerSetting]: ...


def annotation_name(key: str) -> str:
    return f"annotation {ANNOTATION_PREFIX}{key}"


def default_name(key: str) -> str:
    return f"conflist defaults.{key}"


def merge_settings(
    defaults: Mapping[str, str],
    annotations: Mapping[str, str],
    policy: Literal["open", "restricted"] = "open",
    pod_settable: Iterable[str] = (),
    profile: MeshProfile | None = None,
) -> tuple[dict[str, Setting], list[str]]:
    """Layer the sources, lowest first (see the module's docstring).

    Returns the settings and the annotations a restricted policy ignored. Unknown keys in our own
    sources are an error, whatever the policy.
    """
    settings = {key: Setting(value, "built-in default") for key, value in CATALOGUE.items()}
    if profile is not None:
        for key, value in profile.defaults.items():
            settings[key] = Setting(value, f"{profile.name} profile default", origin=Origin.PROFILE_DEFAULT)
    for key, value in defaults.items():
        if key not in CATALOGUE:
            raise InvalidConfig(
                f"conflist defaults: unknown key {show(key)}",
                f"known keys: {', '.join(CATALOGUE)}",
            )
        settings[key] = Setting(value, default_name(key), origin=Origin.ENTRY_DEFAULT)
    settable = frozenset(pod_settable)
    ignored: list[str] = []

    def pod_may_set(key: str, value: str) -> bool:
        return policy != "restricted" or key in settable or _opts_in(key, value, settings)

    if profile is not None:
        for peer in profile.read(annotations):
            if pod_may_set(peer.key, peer.value):
                settings[peer.key] = _peer_layer(settings[peer.key], peer)
            else:
                ignored.append(peer.annotation)
        for key, value in profile.always.items():
            below = settings[key]
            joined = f"{below.value},{value}" if below.value.strip() else value
            source = f"{below.source}, plus {profile.name}'s always-set {value}"
            settings[key] = Setting(joined, source, below.why, Origin.MESH_ALWAYS)
    for key, value in _our_annotations(annotations):
        if pod_may_set(key, value):
            settings[key] = Setting(value, annotation_name(key), origin=Origin.ANNOTATION)
        else:
            ignored.append(ANNOTATION_PREFIX + key)
    return settings, ignored


def _peer_layer(below: Setting, peer: PeerSetting) -> Setting:
    """A mesh annotation's value over what applies below it: replacing it, or added to its list."""
    if peer.append and below.value.strip():
        source = f"annotation {peer.annotation} (added to {below.source})"
        return Setting(f"{below.value},{peer.value}", source, peer.why, Origin.MESH_ANNOTATION)
    return Setting(peer.value, f"annotation {peer.annotation}", peer.why, Origin.MESH_ANNOTATION)


def _our_annotations(annotations: Mapping[str, str]) -> list[tuple[str, str]]:
    """Our `cni-redirect.io/<key>` annotations as (key, value); an unknown key is an error."""
    found = []
    for name, value in annotations.items():
        if not name.startswith(ANNOTATION_PREFIX):
            continue
        key = name[len(ANNOTATION_PREFIX) :]
        if key not in CATALOGUE:
            raise InvalidConfig(
                f"annotation {show(name)}: unknown cni-redirect annotation",
                f"known keys: {', '.join(ANNOTATION_PREFIX + k for k in CATALOGUE)}",
            )
        found.append((key, value))
    return found


def _opts_in(key: str, value: str, settings: Mapping[str, Setting]) -> bool:
    """Under a restricted policy the one thing a pod may say for itself: capture me."""
    if key != OPT_IN_KEY:
        return False
    if value.strip().lower() != "true":
        return False
    return value.strip().lower() != settings[key].value.strip().lower()


def is_enabled(settings: Mapping[str, Setting]) -> bool:
    """The opt-in decision alone, so pods that did not opt in cost nothing more."""
    setting = settings[OPT_IN_KEY]
    try:
        return parse_bool(setting.value)
    except ValueError as exc:
        raise InvalidConfig(f"{setting.source}: invalid value {show(setting.value)}: {exc}") from None
