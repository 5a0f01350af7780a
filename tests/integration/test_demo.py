"""The README's demo, run as a newcomer runs it but with its output in a pipe: it captures, and it prints no
terminal escapes into a log (colour only on a terminal, NO_COLOR honoured)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"


@pytest.mark.parametrize("no_color", [None, "1"], ids=["piped", "no-color"])
def test_the_demo_captures_and_writes_plain_text_into_a_pipe(no_color):
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    if no_color:
        env["NO_COLOR"] = no_color
    run = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "captured by the proxy, original destination kept" in run.stdout
    assert "table left in the pod netns: none" in run.stdout
    assert "\x1b" not in run.stdout + run.stderr
