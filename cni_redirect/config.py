"""The conflist entry, the pod's identity and its annotations.

The runtime hands us our own conflist entry on stdin, with `cniVersion`,
`name`, `prevResult` and `runtimeConfig` added. Our keys are validated
strictly; keys we do not know are left alone (other tools annotate configs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from .errors import InvalidConfig
from .profiles import OWN_VOCABULARY, PROFILE_NAMES
from .spec import CATALOGUE, DEFAULT_MAX_SET_ELEMENTS, invalid_config

ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
PLUGIN_TYPE = "cni-redirect"

#: Keys of the entry that PluginConf leaves to others, for the docs' table (scripts/gen_docs.py): the front
#: reads `agent_socket` itself, without a parser (wire.config_agent_socket).
OTHER_ENTRY_KEYS = {
    "agent_socket": (
        "hand requests to the warm node agent on this socket; set by the installer when the agent serves requests",
        "none: in-process",
    ),
}


class PluginConf(BaseModel):
    """Our conflist entry, as the admin wrote it plus what the runtime adds."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    cni_version: str = Field(alias="cniVersion")
    name: str = ""
    type: str = PLUGIN_TYPE
    # JSON's own types, no lax coercion ("true" is not a boolean): status.status_of checks the same without pydantic.
    capabilities: dict[str, StrictBool] = Field(
        default_factory=dict,
        description="must declare `io.kubernetes.cri.pod-annotations` so containerd and CRI-O pass annotations",
        json_schema_extra={"shown": "-"},
    )
    defaults: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "catalogue keys without prefix, string values (numbers and booleans are accepted and turned into strings)"
        ),
    )
    exclude_namespaces: list[str] = Field(
        default_factory=lambda: ["kube-system"],
        description="pods in these namespaces are never touched, annotated or not",
    )
    profile: str = Field(
        OWN_VOCABULARY,
        description=(
            "`cni-redirect`: our annotations only. `istio`, `linkerd`: also read the mesh's own annotations "
            "with its semantics and defaults ([Meshes](#meshes-istio-and-linkerd))"
        ),
    )
    annotation_policy: Literal["open", "restricted"] = Field(
        "open",
        description=(
            '`open`: annotations override defaults. `restricted`: a pod may only opt in (`enabled: "true"` '
            "where the default is `false`); every other `cni-redirect.io/` annotation is ignored (and "
            "logged) unless its key is in `pod_settable`, so only the admin decides what escapes capture"
        ),
    )
    pod_settable: list[str] = Field(
        default_factory=list,
        description=(
            'catalogue keys a pod may still set under `restricted`, e.g. `["exclude-inbound-ports"]`: the '
            "admin's explicit decision"
        ),
    )
    allow_root_proxy_uid: StrictBool = Field(
        False, description="allow UID/GID 0 in `proxy-uid`, `proxy-gid`, `exclude-uids`"
    )
    max_set_elements: StrictInt = Field(
        DEFAULT_MAX_SET_ELEMENTS, ge=1, le=1_000_000, description="most entries per list after merging"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "warning",
        description=(
            "what reaches stderr: `debug`, `info`, `warning`, `error`. libcni hands a plugin's stderr to its "
            "caller, so podman would print info lines on the user's terminal"
        ),
    )
    log_file: str | None = Field(
        None,
        description=(
            "every command appends one JSON line, whatever `log_level`: command, pod, container, duration, "
            "outcome, note"
        ),
    )
    prev_result: dict | None = Field(None, alias="prevResult")
    runtime_config: dict = Field(default_factory=dict, alias="runtimeConfig")

    @field_validator("defaults", mode="before")
    @classmethod
    def _stringify_defaults(cls, value: object) -> object:
        """Accept JSON numbers and booleans for admins' convenience; the catalogue speaks strings."""
        if not isinstance(value, dict):
            return value
        out = {}
        for key, item in value.items():
            if isinstance(item, bool):
                out[key] = "true" if item else "false"
            elif isinstance(item, int):
                out[key] = str(item)
            elif isinstance(item, str):
                out[key] = item
            else:
                raise ValueError(f"defaults.{key} must be a string, got {type(item).__name__}")
        return out

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in PROFILE_NAMES:
            raise ValueError(f"Input should be {', '.join(repr(n) for n in PROFILE_NAMES)}")
        return value

    @field_validator("pod_settable")
    @classmethod
    def _catalogue_keys_only(cls, value: list[str]) -> list[str]:
        unknown = [key for key in value if key not in CATALOGUE]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a catalogue key (known: {', '.join(CATALOGUE)})")
        return value

    @field_validator("exclude_namespaces")
    @classmethod
    def _no_empty_namespace(cls, value: list[str]) -> list[str]:
        if any(not ns for ns in value):
            raise ValueError("must not contain an empty namespace")
        return value

    def annotations(self) -> dict[str, str]:
        """The pod's annotations, if the runtime passed them (containerd, CRI-O do)."""
        raw = self.runtime_config.get(ANNOTATIONS_CAPABILITY) or {}
        if not isinstance(raw, dict):
            raise InvalidConfig(f"runtimeConfig.{ANNOTATIONS_CAPABILITY} must be an object, got {type(raw).__name__}")
        annotations = {}
        for key, value in raw.items():
            if not isinstance(value, str):
                raise InvalidConfig(
                    f"annotation {str(key)[:120]!r}: value must be a string, got {type(value).__name__}"
                )
            annotations[str(key)] = value
        return annotations


def parse_conf(raw: Mapping[str, object]) -> PluginConf:
    """Validate our conflist entry; errors name the field and the value."""
    try:
        return PluginConf.model_validate(raw)
    except ValidationError as exc:
        raise invalid_config(
            exc, lambda loc, value: ("conflist field " + (".".join(map(str, loc)) or "config"), value)
        ) from None


@dataclass(frozen=True)
class PodRef:
    """Who the sandbox belongs to, from CNI_ARGS; podman sends only a name."""

    namespace: str | None
    name: str | None
    uid: str | None

    def __str__(self) -> str:
        return f"{self.namespace or '-'}/{self.name or '-'}"


def parse_cni_args(text: str) -> dict[str, str]:
    """Parse `K=V;K2=V2`; items without `=` are ignored, as libcni's own parser does."""
    args = {}
    for item in text.split(";"):
        key, sep, value = item.partition("=")
        if sep and key:
            args[key.strip()] = value.strip()
    return args


def pod_ref(args: Mapping[str, str]) -> PodRef:
    return PodRef(args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME"), args.get("K8S_POD_UID"))
