"""The `cni-redirect` command line; `front.main` runs it when the process is not a CNI call.

CLI subcommands:
  render     print the exact table a pod would get, without applying anything
  install    the node agent: install the plugin, chain it into the node's CNI config, keep it there
  agent      run the CNI server alone: serve the thin front's requests on a UNIX socket, install nothing
  ready      exec probe: exit 0 when this container's agent is installed and chained
  healthy    exec probe: exit 0 when this container's agent can do its job
             (both answered by `front.main` through node/agent/probe.py, without loading this module)
  uninstall  take the entry and the plugin off the node, the primary's files back as they were
  inspect    every pod sandbox on this node: captured or not, its table right or not, traffic on it
  doctor     the traps that make a pod skip its proxy (the proxy-UID trap first); exit 1 when it finds one
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from .node import CONTAINERD_SOCKET, CRIO_SOCKET
from .node.options import INSTALL, REMOVED_FLAGS, UNINSTALL, Flag, Options
from .profiles import PROFILE_NAMES
from .wire import DEFAULT_SOCKET


class CliError(Exception):
    """One line for the user: what was wrong, naming the flag, variable or file."""


def run_cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cni-redirect", description="cni-redirect: preview, install and serve transparent sidecar capture"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_render_parser(commands)
    _add_install_parser(commands)
    _add_node_readers(commands)
    try:
        if argv and argv[0] in (INSTALL, UNINSTALL):
            _refuse_removed_flags(argv[0], argv[1:])
    except CliError as error:
        print(f"cni-redirect: {error}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = {
        "install": _install,
        "agent": _agent,
        "inspect": _inspect,
        "doctor": _doctor,
        "render": _render,
        "uninstall": _uninstall,
        "ready": _probe,
        "healthy": _probe,
    }[args.command]
    try:
        return run(args)
    except CliError as error:
        print(f"cni-redirect: {error}", file=sys.stderr)
        return 2


def _add_render_parser(commands: Any) -> None:
    render = commands.add_parser("render", help="print the nftables table a pod would get, applying nothing")
    render.add_argument(
        "-a",
        "--annotation",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a pod annotation, e.g. cni-redirect.io/enabled=true (repeatable)",
    )
    render.add_argument("--annotations", metavar="FILE", help="a JSON object of pod annotations")
    render.add_argument(
        "--conflist",
        metavar="FILE",
        help="a .conflist (our entry is found by type) or a single plugin entry; default: built-in defaults",
    )
    render.add_argument("--namespace", help="the pod's namespace, checked against exclude_namespaces")
    render.add_argument("--profile", choices=PROFILE_NAMES, help="read the pod as this mesh would (entry field)")
    render.add_argument("--json", action="store_true", help="print the libnftables JSON batch instead of nft syntax")


def _env(name: str, default: object = None) -> str | None:
    """An environment default as a string: argparse parses it with the flag's own `type` (and names the
    variable when it is wrong), and only for the subcommand that uses it."""
    value = os.environ.get(name)
    if value is not None:
        return value
    return None if default is None else str(default)


def _typed(name: str, parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """An argparse `type` whose error names the environment variable when the value came from it."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError:
            source = f" (from the environment variable {name})" if os.environ.get(name) == text else ""
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}{source}") from None

    return convert


def _path_or_none(text: str) -> Path | None:
    return Path(text) if text else None


#: How a setting's text becomes its value, by the field's declared type.
_PARSERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "Path": (Path, "a path"),
    "Path | None": (_path_or_none, "a path"),
    "str": (str, "a string"),
    "str | None": (lambda text: text or None, "a string"),
    "int": (int, "a whole number"),
    "float": (float, "a number"),
}


def _option_fields(command: str) -> list[Field]:
    return [f for f in fields(Options) if "flag" in f.metadata and command in f.metadata["flag"].commands]


def _add_option_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """One flag per setting of `Options` that `command` takes (node/options.py), each defaulting to its
    UPPER_SNAKE environment variable, else the setting's default."""
    for setting in _option_fields(command):
        flag: Flag = setting.metadata["flag"]
        env = setting.name.upper()
        parse, what = _PARSERS[str(setting.type)]
        if flag.choices:
            parse, what = _one_of(flag.choices), f"one of {', '.join(flag.choices)}"
        default = setting.default if not isinstance(setting.default, Path) else str(setting.default)
        parser.add_argument(
            f"--{setting.name.replace('_', '-')}",
            dest=setting.name,
            type=_typed(env, parse, flag.what or what),
            default=_env(env, default),
            help=flag.help,
            metavar=flag.metavar,
        )


def _options(args: argparse.Namespace, command: str) -> Options:
    return Options(**{setting.name: getattr(args, setting.name) for setting in _option_fields(command)})


def _refuse_removed_flags(command: str, argv: Sequence[str]) -> None:
    for given in argv:
        why = REMOVED_FLAGS.get((command, given.split("=", 1)[0]))
        if why is not None:
            raise CliError(f"{given.split('=', 1)[0]} was removed from `{command}`: {why}; drop it")


def _add_install_parser(commands: Any) -> None:
    install = commands.add_parser(
        "install",
        help="node agent: install the plugin and keep it chained (each flag also reads its UPPER_SNAKE env var)",
    )
    _add_option_flags(install, INSTALL)
    agent = commands.add_parser("agent", help="run the CNI server alone: serve the thin front on a UNIX socket")
    agent.add_argument("--socket", default=_env("AGENT_SOCKET") or DEFAULT_SOCKET)
    _add_uninstall_parser(commands)
    for question, text in (("ready", "installed and chained"), ("healthy", "able to serve")):
        probe = commands.add_parser(question, help=f"exec probe: exit 0 when this container's agent is {text}")
        probe.add_argument("--probe-socket", default=_env("PROBE_SOCKET"), help="the agent's --probe-socket")


def _add_uninstall_parser(commands: Any) -> None:
    remove = commands.add_parser(
        "uninstall",
        help="remove cni-redirect from this node: entry out (the primary's file restored), then the plugin; "
        "run once no agent runs here (each flag also reads its UPPER_SNAKE env var)",
    )
    _add_option_flags(remove, UNINSTALL)
    remove.add_argument(
        "--cni-cache-dir",
        default=_env("CNI_CACHE_DIR") or _node_cache_dir(),
        help="libcni's cache (default: the DaemonSet's /host/var/lib/cni, else /var/lib/cni): a sandbox cached "
        "with our entry keeps a DEL stub in place of the plugin, for CRI-O's DEL from that cache",
    )
    remove.add_argument("--force", action="store_true", help="even while an agent runs (it puts the entry back)")
    remove.add_argument("--check", action="store_true", help="change nothing; exit 1 while anything of ours is left")
    remove.add_argument(
        "--stay", action="store_true", help="then wait for SIGTERM (the uninstall DaemonSet's pod stays running)"
    )


def _one_of(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(text)
        return text

    return parse


def _node_conf_dir() -> str:
    """As install: CNI_CONF_DIR, else the DaemonSet's mount, else the host's own dir (run on the node)."""
    if os.environ.get("CNI_CONF_DIR"):
        return os.environ["CNI_CONF_DIR"]
    return "/host/etc/cni/net.d" if os.path.isdir("/host/etc/cni/net.d") else "/etc/cni/net.d"


def _add_node_readers(commands) -> None:
    for name, text in (
        ("inspect", "every pod sandbox on this node: decision, table state, counters (read only)"),
        ("doctor", "find what makes pods skip their proxy; exit 1 when something is found (read only)"),
    ):
        reader = commands.add_parser(name, help=text)
        reader.add_argument("--cri-socket", default=_env("CRI_SOCKET", CONTAINERD_SOCKET), help=f"CRI-O: {CRIO_SOCKET}")
        reader.add_argument("--cni-conf-dir", default=_node_conf_dir())
        reader.add_argument("--conf-file", default=_env("CONF_FILE"), help="the primary conflist's file name")
        reader.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "inspect":
            reader.add_argument("--pod", metavar="NAMESPACE/NAME", help="one pod in full: settings and table")
        else:
            reader.add_argument("--proc", default="/proc", help="the host's /proc (host PID namespace)")


def _readers(args: argparse.Namespace) -> tuple[Any, Any]:
    """The CRI client, and the conf dir read once: every answer of the command comes from that one read."""
    from .cri import CriClient
    from .node.chaining.confdir import read_conf_dir

    return CriClient(args.cri_socket), read_conf_dir(Path(args.cni_conf_dir), args.conf_file or None)


def _inspect(args: argparse.Namespace) -> int:
    from .errors import CriError
    from .node.admin.inspect import pod_detail, table, view_json
    from .node.pods.survey import Survey

    cri, snapshot = _readers(args)
    entry = snapshot.entry()
    if entry is None:
        cri.close()
        print(f"cni-redirect: not chained into a CNI config in {args.cni_conf_dir}", file=sys.stderr)
        return 2
    try:
        views = list(Survey(cri, entry).pods())
    except CriError as error:
        raise CliError(str(error)) from None
    finally:
        cri.close()
    if args.pod:
        chosen = [v for v in views if v.ref == args.pod]
        if not chosen:
            print(f"cni-redirect: no ready pod sandbox {args.pod} on this node", file=sys.stderr)
            return 1
        print(json.dumps(view_json(chosen[0]), indent=2) if args.json else pod_detail(chosen[0]), end="")
        return 0
    if args.json:
        print(json.dumps([view_json(v) for v in views], indent=2))
    else:
        sys.stdout.write(f"chain mode: {snapshot.describe_mode()}\n")
        sys.stdout.write(table(views))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from .errors import CriError
    from .node.admin.doctor import TRAP, diagnose

    cri, snapshot = _readers(args)
    try:
        findings = diagnose(cri, snapshot, Path(args.proc))
    except CriError as error:
        raise CliError(str(error)) from None
    finally:
        cri.close()
    traps = [f for f in findings if f.severity == TRAP]
    if args.json:
        print(json.dumps([f.json() for f in findings], indent=2))
    else:
        print(f"chain mode: {snapshot.describe_mode()}")
        for finding in findings:
            print(f"{'FOUND' if finding.severity == TRAP else 'note '}  {finding.message}")
        print(f"{len(traps)} trap(s) found" if traps else "no trap found")
    return 1 if traps else 0


def _install(args: argparse.Namespace) -> int:
    from .node.agent.daemon import run

    options = _options(args, INSTALL)
    return run(options)


def _node_cache_dir() -> str:
    """libcni's cache as the uninstall pod mounts it, else the host's own (run on the node)."""
    return "/host/var/lib/cni" if os.path.isdir("/host/var/lib/cni") else "/var/lib/cni"


def _probe(args: argparse.Namespace) -> int:
    """The same as the front's fast path (`front.main`), for a `cni-redirect` run another way."""
    from .node.agent.probe import main as probe

    return probe([args.command, *(["--probe-socket", args.probe_socket] if args.probe_socket else [])])


def _uninstall(args: argparse.Namespace) -> int:
    import signal
    import threading
    from pathlib import Path

    from .errors import CniRedirectError
    from .logs import JsonLog
    from .node.admin.uninstall import leftovers, uninstall

    options = _options(args, UNINSTALL)
    bin_dir, conf_dir = options.cni_bin_dir, options.cni_conf_dir
    for flag, path in (("--cni-bin-dir", bin_dir), ("--cni-conf-dir", conf_dir)):
        if not path.is_dir():
            raise CliError(f"{flag} {path} is not a directory")
    if args.check:
        left, kept = leftovers(bin_dir, conf_dir)
        print(f"left on this node: {', '.join(left)}" if left else "nothing of cni-redirect is left on this node")
        if kept:
            print(f"kept on purpose: {', '.join(kept)} (pods set up before may still get DEL from a cached config)")
        return 1 if left else 0
    try:
        still = uninstall(
            bin_dir,
            conf_dir,
            JsonLog(),
            options.conf_file,
            options.uninstall_grace,
            args.force,
            Path(args.cni_cache_dir),
        )
    except CniRedirectError as exc:
        raise CliError(getattr(exc, "msg", None) or str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot uninstall: {exc}") from None
    if args.stay:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
    return 1 if still else 0


def _agent(args: argparse.Namespace) -> int:
    import signal
    import threading
    from pathlib import Path

    from .cniserver import CniServer
    from .logs import JsonLog
    from .node.agent.daemon import check_agent_socket

    log = JsonLog()
    try:
        check_agent_socket(args.socket)
    except ValueError as exc:
        log("error", str(exc))
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = CniServer(Path(args.socket), log)
    server.start()
    stop.wait()
    server.stop()
    log("info", "agent stopped", served=server.served, failed=server.failed)
    return 0


def _read_json(flag: str, path: str) -> object:
    """A JSON file the user named; CliError naming the flag and the file when it cannot be had."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as exc:
        raise CliError(f"{flag} {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CliError(f"{flag} {path}: not valid JSON: {exc}") from None


def _render_entry(path: str | None) -> dict:
    """The entry `render` evaluates: built-in defaults, or ours from a .conflist or a single entry file."""
    if path is None:
        return {"cniVersion": "1.1.0", "type": "cni-redirect"}
    document = _read_json("--conflist", path)
    if not isinstance(document, dict):
        raise CliError(f"--conflist {path}: must hold a JSON object (a conflist or a plugin entry)")
    if "plugins" in document:
        plugins = document["plugins"] if isinstance(document["plugins"], list) else []
        entries = [p for p in plugins if isinstance(p, dict) and p.get("type") == "cni-redirect"]
        if not entries:
            raise CliError(f"--conflist {path}: has no plugin entry of type cni-redirect")
        return {"cniVersion": document.get("cniVersion", "1.1.0"), **entries[0]}
    return {"cniVersion": "1.1.0", **document}


def _render_annotations(args: argparse.Namespace) -> dict[str, str]:
    annotations: dict[str, str] = {}
    if args.annotations:
        loaded = _read_json("--annotations", args.annotations)
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            raise CliError(f"--annotations {args.annotations}: must hold a JSON object of string values")
        annotations.update(loaded)
    for item in args.annotation:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--annotation {item!r} is not KEY=VALUE")
        annotations[key] = value
    return annotations


def _render(args: argparse.Namespace) -> int:
    from .config import PodRef
    from .evaluation import evaluate_sandbox
    from .ruleset import describe

    entry = _render_entry(args.conflist)
    if args.profile:
        entry["profile"] = args.profile
    evaluation = evaluate_sandbox(entry, PodRef(args.namespace, None, None), _render_annotations(args))
    error = evaluation.error
    if error is not None:
        print(f"cni-redirect: {error.msg}" + (f" ({error.details})" if error.details else ""), file=sys.stderr)
        return 1
    if evaluation.ruleset is None:
        print(f"# no table: {evaluation.reason}")
        return 0
    if args.json:
        print(json.dumps(evaluation.ruleset.add_batch(), indent=2))
    else:
        sys.stdout.write(evaluation.ruleset.to_text())
    if evaluation.ruleset.routing is not None:
        out = sys.stderr if args.json else sys.stdout
        print("# TPROXY policy routing, added in the pod netns with the table:", file=out)
        for obj in evaluation.ruleset.routing.objects():
            print(f"#   {describe(obj)}", file=out)
    return 0
