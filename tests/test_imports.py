"""The package's import graph: no cycle, and the layering rules of docs/CONTRIBUTING.md's "Code layout".

The graph is read from the source (every `import`, at module level or inside
a function), so a lazy import counts as an edge too. Third-party modules are
nodes by their top-level name (`pydantic`, `pyroute2`, `nftables`, `grpc`).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cni_redirect"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        base = node.module or ""
    else:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    # `from . import wire` imports a module; `from .spec import X` imports spec.
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph(module_level_only: bool = False) -> dict[str, set[str]]:
    """Edges from each cni_redirect module to what it imports (ours by full name, others by top-level name)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        targets: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                for name in _resolve(module, node, path.name == "__init__.py"):
                    if name.startswith("cni_redirect"):
                        if name in files:
                            targets.add(name)
                    elif name and not name.startswith("__future__"):
                        targets.add(name.split(".")[0])
        # A submodule importing its own package is not an edge: the package's __init__ always runs first.
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        graph[module] = targets - {module} - ancestors
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target in graph and target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"json"}}) is None


def test_no_import_cycle_anywhere_in_the_package():
    assert find_cycle(import_graph()) is None


HEAVY = {"pydantic", "pyroute2", "nftables", "grpc", "google", "prometheus_client"}
#: Every module that reaches the kernel (a netns, nftables, netlink), and the libraries that do.
KERNEL = {"cni_redirect.backend", "cni_redirect.netns", "cni_redirect.cniserver", "cni_redirect.fake",
          "cni_redirect.netlink", "cni_redirect.nftsize", "cni_redirect.nftgen", "cni_redirect.routing", "nftables",
          "pyroute2", "cni_redirect.node.pods.nftevents"}  # fmt: skip
LAB = "cni_redirect.testing"
#: The node agent: every module of cni_redirect.node, whichever wing.
NODE = {_module_name(p) for p in (PACKAGE / "node").rglob("*.py")}
AGENT = {"cni_redirect.node.agent.daemon", "cni_redirect.node.chaining.chain"}
#: The node's wings, in the one direction data flows: a wing may reach those before it, never those after.
WINGS = ("chaining", "pods", "agent", "admin")
OURS_BUT_ERRORS = {f"cni_redirect.{m}" for m in ("spec", "config", "plugin", "backend", "netns", "wire", "skel")}

RULES = [
    # (module, what it must never reach, module-level imports only?, why)
    ("cni_redirect.values", KERNEL | {"cni_redirect.spec", "cni_redirect.settings"}, False, "the grammar knows no key"),
    ("cni_redirect.spec", KERNEL | {"cni_redirect.settings"}, False, "validation never touches the kernel"),
    ("cni_redirect.settings", KERNEL | {"cni_redirect.config"}, False, "layering is pure: no kernel, no entry"),
    ("cni_redirect.evaluation", KERNEL | NODE, False, "the evaluation and the comparison are pure"),
    ("cni_redirect.bounds", KERNEL | NODE, False, "a bound is data"),
    ("cni_redirect.build", KERNEL | {"cni_redirect.settings"}, False, "the builder reads a spec, nothing else"),
    ("cni_redirect.nfttext", OURS_BUT_ERRORS | HEAVY | {"cni_redirect.ruleset"}, False, "it renders dicts"),
    (
        "cni_redirect.ruleset",
        KERNEL | {"cni_redirect.spec"},
        False,
        "the ruleset is pure data: it never talks to the kernel",
    ),
    ("cni_redirect.config", KERNEL, False, "validation never touches the kernel"),
    ("cni_redirect.profiles", KERNEL, False, "a mesh profile is data and a translation: no kernel"),
    ("cni_redirect.routing", NODE | {"nftables"}, False, "policy routing is netlink, not nftables or the node agent"),
    ("cni_redirect.front", HEAVY, True, "the front loads on every pod start: stdlib only"),
    ("cni_redirect.status", HEAVY | KERNEL, False, "STATUS without a server loads nothing heavy"),
    ("cni_redirect.node.agent.watch", HEAVY | KERNEL, False, "watching dirs is inotify and select only"),
    ("cni_redirect.wire", HEAVY | {"cni_redirect.spec", "cni_redirect.plugin"}, False, "the protocol is stdlib only"),
    ("cni_redirect.errors", HEAVY | {"cni_redirect.spec"}, False, "errors import nothing"),
    ("cni_redirect.node.chaining.bundle", KERNEL, False, "the installer never enters a netns or runs nft"),
    ("cni_redirect.node.chaining.chain", KERNEL, False, "the installer never enters a netns or runs nft"),
    ("cni_redirect.node.chaining.conflists", KERNEL, False, "the installer never enters a netns or runs nft"),
    ("cni_redirect.node.files", KERNEL, False, "the installer never enters a netns or runs nft"),
    ("cni_redirect.node.agent.nodetaint", HEAVY | KERNEL, False, "the API edge is stdlib HTTP, off the CNI path"),
    ("cni_redirect.node.agent.httpport", KERNEL | AGENT, False, "the HTTP port is given callables, not the agent"),
    ("cni_redirect.skel", {"cni_redirect.backend", "cni_redirect.netns"}, False, "the dispatcher knows no kernel"),
    ("cni_redirect.plugin", NODE | {"cni_redirect.cniserver"}, False, "the plugin knows no node agent"),
    ("cni_redirect.cniserver", NODE, False, "the CNI server is not the node agent"),
    ("cni_redirect.backend", NODE, False, "the backend knows no node agent"),
    ("cni_redirect.fake", {"nftables", "pyroute2"}, True, "the fake needs no kernel"),
    ("cni_redirect.netns", {"nftables"}, False, "entering a netns is not programming it"),
    ("cni_redirect.logs", OURS_BUT_ERRORS | NODE, False, "logging depends on nothing of ours"),
]


@pytest.mark.parametrize(("module", "forbidden", "module_level", "why"), RULES, ids=[r[0] for r in RULES])
def test_layering_rule(module, forbidden, module_level, why):
    graph = import_graph(module_level_only=module_level)
    assert module in graph, f"{module} is gone: update the rule and docs/CONTRIBUTING.md's Code layout"
    reached = closure(graph, module)
    assert not reached & forbidden, f"{module} reaches {sorted(reached & forbidden)}: {why}"


def _wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["cni_redirect", "node"] and parts[2] in WINGS else None


@pytest.mark.parametrize("wing", WINGS)
def test_a_node_wing_reaches_only_the_wings_before_it(wing):
    graph = import_graph()
    later = set(WINGS[WINGS.index(wing) + 1 :])
    members = [m for m in graph if _wing(m) == wing]
    assert members, f"the wing {wing} is empty: update WINGS and cni_redirect/node/__init__.py"
    for module in members:
        reached = {m for m in closure(graph, module) if _wing(m) in later}
        assert not reached, f"{module} reaches {sorted(reached)}: the {wing} wing comes before {sorted(later)}"


def test_every_node_module_but_the_shared_ones_is_in_a_wing():
    top = {m for m in NODE if _wing(m) is None and m.count(".") == 2} - {f"cni_redirect.node.{w}" for w in WINGS}
    assert top == {"cni_redirect.node.options", "cni_redirect.node.files"}


def test_the_fronts_whole_module_level_closure_is_ours_and_the_c_socket_module():
    reached = closure(import_graph(module_level_only=True), "cni_redirect.front")
    assert reached == {"cni_redirect.wire", "os", "sys", "_socket"}


def test_nothing_that_runs_on_a_node_imports_the_lab():
    graph = import_graph()
    users = {module for module, targets in graph.items() if any(t.startswith(LAB) for t in targets)}
    assert {m for m in users if not m.startswith(LAB)} == set()


def test_scripts_and_benchmarks_import_the_package_never_the_tests():
    offenders = []
    for path in [*(REPO / "scripts").glob("*.py"), *(REPO / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.name}: {n}" for n in names if n == "tests" or n.startswith("tests.")]
    assert not offenders


def test_stdlib_detection_is_real():
    assert "_socket" in sys.stdlib_module_names and "pydantic" not in sys.stdlib_module_names


def _callers(function: str) -> set[str]:
    """The package's modules that call `function` by name (a bare call or an attribute call)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name == function:
                    found.add(_module_name(path))
    return found


def test_settings_are_layered_in_one_place_and_compared_in_one_place():
    """Every surface (ADD, CHECK, render, inspect, doctor, repair, the agent's entry check) goes through these."""
    assert _callers("merge_settings") == {"cni_redirect.evaluation"}
    assert _callers("build_spec") == {"cni_redirect.evaluation"}
    assert _callers("build_ruleset") == {"cni_redirect.evaluation"}
    assert _callers("_table_drift") == {"cni_redirect.evaluation"}
    assert _callers("compare") == {"cni_redirect.plugin", "cni_redirect.node.pods.survey"}


def test_every_module_that_opens_a_kernel_socket_is_in_the_kernel_set():
    """A module that enters a netns or opens a netlink or nftables socket is a kernel module: the rules above keep
    policy off it only if the set names it."""
    markers = ("socket.socket(", "_socket.socket(", "AF_NETLINK", "setns(", "import nftables", "from pyroute2")
    opening = {
        _module_name(path)
        for path in PACKAGE.rglob("*.py")
        if not _module_name(path).startswith(LAB) and any(marker in path.read_text() for marker in markers)
    }
    assert opening - {"cni_redirect.wire", "cni_redirect.node.agent.probe"} <= KERNEL, (
        "AF_UNIX only: the front and the probe"
    )
