"""The protocol between the thin front and the CNI server, and whom each side trusts.

One request per connection. Request: b"CNIR1" + 8-byte env length + 8-byte
stdin length + env ("K=V\\0"...) + stdin, with the pod netns fd attached
(SCM_RIGHTS) to the first message. Reply: 1 byte exit code + 8-byte stdout
length + stdout + stderr (to EOF).

Trust, both ways: the server only answers a root peer, the front only talks
to a root server, and only through a socket path under root's socket
directory (`trusted_socket_path`).

Standard library only, and only os, sys and the C `_socket` module: the
front imports this on every pod start (`import socket` alone costs ~14 ms).
`errors.WireError` is loaded only when an exchange fails, so a pod start
that goes through the CNI server loads two modules of ours, as before.
"""

import _socket
import os
import sys

MAGIC = b"CNIR1"
HEADER_SIZE = len(MAGIC) + 16
MAX_REQUEST = 64 * 1024 * 1024  # a config with 1 000 000 set elements stays well below this
MAX_FDS = 4  # a request carries one netns fd; a few more are read so that they can be closed
SOCKET_DIRS = ("/run/cni-redirect/", "/var/run/cni-redirect/")
TIMEOUT = 60.0


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
    """The value of `"agent_socket"` in the config, found without a JSON parser.

    Only a trusted path counts, so a pod annotation that happens to contain
    the key cannot point us anywhere else.
    """
    key = b'"agent_socket"'
    start = config.find(key)
    while start != -1:
        rest = config[start + len(key) :].lstrip()
        if rest.startswith(b":"):
            rest = rest[1:].lstrip()
            if rest.startswith(b'"'):
                end = rest.find(b'"', 1)
                value = rest[1:end] if end > 0 else b""
                path = value.decode("ascii", "replace")
                if trusted_socket_path(path):
                    return path
                if not value:
                    return None  # "agent_socket": "" turns the server off
        start = config.find(key, start + 1)
    return None


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
