"""The docs' reference tables, generated from the code they describe, so they cannot drift from it.

- the annotation catalogue, from `spec.CaptureSpec` (each key's description and built-in default);
- the conflist entry's fields, from `config.PluginConf` (and `config.OTHER_ENTRY_KEYS`);
- the node agent's metrics, from the registry `node.metrics.Metrics` builds;
- the Helm chart's schema for `entry` (values.schema.json), from `config.PluginConf`: a bad value is refused by
  `helm install` with the same names and choices the agent would use.

Each table sits in a docs file between `<!-- generated: NAME -->` and `<!-- end: NAME -->`.
`scripts/gen_docs.py` rewrites them; `--check` only compares and exits 1 naming what drifted
(tests/test_docs.py runs it).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cni_redirect.config import OTHER_ENTRY_KEYS, PluginConf  # noqa: E402
from cni_redirect.node.agent.metrics import Metrics  # noqa: E402
from cni_redirect.spec import ANNOTATION_PREFIX, CaptureSpec  # noqa: E402
from cni_redirect.valueschema import defaults_schema, kind_schemas, root_consent  # noqa: E402

#: The runtime adds these to our entry (or they name it): not the admin's settings.
RUNTIME_FIELDS = {"cni_version", "name", "type", "prev_result", "runtime_config"}


def annotations_table() -> str:
    rows = ["| annotation | value | default |", "|---|---|---|"]
    for info in CaptureSpec.model_fields.values():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        default = f"`{info.default}`" if info.default else ("empty" if extra.get("list") else "unset")
        rows.append(f"| `{ANNOTATION_PREFIX}{info.alias}` | {info.description} | {default} |")
    return "\n".join(rows)


def entry_table() -> str:
    rows = ["| field | meaning | default |", "|---|---|---|"]
    for name, info in PluginConf.model_fields.items():
        if name in RUNTIME_FIELDS:
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        value = info.get_default(call_default_factory=True)
        shown = value if isinstance(value, str) else json.dumps(value)
        default = extra.get("shown") or ("none" if value is None else f"`{shown}`")
        rows.append(f"| `{info.alias or name}` | {info.description} | {default} |")
    for key, (meaning, default) in OTHER_ENTRY_KEYS.items():
        rows.append(f"| `{key}` | {meaning} | {default} |")
    return "\n".join(rows)


def metrics_table() -> str:
    """Every metric the agent's Metrics registers, with its label names (read off each metric object: a labelled
    metric with no child yet has no sample to show them)."""
    from prometheus_client.metrics import MetricWrapperBase

    rows = ["| metric | type | labels | what |", "|---|---|---|---|"]
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        kind = metric._type
        name = metric._name + ("_total" if kind == "counter" else "")
        labels = ", ".join(f"`{label}`" for label in metric._labelnames) or "-"
        rows.append(f"| `{name}` | {kind} | {labels} | {metric._documentation} |")
    rows.append("| `process_*` | gauge, counter | - | CPU, memory, open fds of the agent process (prometheus_client) |")
    return "\n".join(rows)


TABLES = {
    "annotations": ("docs/configuration.md", annotations_table),
    "entry": ("docs/configuration.md", entry_table),
    "metrics": ("docs/operations.md", metrics_table),
}


CHART_SCHEMA = "install/helm/cni-redirect/values.schema.json"


def chart_entry_schema() -> dict:
    """The conflist entry's admin settings as JSON schema: unknown keys refused (a typo is not a no-op)."""
    from cni_redirect.status import CATALOGUE_KEYS, PROFILE_NAMES

    properties = {}
    for name, field in PluginConf.model_json_schema()["properties"].items():
        if PluginConf.model_fields.get(name) is None or name in RUNTIME_FIELDS or name == "capabilities":
            continue
        field = {k: v for k, v in field.items() if k not in ("title", "shown", "default")}
        field["description"] = re.sub(r" \(\[[^]]*\]\(#[^)]*\)\)", "", field.get("description", ""))
        properties[name] = field
    keys = defaults_schema()
    assert list(keys) == list(CATALOGUE_KEYS)
    properties["defaults"].update(properties=keys, additionalProperties=False)
    properties["exclude_namespaces"]["items"] = {"type": "string", "minLength": 1}
    properties["profile"]["enum"] = list(PROFILE_NAMES)
    properties["pod_settable"]["items"] = {"enum": list(CATALOGUE_KEYS)}
    for key, (meaning, _default) in OTHER_ENTRY_KEYS.items():
        properties[key] = {"type": "string", "description": meaning}
    return {"type": "object", "additionalProperties": False, "properties": properties, **root_consent()}


def chart_schema(text: str) -> str:
    schema = json.loads(text)
    schema["properties"]["entry"] = chart_entry_schema()
    schema["$defs"] = kind_schemas()
    return json.dumps(schema, indent=2) + "\n"


def render(text: str, name: str, table: str) -> str:
    pattern = re.compile(rf"(<!-- generated: {name} -->\n).*?(\n<!-- end: {name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"gen_docs: no '<!-- generated: {name} -->' ... '<!-- end: {name} -->' block")
    return pattern.sub(lambda m: m[1] + table + m[2], text)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    drifted = []
    for name, (path, make) in TABLES.items():
        file = REPO / path
        text = file.read_text()
        new = render(text, name, make())
        if new != text:
            drifted.append(f"{path} ({name})")
            if not check:
                file.write_text(new)
    file = REPO / CHART_SCHEMA
    text = file.read_text()
    new = chart_schema(text)
    if new != text:
        drifted.append(f"{CHART_SCHEMA} (entry)")
        if not check:
            file.write_text(new)
    if check and drifted:
        print(f"gen_docs: out of date: {', '.join(drifted)}: run scripts/gen_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
