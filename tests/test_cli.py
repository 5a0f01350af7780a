"""`cni-redirect render`: the preview users run before annotating a pod."""

from __future__ import annotations

import json

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
