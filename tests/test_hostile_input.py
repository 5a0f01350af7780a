"""Generated hostile input: every case ends in a correct table or a clean CNI error, never half-done.

The dispatcher runs in-process over the in-memory backend, so thousands of
cases take seconds; tests/integration/test_faults.py repeats the idea against
the real kernel.
"""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni_redirect.result import SUPPORTED_VERSIONS
from cni_redirect.spec import ANNOTATION_PREFIX, CATALOGUE
from cni_redirect.testing.netlab import plugin_conf
from tests.support import DEFAULT_ENV, FAKE_NETNS, INJECTIONS, call

CLEAN_CODES = {1, 4, 6, 7, 11}
NETNS = FAKE_NETNS
ENV = {**DEFAULT_ENV, "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"}


def run_add(stdin: bytes, env: dict[str, str] = ENV):
    variables: dict[str, str | None] = {k: env.get(k) for k in DEFAULT_ENV}
    run = call("ADD", stdin, None, **variables)
    return run.rc, run.stdout, run.stderr, run.backend


# --- an oracle that does not reuse the code under test: what the settings asked for, read off the table ---


def _set_members(listing: list[dict], name: str) -> list[tuple[int, int]]:
    """A set's elements as numeric intervals, from the fake kernel's listing."""
    for obj in listing:
        body = obj.get("set")
        if body and body["name"] == name:
            spans = []
            for element in body.get("elem", []):
                if isinstance(element, dict) and "range" in element:
                    spans.append(tuple(element["range"]))
                elif isinstance(element, dict) and "prefix" in element:
                    net = ipaddress.ip_network(f"{element['prefix']['addr']}/{element['prefix']['len']}")
                    spans.append((int(net.network_address), int(net.broadcast_address)))
                elif isinstance(element, str):
                    spans.append((int(ipaddress.ip_address(element)),) * 2)
                else:
                    spans.append((element, element))
            return spans
    return []


def _covered(spans: list[tuple[int, int]], low: int, high: int) -> bool:
    return any(a <= low and high <= b for a, b in spans)


def _effective(stdin: bytes) -> dict[str, str]:
    """The catalogue values that applied: built-in, then conflist defaults, then annotations."""
    conf = json.loads(stdin)
    values = dict(CATALOGUE)
    values.update(conf.get("defaults") or {})
    annotations = (conf.get("runtimeConfig") or {}).get("io.kubernetes.cri.pod-annotations") or {}
    values.update({k[len(ANNOTATION_PREFIX) :]: v for k, v in annotations.items() if k.startswith(ANNOTATION_PREFIX)})
    return values


def assert_table_honours_settings(stdin: bytes, listing: list[dict] | None, dump: str) -> None:
    values = _effective(stdin)
    assert (listing is not None) == (values["enabled"].strip().lower() == "true")
    if listing is None:
        return
    assert f"meta skuid {int(values['proxy-uid'])} counter return" in dump
    for item in filter(None, (i.strip() for i in values["exclude-outbound-ports"].split(","))):
        low, _, high = item.partition("-")
        assert _covered(_set_members(listing, "out_exclude_ports"), int(low), int(high or low)), item
    for item in filter(None, (i.strip() for i in values["exclude-outbound-cidrs"].split(","))):
        net = ipaddress.ip_network(item, strict=False)
        name = "out_exclude_v4" if net.version == 4 else "out_exclude_v6"
        assert _covered(_set_members(listing, name), int(net.network_address), int(net.broadcast_address)), item
    if values["include-outbound-ports"].strip() == "*" and values["include-outbound-cidrs"].strip() == "*":
        assert f"redirect to :{int(values['outbound-port'])}" in dump


def assert_clean_outcome(stdin: bytes, env: dict[str, str] = ENV) -> int:
    """Success with a table that does what the settings say, or a clean CNI error and no table at all."""
    rc, out, err, backend = run_add(stdin, env)
    assert "Traceback" not in err, err
    result = json.loads(out)
    if rc == 0:
        assert "code" not in result
        assert_table_honours_settings(stdin, backend.tables.get(NETNS), backend.dump(NETNS))
    else:
        assert rc == 1
        assert set(result) == {"cniVersion", "code", "msg", "details"}
        assert result["code"] in CLEAN_CODES, result
        assert backend.tables == {}, "an error must leave no table"
        assert len(result["msg"]) < 2000
    return rc


values = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789,-*. /:abcdefABCDEF", max_size=80),
    st.sampled_from(INJECTIONS),
    st.integers(min_value=-(2**40), max_value=2**40).map(str),
    st.lists(st.integers(min_value=-5, max_value=70000), max_size=30).map(lambda xs: ",".join(map(str, xs))),
    st.lists(st.tuples(st.integers(0, 70000), st.integers(0, 70000)), max_size=10).map(
        lambda xs: ",".join(f"{a}-{b}" for a, b in xs)
    ),
    st.lists(
        st.one_of(
            st.ip_addresses(v=4).map(str),
            st.ip_addresses(v=6).map(str),
            st.tuples(st.ip_addresses(), st.integers(0, 140)).map(lambda t: f"{t[0]}/{t[1]}"),
        ),
        max_size=20,
    ).map(",".join),
)
keys = st.sampled_from([ANNOTATION_PREFIX + k for k in CATALOGUE] + [ANNOTATION_PREFIX + "bogus", "other.io/x"])


@given(st.dictionaries(keys, values, max_size=6), st.sampled_from(SUPPORTED_VERSIONS))
def test_any_annotations(annotations, version):
    stdin = json.dumps(plugin_conf({f"{ANNOTATION_PREFIX}enabled": "true", **annotations}, version=version))
    assert_clean_outcome(stdin.encode())


@given(st.dictionaries(st.sampled_from(list(CATALOGUE)), values, max_size=5))
def test_any_conflist_defaults(defaults):
    assert_clean_outcome(json.dumps(plugin_conf(None, defaults={"enabled": "true", **defaults})).encode())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
CONF_KEYS = [
    "cniVersion",
    "name",
    "type",
    "defaults",
    "exclude_namespaces",
    "annotation_policy",
    "allow_root_proxy_uid",
    "max_set_elements",
    "log_level",
    "prevResult",
    "runtimeConfig",
    "capabilities",
]


@given(st.dictionaries(st.sampled_from(CONF_KEYS), json_values, min_size=1, max_size=4))
def test_wrong_json_types_anywhere_in_the_config(overrides):
    conf = {**plugin_conf({f"{ANNOTATION_PREFIX}enabled": "true"}), **overrides}
    if isinstance(conf.get("log_file"), str):
        conf.pop("log_file")
    assert_clean_outcome(json.dumps(conf).encode())


@given(st.integers(min_value=0, max_value=400))
def test_truncated_config(cut):
    stdin = json.dumps(plugin_conf({f"{ANNOTATION_PREFIX}enabled": "true"})).encode()
    assert_clean_outcome(stdin[:cut])


@given(st.binary(max_size=200))
def test_random_bytes_on_stdin(data):
    assert_clean_outcome(data)


@given(st.sets(st.sampled_from(["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_COMMAND"]), min_size=1))
def test_missing_env_vars(missing):
    env = {k: v for k, v in ENV.items() if k not in missing}
    stdin = json.dumps(plugin_conf({f"{ANNOTATION_PREFIX}enabled": "true"})).encode()
    rc = assert_clean_outcome(stdin, env)
    assert rc == (0 if missing == {"CNI_ARGS"} else 1)


def test_every_injection_in_every_field_is_refused():
    for key in CATALOGUE:
        if key == "enabled":
            continue
        for attempt in INJECTIONS[:10]:
            stdin = json.dumps(plugin_conf({f"{ANNOTATION_PREFIX}enabled": "true", ANNOTATION_PREFIX + key: attempt}))
            rc, out, _, backend = run_add(stdin.encode())
            assert rc == 1, (key, attempt)
            assert json.loads(out)["code"] == 7 and backend.tables == {}
            assert ANNOTATION_PREFIX + key in json.loads(out)["msg"]


@pytest.mark.slow
def test_hundred_thousand_entry_lists_hit_the_limit_cleanly():
    ports = ",".join(str(p) for p in range(1, 65536, 2))  # 32768 distinct single ports
    cidrs = ",".join(f"10.{i // 256 % 256}.{i % 256}.{(i // 65536) * 8}/29" for i in range(100_000))
    for key, value in (("exclude-outbound-ports", ports), ("exclude-outbound-cidrs", cidrs)):
        stdin = json.dumps(plugin_conf({f"{ANNOTATION_PREFIX}enabled": "true", ANNOTATION_PREFIX + key: value}))
        rc, out, _, backend = run_add(stdin.encode())
        assert rc == 1 and "max_set_elements" in json.loads(out)["msg"], key
        raised = plugin_conf({f"{ANNOTATION_PREFIX}enabled": "true", ANNOTATION_PREFIX + key: value})
        raised["max_set_elements"] = 200_000
        rc, _, _, backend = run_add(json.dumps(raised).encode())
        assert rc == 0 and backend.tables


def test_overlapping_duplicate_and_mixed_family_lists_are_canonical():
    messy = plugin_conf(
        {
            f"{ANNOTATION_PREFIX}enabled": "true",
            f"{ANNOTATION_PREFIX}exclude-outbound-ports": "80,80,70-90,85-100,101,1-1",
            f"{ANNOTATION_PREFIX}exclude-outbound-cidrs": "10.0.0.0/8,10.1.0.0/16,::1,fd00::/8,fd00:1::/32,1.2.3.4/32",
        }
    )
    rc, _, _, backend = run_add(json.dumps(messy).encode())
    assert rc == 0
    text = backend.dump(NETNS)
    assert "70-101" in text and "10.1.0.0" not in text and "fd00:1::" not in text
