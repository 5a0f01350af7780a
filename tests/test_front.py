"""The thin front: its error objects, its import budget, VERSION from constants."""

from __future__ import annotations

import json
import subprocess
import sys

from cni_redirect.front import VERSIONS
from cni_redirect.result import SUPPORTED_VERSIONS


def test_the_fronts_version_answer_is_the_result_modules_list():
    """VERSION is answered from constants: they must be the versions the plugin converts results to."""
    answer = json.loads(VERSIONS)
    assert answer["supportedVersions"] == list(SUPPORTED_VERSIONS)
    assert answer["cniVersion"] == SUPPORTED_VERSIONS[-1]


def test_front_imports_only_the_standard_library_it_needs():
    """Loading the front (what every pod start pays) adds the package, front, wire and the C `_socket`."""
    code = (
        "import sys; before = set(sys.modules); import cni_redirect.front; "
        "print('\\n'.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    assert set(out.split()) == {"cni_redirect", "cni_redirect.front", "cni_redirect.wire", "_socket"}


def test_version_is_answered_by_the_front_with_any_env():
    out = subprocess.run(
        [sys.executable, "-m", "cni_redirect"],
        env={"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy", "CNI_CONTAINERID": "dummy"},
        input=b"",
        capture_output=True,
        check=True,
    ).stdout
    assert "1.1.0" in json.loads(out)["supportedVersions"]
