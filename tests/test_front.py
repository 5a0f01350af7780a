"""The thin front: its error objects, its import budget, VERSION from constants."""

from __future__ import annotations

import json
import subprocess
import sys

from cni_redirect.front import _error


def test_error_objects_are_valid_json_whatever_the_message():
    for msg in ["plain", 'with "quotes"', "back\\slash", "new\nline"]:
        obj = json.loads(_error(11, msg, 'd"etails'))
        assert obj["code"] == 11 and obj["cniVersion"] == "1.1.0"


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
