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
- STATUS and GC go to the CNI server too; with none (or none answering) they
  are answered here, loading nothing heavy (`status.py`): containerd 2.x asks
  STATUS on every CRI `Status` call.
- DEL of a netns that is gone is forwarded without an fd: the server answers
  "nothing to do", as in-process DEL does, without the in-process start.
- Not a CNI call (no CNI_COMMAND): the command-line interface.

In the bundle, this front runs only when the compiled one (install/front, the `cni-redirect` the runtime
executes) hands a request over: it answers VERSION and forwards to the CNI server itself, ~10x faster to
start, and execs this (`cni-redirect-py`) for everything else, saying in CNIR_FORWARD_FAILED why when the
server did not answer, so the work is done in-process without asking the server twice.
"""

import os
import sys

from . import wire

VERSIONS = b'{"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}'
FORWARDED = ("ADD", "CHECK", "DEL", "STATUS", "GC")  # to the CNI server, when the entry names one
WITH_NETNS = ("ADD", "CHECK", "DEL")
#: Set by the compiled front (install/front) when it exec's this one after the CNI server did not answer: why.
FORWARD_FAILED = "CNIR_FORWARD_FAILED"


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main() -> int:
    env = dict(os.environ)
    command = env.get("CNI_COMMAND")
    if command is None:
        if sys.argv[1:2] in (["ready"], ["healthy"]):  # the exec probes, every few seconds: nothing else loaded
            from .node.agent.probe import main as probe

            return probe(sys.argv[1:])
        from .cli import run_cli

        return run_cli(sys.argv[1:])
    if command == "VERSION":
        _write(1, VERSIONS)
        return 0
    stdin = sys.stdin.buffer.read()
    path = wire.config_agent_socket(stdin) if command in FORWARDED else None
    fallback = None
    failed = env.get(FORWARD_FAILED)
    if path is not None and failed is not None:  # the compiled front asked the server already: not twice
        fallback = f"CNI server at {path} did not answer ({failed}): doing the work in-process"
    elif path is not None:
        try:
            code, out, err = _forward(path, command, env, stdin)
        except _NotForwarded:
            pass
        except wire.WireError() as exc:  # the expression is evaluated only when something else was raised
            fallback = f"CNI server at {path} did not answer ({exc}): doing the work in-process"
        else:
            _write(1, out)
            _write(2, err)
            return code
    if command in ("STATUS", "GC"):
        from .status import answer

        code, out = answer(env, stdin)
        _write(1, out)
        return code
    from .plugin import run_in_process

    return run_in_process(stdin, fallback)


class _NotForwarded(Exception):
    """The request is better done in-process (its netns cannot be opened for a reason DEL must report)."""


def _forward(path: str, command: str, env: dict[str, str], stdin: bytes) -> tuple[int, bytes, bytes]:
    """Send the request to the CNI server, with the pod netns as an fd when the command has one."""
    netns = env.get("CNI_NETNS", "")
    netns_fd = None
    if netns and command in WITH_NETNS:
        try:
            netns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not block
        except FileNotFoundError:
            if command != "DEL":
                raise _NotForwarded() from None  # let the in-process path give the precise error
            # DEL of a netns that is gone: the server answers "nothing to do", as in-process DEL does
        except OSError:
            raise _NotForwarded() from None
    if netns_fd is None and command in ("ADD", "CHECK"):
        raise _NotForwarded()  # no netns to hand over: the in-process path names what is wrong
    try:
        return wire.exchange(path, env, stdin, netns_fd)
    finally:
        if netns_fd is not None:
            os.close(netns_fd)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
