"""One STATUS (and GC) answer per entry, whoever answers: the CNI server's plugin, the plugin in-process, or the
front with neither (#31 item 3). `status.status_of` is that answer; these hold it to ADD's own parse of the entry
and to the constants it keeps so as not to load pydantic."""

from __future__ import annotations

import io
import json
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni_redirect import status
from cni_redirect.config import PluginConf, parse_conf
from cni_redirect.errors import InvalidConfig
from cni_redirect.fake import MemoryBackend
from cni_redirect.logs import EventLog
from cni_redirect.plugin import RedirectPlugin
from cni_redirect.profiles import PROFILE_NAMES
from cni_redirect.skel import dispatch
from cni_redirect.spec import CATALOGUE
from cni_redirect.testing.netlab import plugin_conf
from tests.support import INJECTIONS


def test_the_constants_are_the_catalogue_the_profiles_and_the_entry_model():
    assert status.PROFILE_NAMES == PROFILE_NAMES
    assert tuple(CATALOGUE) == status.CATALOGUE_KEYS
    fields = PluginConf.model_fields
    assert get_args(fields["log_level"].annotation) == status.LOG_LEVELS
    assert get_args(fields["annotation_policy"].annotation) == status.ANNOTATION_POLICIES
    checked = [name for name, _, _ in status._ENTRY_FIELDS]
    wire_names = [field.alias or name for name, field in fields.items()]
    assert checked == [n for n in wire_names if n != "cniVersion"], "every field of the entry, in the model's order"


def via_dispatcher(command: str, stdin: bytes) -> tuple[int, bytes]:
    """What the CNI server answers (the same dispatcher and plugin run there) and the plugin in-process."""
    out = io.StringIO()
    plugin = RedirectPlugin(MemoryBackend(), EventLog(io.StringIO()))
    rc = dispatch(plugin, {"CNI_COMMAND": command}, stdin, out, out)
    return rc, out.getvalue().encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2_000_000) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
ENTRY_KEYS = [name for name, _, _ in status._ENTRY_FIELDS] + ["agent_socket", "unknown_key"]
NEAR_MISSES = st.sampled_from(
    [
        ("log_level", "loud"),
        ("log_level", "DEBUG"),
        ("max_set_elements", 0),
        ("max_set_elements", "16384"),
        ("max_set_elements", 1_000_001),
        ("max_set_elements", True),
        ("allow_root_proxy_uid", "true"),
        ("allow_root_proxy_uid", 1),
        ("profile", "Istio"),
        ("annotation_policy", "closed"),
        ("pod_settable", ["proxy-uid", "bogus"]),
        ("pod_settable", "proxy-uid"),
        ("exclude_namespaces", ["kube-system", ""]),
        ("defaults", {"proxy-uid": 1.5}),
        ("defaults", {"proxy-uid": None}),
        ("capabilities", {"io.kubernetes.cri.pod-annotations": "true"}),
        ("runtimeConfig", None),
        ("prevResult", []),
        ("log_file", 7),
        *[("log_level", attempt) for attempt in INJECTIONS[:5]],
    ]
)


def entries() -> st.SearchStrategy[dict]:
    base = plugin_conf({"cni-redirect.io/enabled": "true"}, version="1.1.0")
    base.pop("log_file", None)  # the answer must not write into a real log file
    wrong_types = st.dictionaries(st.sampled_from(ENTRY_KEYS), json_values, max_size=3)
    near = st.lists(NEAR_MISSES, max_size=2).map(dict)
    return st.tuples(wrong_types, near).map(lambda parts: {**base, **parts[0], **parts[1], "cniVersion": "1.1.0"})


def _loggable(entry: dict) -> bool:
    return not isinstance(entry.get("log_file"), str)


@settings(max_examples=400)
@given(entries(), st.sampled_from(["STATUS", "GC"]))
def test_the_front_and_the_dispatcher_give_one_answer_for_any_entry(entry, command):
    if not _loggable(entry):
        entry = {**entry, "log_file": None}
    stdin = json.dumps(entry).encode()
    assert status.answer({"CNI_COMMAND": command}, stdin) == via_dispatcher(command, stdin)


@settings(max_examples=400)
@given(entries())
def test_status_refuses_exactly_the_entries_that_add_refuses(entry):
    """status_of's checks are ADD's parse of the entry (config.parse_conf), without pydantic: the same verdict,
    naming the same field."""
    problem = status.entry_problem(entry)
    try:
        parse_conf(entry)
    except InvalidConfig as error:
        assert problem, f"ADD refuses ({error.msg}); STATUS must too"
        field = problem.split(":")[0].removeprefix("conflist field ")
        assert error.msg.startswith(f"conflist field {field}") or field in error.details, (problem, error.msg)
    else:
        assert problem == "", f"ADD accepts the entry; STATUS refused it: {problem}"


@pytest.mark.parametrize(
    ("field", "value"),
    [("log_level", "loud"), ("max_set_elements", 0), ("profile", "nope"), ("allow_root_proxy_uid", "yes")],
)
@pytest.mark.parametrize("command", ["STATUS", "GC"])
def test_a_broken_entry_is_code_7_naming_the_field_on_every_path(field, value, command):
    """The cases the issue names: code 7 via the agent was success without it."""
    stdin = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "cni-redirect", field: value}).encode()
    rc, out = status.answer({"CNI_COMMAND": command}, stdin)
    assert (rc, out) == via_dispatcher(command, stdin)
    error = json.loads(out)
    assert rc == 1 and error["code"] == 7 and error["msg"].startswith(f"conflist field {field}: invalid value")


def test_the_json_reader_reads_as_json_loads_or_declines():
    for doc in [b'{"a": [1, 2.5, null, true, "\\u00e9"]}', b" {}\n", b'{"a": 1, "a": 2}']:
        assert status.wire.json_object(doc) == json.loads(doc)
    for doc in [b"[1]", b'{"a": 1} x', b'{"a\x01": 1}', b"\xff", b"", b"{", b'"x"']:
        assert status.wire.json_object(doc) is None
