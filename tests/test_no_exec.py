"""The plugin and the agent run as root on every node: neither ever runs a shell or another program.

`cni_redirect.testing`, the lab of the tests, demo and benchmarks, runs `ip`
and containerd; tests/test_imports.py proves no other module imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cni_redirect"
LAB = PACKAGE / "testing"
FORBIDDEN_MODULES = {"subprocess", "pty", "pexpect", "shlex"}
FORBIDDEN_CALLS = {"system", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "spawnv",
                   "spawnve", "posix_spawn", "posix_spawnp", "fork", "forkpty"}  # fmt: skip


def test_no_module_imports_a_process_launcher_or_calls_exec():
    offenders = []
    for path in sorted(p for p in PACKAGE.rglob("*.py") if LAB not in p.parents):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_CALLS:
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
                continue
            else:
                continue
            if names & FORBIDDEN_MODULES:
                offenders.append(f"{path.name}:{node.lineno} imports {sorted(names & FORBIDDEN_MODULES)}")
    assert not offenders, offenders
