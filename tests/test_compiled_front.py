"""The compiled front (install/front) against the Python front: the same answers, the same forwarding decision.

The bundle's `cni-redirect` is the compiled front; it execs the Python front for whatever it does not answer
itself. Here (the `fronts` fixture), beside it as `cni-redirect-py`, stands the console script of this
checkout, so what the Python front answers is read straight from it. The warm path through a real CNI
server, with both fronts, is in tests/integration/test_cniserver.py.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from cni_redirect import front, wire

REPO = Path(__file__).resolve().parents[1]


def _run(executable: Path, env: dict[str, str], stdin: bytes = b"", *argv: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run([str(executable), *argv], input=stdin, env={**base, **env}, capture_output=True, timeout=60)


def test_version_is_answered_with_the_python_fronts_constants(fronts):
    compiled = fronts["compiled"]
    proc = _run(compiled, {"CNI_COMMAND": "VERSION"})
    assert proc.returncode == 0 and proc.stdout == front.VERSIONS and proc.stderr == b""


CNI_ENV = {"CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/nonexistent/netns", "CNI_IFNAME": "eth0", "CNI_PATH": "/x"}
NO_SERVER = {"cniVersion": "1.1.0", "name": "n", "type": "cni-redirect"}


@pytest.mark.parametrize(
    ("command", "stdin"),
    [
        ("ADD", b"{not json"),  # refused before any netns is opened
        ("ADD", json.dumps(NO_SERVER).encode()),  # a netns that does not exist, named by the in-process path
        ("CHECK", json.dumps({**NO_SERVER, "agent_socket": "/run/cni-redirect/x.sock"}).encode()),  # no netns fd
        ("STATUS", json.dumps(NO_SERVER).encode()),
        ("STATUS", json.dumps({**NO_SERVER, "cniVersion": "0.4.0"}).encode()),
        ("GC", json.dumps(NO_SERVER).encode()),
        ("BOGUS", b"{}"),
        ("", b"{}"),
    ],
)
def test_what_it_hands_over_is_answered_as_the_python_front_answers(fronts, command, stdin):
    compiled, python = fronts["compiled"], fronts["python"]
    env = {**CNI_ENV, "CNI_COMMAND": command}
    ours, theirs = _run(compiled, env, stdin), _run(python, env, stdin)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
    assert _without_timing(ours.stderr) == _without_timing(theirs.stderr)


def _without_timing(stderr: bytes) -> bytes:
    return b" ".join(word for word in stderr.split() if not word.startswith(b"duration_ms="))


@pytest.mark.parametrize("argv", [["--help"], ["render", "--help"], ["nosuch"], []])
def test_the_command_line_is_the_python_fronts(fronts, argv):
    compiled, python = fronts["compiled"], fronts["python"]
    ours, theirs = _run(compiled, {}, b"", *argv), _run(python, {}, b"", *argv)
    assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)


def test_a_bundle_without_its_python_front_says_so(compiled_front, tmp_path):
    lone = tmp_path / "cni-redirect"
    shutil.copy2(compiled_front, lone)
    add = _run(lone, {**CNI_ENV, "CNI_COMMAND": "ADD"}, json.dumps(NO_SERVER).encode())
    error = json.loads(add.stdout)
    assert add.returncode == 1 and error["code"] == 999 and "cni-redirect-py" in error["msg"], add
    cli = _run(lone, {}, b"", "inspect")
    assert cli.returncode == 1 and cli.stdout == b"" and len(cli.stderr.splitlines()) == 1
    assert b"cni-redirect-py" in cli.stderr and b"reinstall" in cli.stderr


# --- where agent_socket is: the Python front's answers are the corpus, `go test` holds the compiled one to it ---

SOCKETS = ["/run/cni-redirect/agent.sock", "/var/run/cni-redirect/x.sock", "", "/tmp/evil.sock", "/run/cni-redirect/a"]
KEYS = ["agent_socket", "agent_socket", "agent_socket ", "runtimeConfig", "x", 'a"b', "\\", "é", "Agent_socket"]
PATHS = [
    *SOCKETS,
    "/run/cni-redirect/../docker.sock",
    "/run/cni-redirect/./x.sock",
    "/run/cni-redirect/a\\b.sock",
    '/run/cni-redirect/a"b.sock',
    "/run/cni-redirect/a b.sock",
    "/run/cni-redirect/a\nb.sock",
    "/run/cni-redirect/é.sock",
    "run/cni-redirect/agent.sock",
    "/run/cni-redirect/a'b.sock",
    "/run/cni-redirect/a\x7fb.sock",
    "/run/cni-redirect/.sock",
]
GOOD = b'"agent_socket": "/run/cni-redirect/a.sock"'
MALFORMED = [
    b"",
    b"[]",
    b"{",
    b'{"agent_socket": ',
    b"not json",
    b'{"a": 1} x',
    b"\xff",
    b"{" + GOOD,
    b"{" + GOOD + b', "x": tru}',
    b"{" + GOOD + b', "x": NaN}',
    b"{" + GOOD + b', "x": "\xff"}',
    b'{"agent_socket": "/run/cni-redirect/a.s\\ock"}',
    b"{" + GOOD + b",}",
    b"\xef\xbb\xbf{" + GOOD + b"}",
]


def _value(rng: random.Random, depth: int) -> object:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(SOCKETS)
    if kind == 1:
        return rng.choice([None, True, False, 0, -1.5, 10**20])
    if kind == 2:
        return "".join(rng.choice('ab"\\/é\n\u2028{}[],:') for _ in range(rng.randrange(6)))
    if kind in (3, 4):
        return rng.choice(SOCKETS)
    if kind == 5:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS): _value(rng, depth + 1) for _ in range(rng.randrange(5))}


def _refuse(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")


def _strict_json_object(raw: bytes) -> bool:
    """An RFC 8259 object: UTF-8 without a BOM, no NaN or Infinity (json.loads takes both; Go's reader does not)."""
    try:
        return isinstance(json.loads(raw.decode("utf-8"), parse_constant=_refuse), dict)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False


def _corpus() -> dict:
    rng = random.Random(37)
    raws = list(MALFORMED)
    for _ in range(3000):
        document = {rng.choice(KEYS): _value(rng, 1) for _ in range(rng.randrange(7))}
        text = json.dumps(document, indent=rng.choice([None, 0, 2]), ensure_ascii=rng.random() < 0.5)
        if rng.random() < 0.3:  # the same key for json.loads, other bytes for a naive search
            text = text.replace('"agent_socket"', '"agent\\u005fsocket"').replace(
                "/cni-redirect/", "\\/cni-redirect\\/"
            )
        if rng.random() < 0.1:  # a key given twice: the last one counts
            text = text[:-1].rstrip() + (", " if len(text) > 2 else "") + f'"agent_socket": "{rng.choice(SOCKETS)}"}}'
        raws.append(text.encode())
    configs = []
    for raw in raws:
        valid = _strict_json_object(raw)
        found = wire.config_agent_socket(raw)
        configs.append({"config": base64.b64encode(raw).decode(), "expected": found or "", "valid": valid})
    paths = [{"path": path, "trusted": wire.trusted_socket_path(path)} for path in PATHS]
    return {"configs": configs, "paths": paths}


def test_it_finds_the_agent_socket_the_python_front_finds_and_trusts_the_same_paths(go, tmp_path):
    corpus = _corpus()
    found = sum(1 for c in corpus["configs"] if c["expected"])
    assert found > 200 and len(corpus["configs"]) - found > 200, "the corpus must hold both answers, many times"
    assert sum(1 for c in corpus["configs"] if not c["valid"]) >= len(MALFORMED)
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(corpus))
    env = {
        **os.environ,
        "CNIR_FRONT_CORPUS": str(path),
        "CGO_ENABLED": "0",
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "-buildvcs=false",
    }
    proc = subprocess.run([go, "test", "-count=1", "-v", "."], cwd=REPO / "install" / "front", env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("--- PASS") == 2, proc.stdout
