"""Pure edits of a node's CNI configuration: find the primary, add or remove our entry.

No I/O beyond reading a directory listing; the installer does the writing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ...config import ANNOTATIONS_CAPABILITY, PLUGIN_TYPE
from ...errors import ConfError

CONF_SUFFIXES = (".conflist", ".conf", ".json")  # what libcni loads, in its own words


def pick_primary(names: Iterable[str], conf_file: str | None = None) -> str | None:
    """The file a runtime uses: the configured one, else the lexically first CNI config (as libcni sorts)."""
    names = sorted(n for n in names if n.endswith(CONF_SUFFIXES))
    if conf_file is not None:
        return conf_file if conf_file in names else None
    return names[0] if names else None


def entry(settings: dict[str, Any]) -> dict[str, Any]:
    """Our conflist entry: type and capability first, then the admin's settings."""
    extra = {k: v for k, v in settings.items() if k not in ("type", "capabilities")}
    return {"type": PLUGIN_TYPE, "capabilities": {ANNOTATIONS_CAPABILITY: True}, **extra}


def parse(name: str, data: bytes) -> tuple[dict[str, Any], bool]:
    """Parse a primary config as a conflist document; a single-plugin config is lifted into one.

    Returns the document and whether it was a single-plugin config.
    """
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfError(f"{name}: not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ConfError(f"{name}: not a JSON object")
    if "plugins" in document:
        if not isinstance(document["plugins"], list) or not all(isinstance(p, dict) for p in document["plugins"]):
            raise ConfError(f"{name}: 'plugins' must be a list of objects")
        return document, False
    if not name.endswith(".conflist") and isinstance(document.get("type"), str):
        return conf_to_conflist(document), True
    raise ConfError(f"{name}: neither a conflist (no 'plugins') nor a single plugin config (no 'type')")


def conf_to_conflist(conf: dict[str, Any]) -> dict[str, Any]:
    plugin = {k: v for k, v in conf.items() if k not in ("cniVersion", "name")}
    return {"cniVersion": conf.get("cniVersion", "0.4.0"), "name": conf.get("name", ""), "plugins": [plugin]}


def is_ours(plugin: dict[str, Any]) -> bool:
    return plugin.get("type") == PLUGIN_TYPE


def names_us(document: dict[str, Any]) -> bool:
    """Whether a conflist document holds an entry of ours."""
    return any(is_ours(plugin) for plugin in document["plugins"])


def with_entry(document: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """The document with exactly one entry of ours, last in the chain."""
    plugins = [p for p in document["plugins"] if not is_ours(p)]
    return {**document, "plugins": [*plugins, ours]}


def without_entry(document: dict[str, Any]) -> dict[str, Any]:
    return {**document, "plugins": [p for p in document["plugins"] if not is_ours(p)]}


def render(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


def conflist_name(name: str) -> str:
    """Where a converted single-plugin config goes."""
    return str(Path(name).with_suffix(".conflist"))
