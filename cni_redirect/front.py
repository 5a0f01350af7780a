"""The plugin's entry point: a thin front that hands CNI requests to the warm CNI server.

A fresh Python process that imports pyroute2 and pydantic spends ~0.4 s before
doing ~2 ms of work. So the front imports only os, sys and `wire` (which uses
the C `_socket` module, and loads `errors` only on failure): it forwards the CNI_* environment and stdin bytes,
untouched, with the pod netns as a file descriptor, to the CNI server named by
the conflist entry's `agent_socket`, and writes back its stdout, stderr and
exit code.

- No `agent_socket` in the config (hand-written conflists, the `minimal`
  install): the work is done in-process, exactly as the server would do it.
- `agent_socket` set but nothing answers (no socket, connection refused, no
  reply within `wire.TIMEOUT`, a reply that is not one): the work is done
  in-process too, with one warning line saying why. Slower, never uncaptured
  and never stuck; the table is replaced, so a late server cannot leave two.
- VERSION is answered here, from constants: libcni asks it on every load.
- Not a CNI call (no CNI_COMMAND): the command-line interface.
"""

import os
import sys

from . import wire

VERSIONS = b'{"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}'


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main() -> int:
    env = dict(os.environ)
    command = env.get("CNI_COMMAND")
    if command is None:
        from .cli import run_cli

        return run_cli(sys.argv[1:])
    if command == "VERSION":
        _write(1, VERSIONS)
        return 0
    stdin = sys.stdin.buffer.read()
    path = wire.config_agent_socket(stdin) if command in ("ADD", "CHECK", "DEL") else None
    fallback = None
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
                code, out, err = wire.exchange(path, env, stdin, netns_fd)
            except wire.WireError() as exc:  # the expression is evaluated only when something was raised
                fallback = f"CNI server at {path} did not answer ({exc}): doing the work in-process"
            else:
                _write(1, out)
                _write(2, err)
                return code
            finally:
                if netns_fd is not None:
                    os.close(netns_fd)
    from .plugin import run_in_process

    return run_in_process(stdin, fallback)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
