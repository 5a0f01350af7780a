"""`cni-redirect`: a CNI plugin when CNI_COMMAND is set, a small CLI otherwise.

CLI subcommands:
  render   print the exact table a pod would get, without applying anything
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    if "CNI_COMMAND" in os.environ:
        return run_cni()
    return run_cli(sys.argv[1:] if argv is None else argv)


def run_cni() -> int:
    from .plugin import RedirectPlugin
    from .skel import dispatch

    stdin = sys.stdin.buffer.read()
    return dispatch(RedirectPlugin(), os.environ, stdin, sys.stdout, sys.stderr)


def run_cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="cni-redirect", description=__doc__.split("\n\n")[0])
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
    render.add_argument("--json", action="store_true", help="print the libnftables JSON batch instead of nft syntax")
    args = parser.parse_args(argv)
    return _render(args)


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
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
