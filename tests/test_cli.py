"""`cni-redirect render`: the preview users run before annotating a pod."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cni_redirect.cli import run_cli
from tests.support import GOLDEN_DIR


def test_render_matches_the_golden_file(capsys):
    assert run_cli(["render", "-a", "cni-redirect.io/enabled=true"]) == 0
    assert capsys.readouterr().out == (GOLDEN_DIR / "defaults.nft").read_text()


def test_render_json_batch(capsys):
    assert run_cli(["render", "--json", "-a", "cni-redirect.io/enabled=true"]) == 0
    batch = json.loads(capsys.readouterr().out)
    assert batch["nftables"][0] == {"add": {"table": {"family": "inet", "name": "cni_redirect"}}}


def test_render_from_conflist_defaults_and_annotation_file(tmp_path, capsys):
    conflist = tmp_path / "net.conflist"
    conflist.write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "k8s",
                "plugins": [{"type": "bridge"}, {"type": "cni-redirect", "defaults": {"enabled": "true"}}],
            }
        )
    )
    annotations = tmp_path / "a.json"
    annotations.write_text(json.dumps({"cni-redirect.io/exclude-outbound-ports": "2222"}))
    assert run_cli(["render", "--conflist", str(conflist), "--annotations", str(annotations)]) == 0
    assert "elements = { 2222 }" in capsys.readouterr().out


def test_render_not_opted_in_and_excluded_namespace(capsys):
    assert run_cli(["render"]) == 0
    assert capsys.readouterr().out.startswith("# no table: skipped: not enabled")
    assert run_cli(["render", "--namespace", "kube-system", "-a", "cni-redirect.io/enabled=true"]) == 0
    assert "exclude_namespaces" in capsys.readouterr().out


def test_render_errors_go_to_stderr(capsys):
    assert run_cli(["render", "-a", "cni-redirect.io/enabled=true", "-a", "cni-redirect.io/dns-port=x"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "cni-redirect.io/dns-port" in captured.err


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The console script as a user runs it: its exit code, and what it prints."""
    return subprocess.run(
        [sys.executable, "-m", "cni_redirect", *args],
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_install_only_variable_does_not_break_other_commands():
    run = cli("render", "-a", "cni-redirect.io/enabled=true", REPAIR_INTERVAL="30s")
    assert run.returncode == 0 and run.stdout == (GOLDEN_DIR / "defaults.nft").read_text()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("REPAIR_INTERVAL", "30s"), ("READINESS_PORT", "http"), ("REPAIR", "fix"), ("HANDOVER_WAIT", "soon")],
)
def test_a_bad_environment_default_is_a_usage_error_naming_the_variable(variable, value):
    run = cli("install", **{variable: value})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    (error,) = [line for line in run.stderr.splitlines() if "error:" in line]
    assert f"{value!r}" in error and f"environment variable {variable}" in error


@pytest.mark.parametrize(
    ("flag", "content", "words"),
    [
        ("--annotations", None, "missing.json: No such file or directory"),
        ("--annotations", "[1]", "must hold a JSON object of string values"),
        ("--annotations", '{"a": 1}', "must hold a JSON object of string values"),
        ("--annotations", "{", "not valid JSON"),
        ("--conflist", None, "missing.json: No such file or directory"),
        ("--conflist", "[1]", "must hold a JSON object"),
        ("--conflist", '{"plugins": [{"type": "bridge"}]}', "has no plugin entry of type cni-redirect"),
    ],
)
def test_a_file_render_cannot_use_is_one_line_naming_it(tmp_path, flag, content, words):
    path = tmp_path / "missing.json"
    if content is not None:
        path.write_text(content)
    run = cli("render", flag, str(path))
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"cni-redirect: {flag} {path}") and words in run.stderr


def test_render_profile_choices_are_the_entrys_profiles():
    from cni_redirect.profiles import PROFILE_NAMES

    run = cli("render", "--profile", "nope")
    assert run.returncode == 2 and all(name in run.stderr for name in PROFILE_NAMES)
