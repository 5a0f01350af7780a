"""The wire protocol between the front and the CNI server, and the trust rule for socket paths."""

from __future__ import annotations

import json
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni_redirect import wire
from cni_redirect.errors import WireError
from cni_redirect.wire import config_agent_socket, trusted_socket_path


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"agent_socket": "/run/cni-redirect/agent.sock"}, "/run/cni-redirect/agent.sock"),
        ({"agent_socket": "/var/run/cni-redirect/a.sock"}, "/var/run/cni-redirect/a.sock"),
        ({"agent_socket": ""}, None),
        ({}, None),
        ({"agent_socket": "/tmp/agent.sock"}, None),
        ({"agent_socket": "/run/cni-redirect/../docker.sock"}, None),
        ({"agent_socket": "/run/cni-redirect/agent"}, None),
        ({"agent_socket": 5}, None),
    ],
)
def test_agent_socket_is_found_only_when_trustworthy(config, expected):
    stdin = json.dumps({"cniVersion": "1.0.0", "type": "cni-redirect", **config}).encode()
    assert config_agent_socket(stdin) == expected
    assert config_agent_socket(json.dumps({"cniVersion": "1.0.0", **config}, indent=4).encode()) == expected


def test_an_annotation_value_cannot_smuggle_a_socket_path():
    annotations = {"x": '"agent_socket": "/run/cni-redirect/evil.sock"'}
    stdin = json.dumps({"runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}}).encode()
    assert config_agent_socket(stdin) is None


@pytest.mark.parametrize(
    ("path", "trusted"),
    [
        ("/run/cni-redirect/agent.sock", True),
        ("/var/run/cni-redirect/a-b_c.1.sock", True),
        ("/run/cni-redirect/../docker.sock", False),
        ("/run/cni-redirect/./x.sock", False),
        ("/run/cni-redirect/a\\b.sock", False),
        ('/run/cni-redirect/a"b.sock', False),
        ("/run/cni-redirect/a b.sock", False),
        ("/run/cni-redirect/a\nb.sock", False),
        ("/run/cni-redirect/agent", False),
        ("/tmp/agent.sock", False),
        ("run/cni-redirect/agent.sock", False),
    ],
)
def test_one_trust_rule_for_socket_paths(path, trusted):
    assert trusted_socket_path(path) is trusted


def test_request_and_reply_round_trip_with_the_netns_fd():
    front, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        env = {"CNI_COMMAND": "ADD", "CNI_NETNS": "/run/netns/x", "PATH": "/bin", "HOME": "/root"}
        wire.send_request(front, env, b'{"cniVersion": "1.0.0"}', fd)
        got_env, stdin, fds = wire.read_request(server)
        assert got_env == {"CNI_COMMAND": "ADD", "CNI_NETNS": "/run/netns/x"}, "only CNI_* travels"
        assert stdin == b'{"cniVersion": "1.0.0"}'
        assert len(fds) == 1 and os.path.samestat(os.fstat(fds[0]), os.fstat(fd))
        os.close(fds[0])
        server.sendall(wire.encode_reply(1, b'{"code": 7}', b"log line\n"))
        server.close()
        reply = front.recv(1000)
        assert wire.decode_reply(reply) == (1, b'{"code": 7}', b"log line\n")
    finally:
        os.close(fd)
        front.close()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "truncated request header"),
        (b"GET / HTTP/1.0\r\nHost: node\r\n\r\n", "not a cni-redirect request"),
        (b"CNIR1" + (10**12).to_bytes(8, "big") * 2, "too large"),
        (b"CNIR1" + (5).to_bytes(8, "big") + (5).to_bytes(8, "big") + b"CNI_", "truncated request body"),
    ],
)
def test_malformed_requests_are_wire_errors(payload, reason):
    front, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with front, server:
        front.sendall(payload)
        front.shutdown(socket.SHUT_WR)
        with pytest.raises(WireError, match=reason):
            wire.read_request(server)


def test_a_reply_too_short_is_a_wire_error():
    with pytest.raises(WireError, match="without a reply"):
        wire.decode_reply(b"\x00\x00")


def test_exchange_with_nobody_listening_is_a_wire_error(tmp_path):
    with pytest.raises(WireError):
        wire.exchange(str(tmp_path / "none.sock"), {}, b"{}", None, timeout=1)


# --- the scanner agrees with json.loads on where agent_socket is, for any document ---

SOCKETS = ["/run/cni-redirect/agent.sock", "/var/run/cni-redirect/x.sock", "", "/tmp/evil.sock", "/run/cni-redirect/a"]
KEYS = st.sampled_from(["agent_socket", "agent_socket", "agent_socket ", "runtimeConfig", "x", 'a"b', "\\", "é"])
SCALARS = st.one_of(
    st.sampled_from(SOCKETS), st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12)
)
ANY_KEY = st.one_of(KEYS, st.text(max_size=6))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_KEY, inner, max_size=4),
    max_leaves=15,
)


def _expected(document: object) -> str | None:
    value = document.get("agent_socket") if isinstance(document, dict) else None
    return value if isinstance(value, str) and trusted_socket_path(value) else None


@given(
    st.one_of(st.dictionaries(ANY_KEY, VALUES, max_size=6), VALUES),
    st.sampled_from([None, 0, 2]),
    st.booleans(),
    st.booleans(),
)
@settings(max_examples=400, deadline=None)
@pytest.mark.slow
def test_the_top_level_scanner_agrees_with_json_loads(document, indent, ascii_only, escape_key):
    text = json.dumps(document, indent=indent, ensure_ascii=ascii_only)
    if escape_key:  # same key for json.loads, different bytes for a naive search
        text = text.replace('"agent_socket"', '"agent\\u005fsocket"').replace("/cni-redirect/", "\\/cni-redirect\\/")
    raw = text.encode()
    assert config_agent_socket(raw) == _expected(json.loads(raw))


def test_a_pod_annotation_key_named_agent_socket_is_not_the_entrys():
    annotations = {"agent_socket": "/run/cni-redirect/x.sock"}
    conf = {"cniVersion": "1.0.0", "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}}
    assert config_agent_socket(json.dumps(conf).encode()) is None
    # A runtime that writes runtimeConfig before the entry's own keys cannot have a pod turn the server off.
    conf = {"runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"agent_socket": ""}}, "agent_socket": SOCKETS[0]}
    assert config_agent_socket(json.dumps(conf).encode()) == SOCKETS[0]


@pytest.mark.parametrize("raw", [b"", b"[]", b"{", b'{"agent_socket": ', b"not json", b'{"a": 1} x', b"\xff"])
def test_the_scanner_gives_up_on_what_is_not_a_json_object(raw):
    assert config_agent_socket(raw) is None
