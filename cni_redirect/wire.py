"""The protocol between the thin front and the CNI server, and whom each side trusts.

One request per connection. Request: b"CNIR1" + 8-byte env length + 8-byte
stdin length + env ("K=V\\0"...) + stdin, with the pod netns fd attached
(SCM_RIGHTS) to the first message. Reply: 1 byte exit code + 8-byte stdout
length + stdout + stderr (to EOF).

Trust, both ways: the server only answers a root peer, the front only talks
to a root server, and only through a socket path under root's socket
directory (`trusted_socket_path`).

Also here, for the front and STATUS: a config's top-level `agent_socket`
found without a JSON parser, and a whole document read through the C scanner
`json` uses, without importing the `json` package.

Standard library only, and only os, sys and the C `_socket` module: the
front imports this on every pod start (`import socket` alone costs ~14 ms).
`errors.WireError` is loaded only when an exchange fails, so a pod start
that goes through the CNI server loads two modules of ours: `front` and this.
"""

import _socket
import os
import sys

MAGIC = b"CNIR1"
HEADER_SIZE = len(MAGIC) + 16
MAX_REQUEST = 64 * 1024 * 1024  # a config with 1 000 000 set elements stays well below this
MAX_FDS = 4  # a request carries one netns fd; a few more are read so that they can be closed
SOCKET_DIRS = ("/run/cni-redirect/", "/var/run/cni-redirect/")
DEFAULT_SOCKET = "/run/cni-redirect/agent.sock"
TIMEOUT = 5.0  # the front gives up on a CNI server that does not answer within this, and works in-process


def WireError():  # stands for the class, loaded on first use
    """`errors.WireError`, imported when something fails: `except wire.WireError():` costs nothing until then."""
    from .errors import WireError as cls

    return cls


def trusted_socket_path(path: str) -> bool:
    """A plain absolute `.sock` path inside root's socket directory, nothing an attacker could steer."""
    return (
        path.startswith(SOCKET_DIRS)
        and path.endswith(".sock")
        and "/../" not in path
        and "/./" not in path
        and all(33 <= ord(char) <= 126 and char not in "\\\"'" for char in path)
    )


def config_agent_socket(config: bytes) -> str | None:
    """The config's top-level `"agent_socket"`, if it is a trusted path; found without a JSON parser.

    Only the key of the config object itself counts (nested objects such as the pod's
    annotations in `runtimeConfig`, and strings, are skipped whole), the last one wins as
    in `json.loads`, and only a trusted path is returned: "" or anything else means no
    CNI server. A document that is not a JSON object gives None, and the in-process
    path reports it properly.
    """
    path = top_level_string(config, b"agent_socket")
    return path if path is not None and trusted_socket_path(path) else None


def top_level_string(config: bytes, key: bytes) -> str | None:
    """The string under `key` in the config object itself (the last one, as `json.loads` keeps), or None:
    absent, not a string, or a document the scanner cannot read (then the caller's JSON path reports it)."""
    try:
        value = _top_level_value(config, key)
        if value is None or value[:1] != b'"':
            return None
        return _decode_string(value)
    except (ValueError, IndexError, KeyError, UnicodeDecodeError):  # KeyError: an invalid escape such as \q
        return None


class _ScanContext:
    """What CPython's C JSON scanner reads off `json.JSONDecoder`: json.loads' own defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


def json_object(doc: bytes) -> dict | None:
    """The document as `json.loads` reads it, when it is a UTF-8 JSON object; None for anything else.

    Through the C scanner that `json` itself uses (`_json`), without importing the `json` package, which
    costs ~2.5 ms and more than the rest of a STATUS answer. None means: go the full way (`json.loads`),
    which reports the problem; a scanner error loads `json.decoder` then, on that rare path only."""
    try:
        import _json

        text = doc.decode("utf-8")
        start = len(text) - len(text.lstrip(" \t\n\r"))
        value, end = _json.make_scanner(_ScanContext)(text, start)  # type: ignore[arg-type]  # reads attributes only
    except Exception:  # no C scanner, not UTF-8, not JSON (StopIteration or JSONDecodeError)
        return None
    if text[end:].strip(" \t\n\r") or not isinstance(value, dict):
        return None
    return value


_WHITESPACE = b" \t\n\r"
_QUOTE, _BACKSLASH = 0x22, 0x5C
_OPEN, _CLOSE = b"{[", b"}]"


def _skip_whitespace(doc: bytes, i: int) -> int:
    while i < len(doc) and doc[i] in _WHITESPACE:
        i += 1
    return i


def _string_end(doc: bytes, i: int) -> int:
    """The index just after the string that starts (with its quote) at i."""
    j = i + 1
    while True:
        j = doc.index(b'"', j)
        backslashes = 0
        while doc[j - 1 - backslashes] == _BACKSLASH:
            backslashes += 1
        if backslashes % 2 == 0:
            return j + 1
        j += 1


def _value_end(doc: bytes, i: int) -> int:
    """The index just after the JSON value that starts at i: a string, an object or array whole, a literal."""
    if doc[i] == _QUOTE:
        return _string_end(doc, i)
    if doc[i] in _OPEN:
        depth, j = 0, i
        while True:
            char = doc[j]
            if char == _QUOTE:
                j = _string_end(doc, j)
                continue
            if char in _OPEN:
                depth += 1
            elif char in _CLOSE:
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
    j = i
    while j < len(doc) and doc[j] not in b",}] \t\n\r":
        j += 1
    if j == i:
        raise ValueError("empty value")
    return j


def _top_level_value(doc: bytes, key: bytes) -> bytes | None:
    """The raw bytes of the last value under `key` in the top-level object, or None."""
    i = _skip_whitespace(doc, 0)
    if doc[i] != ord("{"):
        raise ValueError("not an object")
    i = _skip_whitespace(doc, i + 1)
    found = None
    if doc[i] == ord("}"):
        return None
    while True:
        if doc[i] != _QUOTE:
            raise ValueError("expected a key")
        end = _string_end(doc, i)
        raw_key = doc[i:end]
        i = _skip_whitespace(doc, end)
        if doc[i] != ord(":"):
            raise ValueError("expected ':'")
        i = _skip_whitespace(doc, i + 1)
        end = _value_end(doc, i)
        if raw_key == b'"' + key + b'"' or (b"\\" in raw_key and _decode_string(raw_key) == key.decode()):
            found = doc[i:end]
        i = _skip_whitespace(doc, end)
        if doc[i] == ord("}"):
            if _skip_whitespace(doc, i + 1) != len(doc):
                raise ValueError("trailing data")
            return found
        if doc[i] != ord(","):
            raise ValueError("expected ',' or '}'")
        i = _skip_whitespace(doc, i + 1)


_ESCAPES = {ord('"'): '"', _BACKSLASH: "\\", ord("/"): "/", ord("b"): "\b", ord("f"): "\f", ord("n"): "\n",
            ord("r"): "\r", ord("t"): "\t"}  # fmt: skip


def _decode_string(raw: bytes) -> str:
    """A JSON string literal (with its quotes) as text, escapes and surrogate pairs included."""
    body = raw[1:-1]
    if b"\\" not in body:
        text = body.decode("utf-8")
    else:
        parts, i = [], 0
        while i < len(body):
            j = body.find(b"\\", i)
            if j < 0:
                parts.append(body[i:].decode("utf-8"))
                break
            parts.append(body[i:j].decode("utf-8"))
            kind = body[j + 1]
            if kind == ord("u"):
                parts.append(chr(int(body[j + 2 : j + 6], 16)))
                i = j + 6
            else:
                parts.append(_ESCAPES[kind])
                i = j + 2
        text = "".join(parts).encode("utf-16", "surrogatepass").decode("utf-16")
    return text


def peer_uid(sock: _socket.socket) -> int:
    """The UID of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[4:8], sys.byteorder)


# --- the request ---


def encode_request(env: dict, stdin: bytes) -> tuple[bytes, bytes]:
    """Header and body of a request: only the CNI_* environment travels."""
    env_block = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items() if k.startswith("CNI_"))
    header = MAGIC + len(env_block).to_bytes(8, "big") + len(stdin).to_bytes(8, "big")
    return header, env_block + stdin


def send_request(sock: _socket.socket, env: dict, stdin: bytes, netns_fd: int | None) -> None:
    header, body = encode_request(env, stdin)
    rights = [] if netns_fd is None else [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, netns_fd.to_bytes(4, sys.byteorder))]
    sock.sendmsg([header], rights)
    sock.sendall(body)
    sock.shutdown(_socket.SHUT_WR)


def _recv_with_fds(sock: _socket.socket, size: int) -> tuple[bytes, list[int]]:
    data, ancillary, flags, _addr = sock.recvmsg(size, _socket.CMSG_LEN(MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % 4
            fds += [int.from_bytes(payload[i : i + 4], sys.byteorder, signed=True) for i in range(0, whole, 4)]
    if flags & _socket.MSG_CTRUNC:  # the kernel could not hand us every fd (too many, or none left to us)
        for fd in fds:
            os.close(fd)
        raise WireError()("the request's file descriptors did not arrive (the server may be out of fds)")
    return data, fds


def _recv_exactly(sock: _socket.socket, size: int, what: str, data: bytes = b"") -> bytes:
    chunks = [data]
    have = len(data)
    while have < size:
        chunk = sock.recv(min(1 << 20, size - have))
        if not chunk:
            raise WireError()(f"truncated request {what}")
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


def read_request(sock: _socket.socket) -> tuple[dict[str, str], bytes, list[int]]:
    """Read one request: the CNI_* env, stdin, and the fds that came with it (the caller closes them).

    If the request cannot be read (truncated, not ours, too large, a timeout), the fds that
    arrived with it are closed here: each one pins a pod's network namespace.
    """
    data, fds = _recv_with_fds(sock, HEADER_SIZE)
    try:
        header = _recv_exactly(sock, HEADER_SIZE, "header", data)
        if header[: len(MAGIC)] != MAGIC:
            raise WireError()("not a cni-redirect request")
        env_len = int.from_bytes(header[len(MAGIC) : len(MAGIC) + 8], "big")
        stdin_len = int.from_bytes(header[len(MAGIC) + 8 : HEADER_SIZE], "big")
        if env_len + stdin_len > MAX_REQUEST:
            raise WireError()(f"request of {env_len + stdin_len} bytes is too large")
        body = _recv_exactly(sock, env_len + stdin_len, "body")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    env = {}
    for item in body[:env_len].split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep and key.startswith("CNI_"):
            env[key] = value
    return env, body[env_len:], fds


# --- the reply ---


def encode_reply(code: int, stdout: bytes, stderr: bytes) -> bytes:
    return bytes([code & 0xFF]) + len(stdout).to_bytes(8, "big") + stdout + stderr


def decode_reply(reply: bytes) -> tuple[int, bytes, bytes]:
    if len(reply) < 9:
        raise WireError()("the CNI server closed the connection without a reply")
    length = int.from_bytes(reply[1:9], "big")
    return reply[0], reply[9 : 9 + length], reply[9 + length :]


def exchange(path: str, env: dict, stdin: bytes, netns_fd: int | None, timeout: float = TIMEOUT):
    """Send one request to the CNI server at `path`; return its exit code, stdout and stderr."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        uid = peer_uid(sock)
        if uid != 0:
            raise WireError()(f"the socket is served by uid {uid}, not root")
        send_request(sock, env, stdin, netns_fd)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as exc:
        raise WireError()(str(exc)) from None
    finally:
        sock.close()
    return decode_reply(b"".join(chunks))
