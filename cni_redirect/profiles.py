"""Mesh profiles: capture a pod the way Istio's or Linkerd's own CNI plugin would, from their annotations.

A profile decides three things: which annotations opt a pod in, how the
mesh's annotations map onto catalogue keys, and the mesh's defaults. What a
mesh reads from the pod spec (the proxy's UID, DNS capture) CRI does not give
us, so it comes from the conflist entry's `defaults`. Our own
`cni-redirect.io/*` annotations still apply on top and win (settings.merge_settings).

Every mapping here was read in the mesh's source; docs/mesh-profiles.md names
the files, and where we differ from the peer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .errors import InvalidConfig
from .settings import PeerSetting
from .values import show

OWN_VOCABULARY = "cni-redirect"  # the entry's `profile` when no mesh's annotations are read

ISTIO_STATUS = "sidecar.istio.io/status"
ISTIO_INJECT = "sidecar.istio.io/inject"
ISTIO_MODE = "sidecar.istio.io/interceptionMode"
ISTIO_REROUTE = "istio.io/reroute-virtual-interfaces"  # preferred over the older kubevirtInterfaces
LINKERD_VERSION = "linkerd.io/proxy-version"
LINKERD_INJECT = "linkerd.io/inject"

_GO_FALSE = ("0", "f", "F", "false", "FALSE", "False")  # what Go's strconv.ParseBool reads as false


@dataclass(frozen=True)
class PeerKey:
    """One mesh annotation (or several, preferred first) and the catalogue key it sets."""

    names: tuple[str, ...]
    key: str
    append: bool = False  # add to the configured list instead of replacing it
    ignore_empty: bool = False  # Linkerd reads an empty annotation as absent
    translate: Callable[[str, str], str | None] | None = None  # (annotation, value) -> value, or None: no setting


@dataclass(frozen=True)
class Profile:
    name: str
    defaults: Mapping[str, str]
    keys: tuple[PeerKey, ...]
    opt_in: Callable[[Mapping[str, str]], PeerSetting | None]
    opted_in: Mapping[str, str]  # the annotations of a pod the mesh's injector opted in, as the agent checks entries
    always: Mapping[str, str] = field(default_factory=dict)

    def read(self, annotations: Mapping[str, str]) -> list[PeerSetting]:
        """The catalogue settings this pod's mesh annotations ask for, in layering order."""
        found: list[PeerSetting] = []
        decision = self.opt_in(annotations)
        if decision is not None:
            found.append(decision)
        for peer in self.keys:
            name = next((n for n in peer.names if n in annotations), None)
            if name is None:
                continue
            value = annotations[name]
            if peer.ignore_empty and not value.strip():
                continue
            if peer.translate is not None:
                translated = peer.translate(name, value)
                if translated is None:
                    continue
                value = translated
            found.append(PeerSetting(peer.key, name, value, append=peer.append))
        return found


# --- Istio (sidecar mode): cni/pkg/plugin/sidecar_redirect.go, plugin.go ---


def _istio_opt_in(annotations: Mapping[str, str]) -> PeerSetting | None:
    """Istio acts on injected pods (the injector always writes `status`), unless `inject` is false or mode NONE."""
    if annotations.get(ISTIO_INJECT, "").strip() in _GO_FALSE:
        return PeerSetting("enabled", ISTIO_INJECT, "false", why=f"{ISTIO_INJECT} is false")
    if ISTIO_STATUS not in annotations:
        return None
    if annotations.get(ISTIO_MODE) == "NONE":
        return PeerSetting("enabled", ISTIO_MODE, "false", why=f"{ISTIO_MODE} is NONE: Istio expects no capture")
    return PeerSetting("enabled", ISTIO_STATUS, "true")


def _istio_mode(name: str, value: str) -> str | None:
    modes = {"REDIRECT": "redirect", "TPROXY": "tproxy"}
    if value == "NONE":
        return None  # handled by the opt-in: skip the pod, do not fail it
    if value not in modes:
        raise InvalidConfig(f"annotation {name}: invalid value {show(value)}: must be REDIRECT, TPROXY or NONE")
    return modes[value]


ISTIO = Profile(
    name="istio",
    defaults={
        "proxy-uid": "1337",
        "proxy-gid": "1337",
        "outbound-port": "15001",
        "inbound-port": "15006",
        "exclude-inbound-ports": "15020",
        "exclude-outbound-ports": "15020",
        "loopback-cidrs": "127.0.0.1/32,::1/128",
    },
    keys=(
        PeerKey((ISTIO_MODE,), "inbound-mode", translate=_istio_mode),
        PeerKey(("traffic.sidecar.istio.io/includeOutboundIPRanges",), "include-outbound-cidrs"),
        PeerKey(("traffic.sidecar.istio.io/excludeOutboundIPRanges",), "exclude-outbound-cidrs"),
        PeerKey(("traffic.sidecar.istio.io/includeInboundPorts",), "include-inbound-ports"),
        PeerKey(("traffic.sidecar.istio.io/excludeInboundPorts",), "exclude-inbound-ports"),
        PeerKey(("traffic.sidecar.istio.io/includeOutboundPorts",), "capture-outbound-ports"),
        PeerKey(("traffic.sidecar.istio.io/excludeOutboundPorts",), "exclude-outbound-ports"),
        PeerKey(("traffic.sidecar.istio.io/excludeInterfaces",), "exclude-interfaces"),
        PeerKey((ISTIO_REROUTE, "traffic.sidecar.istio.io/kubevirtInterfaces"), "reroute-interfaces"),
    ),
    opt_in=_istio_opt_in,
    opted_in={ISTIO_STATUS: '{"initContainers":["istio-validation"],"containers":["istio-proxy"]}'},
    # The status, health and Prometheus ports always; 15008 (HBONE) is always excluded inbound.
    always={"exclude-inbound-ports": "15008,15020,15021,15090"},
)


# --- Linkerd: linkerd2-proxy-init cni-plugin/main.go, pkg/iptables/iptables.go ---


def _linkerd_opt_in(annotations: Mapping[str, str]) -> PeerSetting | None:
    """The injector writes `proxy-version` on every pod it injects; `inject: disabled` opts out."""
    if annotations.get(LINKERD_INJECT, "").strip() == "disabled":
        return PeerSetting("enabled", LINKERD_INJECT, "false", why=f"{LINKERD_INJECT} is disabled")
    if not annotations.get(LINKERD_VERSION, "").strip():
        return None
    return PeerSetting("enabled", LINKERD_VERSION, "true")


LINKERD = Profile(
    name="linkerd",
    defaults={
        "proxy-uid": "2102",
        "outbound-port": "4140",
        "inbound-port": "4143",
        "exclude-inbound-ports": "4190,4191",  # the proxy's control and admin ports
        "capture-own-ip": "false",  # Linkerd returns all of lo; its proxy never reaches its pod's IP via inbound
    },
    keys=(
        PeerKey(("config.linkerd.io/proxy-uid",), "proxy-uid", ignore_empty=True),
        PeerKey(("config.linkerd.io/proxy-gid",), "proxy-gid", ignore_empty=True),
        PeerKey(("config.linkerd.io/skip-outbound-ports",), "exclude-outbound-ports", ignore_empty=True),
        PeerKey(("config.linkerd.io/skip-inbound-ports",), "exclude-inbound-ports", append=True, ignore_empty=True),
        PeerKey(("config.linkerd.io/skip-subnets",), "exclude-inbound-cidrs", ignore_empty=True),
    ),
    opt_in=_linkerd_opt_in,
    opted_in={LINKERD_VERSION: "stable"},
)

PROFILES: dict[str, Profile] = {"istio": ISTIO, "linkerd": LINKERD}
#: The entry's `profile` values, listed once: the conflist schema and `render --profile` use these.
PROFILE_NAMES: tuple[str, ...] = (OWN_VOCABULARY, *PROFILES)


def profile_named(name: str) -> Profile | None:
    """The profile for the entry's `profile` field; None for our own vocabulary only."""
    return PROFILES.get(name)
