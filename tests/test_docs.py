"""The docs an admin reads: the README stays short and links the rest; the reference tables are the code's own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_generated_tables_match_the_code():
    """The annotation catalogue, the entry's fields and the metrics are generated: an edit of either side alone
    fails here (scripts/gen_docs.py rewrites them)."""
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_docs.py"), "--check"], capture_output=True)
    assert run.returncode == 0, run.stderr.decode()


def test_regenerating_undoes_a_hand_edit_of_a_table():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gen_docs
    finally:
        sys.path.pop(0)
    text = (REPO / "docs" / "configuration.md").read_text()
    drifted = text.replace("| GID also exempt |", "| GID also exempt, or so |")
    assert gen_docs.render(drifted, "annotations", gen_docs.annotations_table()) == text


def test_the_readme_is_short_and_every_local_link_resolves():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "./scripts/demo.sh" in readme and "./scripts/test.sh" in readme and "Quick start" in readme
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).is_file(), f"{doc.name} links {target}, which is not there"


def test_every_catalogue_key_and_metric_is_documented():
    from cni_redirect.node.agent.metrics import Metrics
    from cni_redirect.spec import ANNOTATION_PREFIX, CATALOGUE

    configuration = (REPO / "docs" / "configuration.md").read_text()
    assert all(f"`{ANNOTATION_PREFIX}{key}`" in configuration for key in CATALOGUE)
    operations = (REPO / "docs" / "operations.md").read_text()
    names = {family.name for family in Metrics().registry.collect() if not family.name.startswith("process_")}
    assert all(f"`{name}" in operations for name in names)
