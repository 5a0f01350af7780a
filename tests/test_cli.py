"""`cni-redirect render`: the preview users run before annotating a pod."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    [("REPAIR_INTERVAL", "30s"), ("READINESS_PORT", "http"), ("REPAIR", "fix"), ("POLL_INTERVAL", "soon")],
)
def test_a_bad_environment_default_is_a_usage_error_naming_the_variable(variable, value):
    run = cli("install", **{variable: value})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    (error,) = [line for line in run.stderr.splitlines() if "error:" in line]
    assert f"{value!r}" in error and f"environment variable {variable}" in error


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["install", "--handover-wait=5"], "--handover-wait was removed from `install`: it had no effect"),
        (["install", "--uninstall-grace", "2"], "--uninstall-grace was removed from `install`: it had no effect here"),
    ],
)
def test_a_removed_flag_is_one_line_saying_so(argv, words):
    run = cli(*argv)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert words in run.stderr and "drop it" in run.stderr


def test_install_and_uninstall_take_their_flags_from_the_options_table():
    """Every setting with a flag appears on the commands it names, with its default from Options, and nothing
    else of Options does."""
    from dataclasses import fields

    from cni_redirect.node.options import Options

    install, uninstall = cli("install", "--help").stdout, cli("uninstall", "--help").stdout
    for setting in fields(Options):
        name = f"--{setting.name.replace('_', '-')}"
        how = setting.metadata.get("flag")
        assert (name in install) == (how is not None and "install" in how.commands), name
        assert (name in uninstall) == (how is not None and "uninstall" in how.commands), name
    assert "--force" in uninstall and "--cni-cache-dir" in uninstall


def test_docs_install_lists_every_install_flag_with_its_variable():
    """docs/install.md's flag table against the options table: an added setting must be documented there."""
    from dataclasses import fields

    from cni_redirect.node.options import Options

    page = (Path(__file__).resolve().parents[1] / "docs" / "install.md").read_text()
    for setting in fields(Options):
        how = setting.metadata.get("flag")
        if how is not None and "install" in how.commands:
            row = f"| `--{setting.name.replace('_', '-')}` | `{setting.name.upper()}` |"
            assert row in page, f"docs/install.md lacks the row {row}"


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
