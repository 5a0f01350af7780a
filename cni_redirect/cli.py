"""The `cni-redirect` command line; `front.main` runs it when the process is not a CNI call.

CLI subcommands:
  render   print the exact table a pod would get, without applying anything
  install  the node agent: install the plugin, chain it into the node's CNI config, keep it there
  agent    run the CNI server alone: serve the thin front's requests on a UNIX socket, install nothing
  inspect  every pod sandbox on this node: captured or not, its table right or not, traffic on it
  doctor   the traps that make a pod skip its proxy (the proxy-UID trap first); exit 1 when it finds one
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .node import CONTAINERD_SOCKET, CRIO_SOCKET
from .wire import DEFAULT_SOCKET


def run_cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cni-redirect", description="cni-redirect: preview, install and serve transparent sidecar capture"
    )
    commands = parser.add_subparsers(dest="command", required=True)
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
    render.add_argument(
        "--profile", choices=("cni-redirect", "istio", "linkerd"), help="read the pod as this mesh would (entry field)"
    )
    render.add_argument("--json", action="store_true", help="print the libnftables JSON batch instead of nft syntax")
    _add_install_parser(commands)
    _add_node_readers(commands)
    args = parser.parse_args(argv)
    if args.command == "install":
        return _install(args)
    if args.command == "agent":
        return _agent(args)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "doctor":
        return _doctor(args)
    return _render(args)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _add_install_parser(commands) -> None:
    install = commands.add_parser(
        "install",
        help="node agent: install the plugin and keep it chained (each flag also reads its UPPER_SNAKE env var)",
    )
    install.add_argument("--cni-bin-dir", default=_env("CNI_BIN_DIR", "/host/opt/cni/bin"))
    install.add_argument("--cni-conf-dir", default=_env("CNI_CONF_DIR", "/host/etc/cni/net.d"))
    install.add_argument("--conf-file", default=_env("CONF_FILE"), help="the primary conflist's file name")
    install.add_argument(
        "--plugin-source",
        default=_env("PLUGIN_SOURCE", "/opt/cni-redirect/bundle/cni-redirect"),
        help="the bundle folder (or a single executable) to install",
    )
    install.add_argument(
        "--entry-file",
        default=_env("ENTRY_FILE"),
        help="JSON object with our conflist entry's settings (defaults, exclude_namespaces, ...)",
    )
    install.add_argument("--readiness-port", type=int, default=int(_env("READINESS_PORT", "0") or 0))
    install.add_argument("--uninstall-grace", type=float, default=float(_env("UNINSTALL_GRACE", "2") or 2))
    install.add_argument(
        "--handover-wait",
        type=float,
        default=float(_env("HANDOVER_WAIT", "5") or 5),
        help="on SIGTERM, seconds a successor agent may take to appear before this one uninstalls",
    )
    install.add_argument("--poll-interval", type=float, default=float(_env("POLL_INTERVAL", "0.2") or 0.2))
    install.add_argument(
        "--agent-socket",
        default=_env("AGENT_SOCKET", DEFAULT_SOCKET),
        help=f"serve CNI requests on this UNIX socket, the fast path (default {DEFAULT_SOCKET}; empty: off)",
    )
    install.add_argument(
        "--cri-socket",
        default=_env("CRI_SOCKET", CONTAINERD_SOCKET),
        help=f"the container runtime's CRI socket (default containerd's {CONTAINERD_SOCKET}; CRI-O: {CRIO_SOCKET})",
    )
    install.add_argument(
        "--repair",
        choices=("in-place", "report", "off"),
        default=_env("REPAIR", "in-place"),
        help="pods whose table is missing or drifted: program it, only log it, or do nothing",
    )
    install.add_argument(
        "--repair-interval", type=float, default=float(_env("REPAIR_INTERVAL", "30") or 30), metavar="SECONDS"
    )
    agent = commands.add_parser("agent", help="run the CNI server alone: serve the thin front on a UNIX socket")
    agent.add_argument("--socket", default=_env("AGENT_SOCKET", DEFAULT_SOCKET) or DEFAULT_SOCKET)


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


def _readers(args: argparse.Namespace):
    from pathlib import Path

    from .cri import CriClient
    from .node.survey import installed_entry

    return CriClient(args.cri_socket), installed_entry(Path(args.cni_conf_dir), args.conf_file or None)


def _inspect(args: argparse.Namespace) -> int:
    from .node.inspect import pod_detail, table
    from .node.survey import Survey, view_json

    cri, entry = _readers(args)
    if entry is None:
        print(f"cni-redirect: not chained into a CNI config in {args.cni_conf_dir}", file=sys.stderr)
        return 2
    try:
        views = list(Survey(cri, entry).pods())
    finally:
        cri.close()
    if args.pod:
        chosen = [v for v in views if v.ref == args.pod]
        if not chosen:
            print(f"cni-redirect: no ready pod sandbox {args.pod} on this node", file=sys.stderr)
            return 1
        print(json.dumps(view_json(chosen[0]), indent=2) if args.json else pod_detail(chosen[0], entry), end="")
        return 0
    if args.json:
        print(json.dumps([view_json(v) for v in views], indent=2))
    else:
        sys.stdout.write(table(views))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .node.doctor import TRAP, diagnose

    cri, _ = _readers(args)
    try:
        findings = diagnose(cri, Path(args.cni_conf_dir), args.conf_file or None, Path(args.proc))
    finally:
        cri.close()
    traps = [f for f in findings if f.severity == TRAP]
    if args.json:
        print(json.dumps([f.json() for f in findings], indent=2))
    else:
        for finding in findings:
            print(f"{'FOUND' if finding.severity == TRAP else 'note '}  {finding.message}")
        print(f"{len(traps)} trap(s) found" if traps else "no trap found")
    return 1 if traps else 0


def _install(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .node.daemon import Options, run

    options = Options(
        cni_bin_dir=Path(args.cni_bin_dir),
        cni_conf_dir=Path(args.cni_conf_dir),
        conf_file=args.conf_file or None,
        plugin_source=Path(args.plugin_source),
        entry_file=Path(args.entry_file) if args.entry_file else None,
        readiness_port=args.readiness_port,
        poll_interval=args.poll_interval,
        uninstall_grace=args.uninstall_grace,
        handover_wait=args.handover_wait,
        agent_socket=Path(args.agent_socket) if args.agent_socket else None,
        cri_socket=args.cri_socket,
        repair=args.repair,
        repair_interval=args.repair_interval,
    )
    return run(options)


def _agent(args: argparse.Namespace) -> int:
    import signal
    import threading
    from pathlib import Path

    from .cniserver import CniServer
    from .logs import JsonLog
    from .node.daemon import check_agent_socket

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


def _load_entry(path: str | None) -> dict:
    if path is None:
        return {"cniVersion": "1.1.0", "type": "cni-redirect"}
    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    if "plugins" in document:
        entries = [p for p in document["plugins"] if p.get("type") == "cni-redirect"]
        if not entries:
            raise SystemExit(f"cni-redirect: {path} has no plugin entry of type cni-redirect")
        return {"cniVersion": document.get("cniVersion", "1.1.0"), **entries[0]}
    return {"cniVersion": "1.1.0", **document}


def _render(args: argparse.Namespace) -> int:
    from .config import ANNOTATIONS_CAPABILITY, PodRef, parse_conf
    from .errors import CniError
    from .plugin import decide

    annotations: dict[str, str] = {}
    if args.annotations:
        with open(args.annotations, encoding="utf-8") as handle:
            annotations.update(json.load(handle))
    for item in args.annotation:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"cni-redirect: --annotation {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        annotations[key] = value
    entry = _load_entry(args.conflist)
    entry["runtimeConfig"] = {ANNOTATIONS_CAPABILITY: annotations}
    if args.profile:
        entry["profile"] = args.profile
    try:
        decision = decide(parse_conf(entry), PodRef(args.namespace, None, None))
    except CniError as error:
        print(f"cni-redirect: {error.msg}" + (f" ({error.details})" if error.details else ""), file=sys.stderr)
        return 1
    if decision.ruleset is None:
        print(f"# no table: {decision.reason}")
        return 0
    if args.json:
        print(json.dumps(decision.ruleset.add_batch(), indent=2))
    else:
        sys.stdout.write(decision.ruleset.to_text())
    if decision.ruleset.routing is not None:
        from .routing import describe

        objects = decision.ruleset.routing.objects()
        print(
            "# TPROXY policy routing, added in the pod netns with the table:",
            file=sys.stderr if args.json else sys.stdout,
        )
        for obj in objects:
            print(f"#   {describe(obj)}", file=sys.stderr if args.json else sys.stdout)
    return 0
