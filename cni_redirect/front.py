"""The plugin's entry point: a thin front that hands CNI requests to the warm node agent.

A fresh Python process that imports pyroute2 and pydantic spends ~0.4 s before
doing ~2 ms of work. So the front imports only os, sys and _socket: it forwards
the CNI_* environment and stdin bytes, untouched, with the pod netns as a file
descriptor (SCM_RIGHTS), to the agent named by the conflist entry's
`agent_socket`, and writes back the agent's stdout, stderr and exit code.

- No `agent_socket` in the config (hand-written conflists, hosts without the
  DaemonSet): the work is done in-process, exactly as the agent would do it.
- `agent_socket` set but the agent unreachable: ADD and CHECK fail with CNI
  code 11 (try again later), so no pod starts uncaptured while the agent is
  down; DEL never needs the agent and falls back to in-process.
- VERSION is answered here, from constants: libcni asks it on every load.

Wire format (one request per connection): b"CNIR1" + 8-byte env length +
8-byte stdin length + env ("K=V\\0"...) + stdin, with the netns fd attached to
the first message. Reply: 1 byte exit code + 8-byte stdout length + stdout +
stderr (to EOF).
"""

import _socket  # the C module: `import socket` would pull in enum, selectors, ... (~14 ms per pod)
import os
import sys

MAGIC = b"CNIR1"
SOCKET_DIRS = ("/run/cni-redirect/", "/var/run/cni-redirect/")
VERSIONS = b'{"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}'
TIMEOUT = 60.0


def agent_socket(config: bytes) -> str | None:
    """The value of `"agent_socket"` in the config, found without a JSON parser.

    Only a plain absolute path inside the agent's socket directory counts, so a
    pod annotation that happens to contain the key cannot point us anywhere else.
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
                if (
                    b"\\" not in value
                    and path.startswith(SOCKET_DIRS)
                    and "/../" not in path
                    and path.endswith(".sock")
                ):
                    return path
                if not value:
                    return None  # "agent_socket": "" turns the agent off
        start = config.find(key, start + 1)
    return None


def _error(code: int, msg: str, details: str = "") -> bytes:
    def quote(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'

    return f'{{"cniVersion": "1.1.0", "code": {code}, "msg": {quote(msg)}, "details": {quote(details)}}}'.encode()


def forward(path: str, env: dict, stdin: bytes, netns_fd: int | None) -> tuple[int, bytes, bytes]:
    """Send one request to the agent; return its exit code, stdout and stderr."""
    env_block = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items() if k.startswith("CNI_"))
    header = MAGIC + len(env_block).to_bytes(8, "big") + len(stdin).to_bytes(8, "big")
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        peer_uid = int.from_bytes(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)[4:8], sys.byteorder)
        if peer_uid != 0:
            raise OSError(f"the socket is served by uid {peer_uid}, not root")
        rights = (
            [] if netns_fd is None else [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, netns_fd.to_bytes(4, sys.byteorder))]
        )
        sock.sendmsg([header], rights)
        sock.sendall(env_block + stdin)
        sock.shutdown(_socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    reply = b"".join(chunks)
    if len(reply) < 9:
        raise OSError("the agent closed the connection without a reply")
    code = reply[0]
    length = int.from_bytes(reply[1:9], "big")
    return code, reply[9 : 9 + length], reply[9 + length :]


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main() -> int:
    env = os.environ
    command = env.get("CNI_COMMAND")
    if command is None:  # not a CNI call: the CLI
        from .cli import run_cli

        return run_cli(sys.argv[1:])
    if command == "VERSION":
        _write(1, VERSIONS)
        return 0
    stdin = sys.stdin.buffer.read()
    path = agent_socket(stdin) if command in ("ADD", "CHECK", "DEL") else None
    if path is not None:
        netns_fd = None
        netns = env.get("CNI_NETNS", "")
        if netns:
            try:
                netns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                netns_fd = None  # let the in-process path give the precise error
        if netns_fd is not None or (command == "DEL" and not netns):
            try:
                code, out, err = forward(path, env, stdin, netns_fd)
            except OSError as exc:
                if command != "DEL":
                    _write(1, _error(11, f"cni-redirect agent unreachable at {path}: {exc}", "try again later"))
                    _write(2, f"cni-redirect error: {command}: agent unreachable at {path}: {exc}\n".encode())
                    return 1
            else:
                _write(1, out)
                _write(2, err)
                return code
            finally:
                if netns_fd is not None:
                    os.close(netns_fd)
    from .cli import run_cni

    return run_cni(stdin)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
