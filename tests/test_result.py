"""prevResult conversion across every supported CNI version."""

from __future__ import annotations

import pytest

from cni_redirect.errors import DecodeError, IncompatibleVersion
from cni_redirect.result import SUPPORTED_VERSIONS, convert_result, require_supported
from cni_redirect.testing.netlab import prev_result


@pytest.mark.parametrize("source", SUPPORTED_VERSIONS)
@pytest.mark.parametrize("target", SUPPORTED_VERSIONS)
def test_convert_between_all_versions(source, target):
    original = prev_result(source)
    result = convert_result(original, target)
    assert result["cniVersion"] == target
    assert [ip["address"] for ip in result["ips"]] == [ip["address"] for ip in original["ips"]]
    if target < "1.0.0":
        assert [ip["version"] for ip in result["ips"]] == ["4", "6"]
    else:
        assert all("version" not in ip for ip in result["ips"])
    assert result["interfaces"] == original["interfaces"] and result["routes"] == original["routes"]
    assert original["cniVersion"] == source  # the input is not mutated


def test_unknown_fields_pass_through():
    result = convert_result({"cniVersion": "1.1.0", "ips": [], "custom": {"x": 1}}, "1.0.0")
    assert result["custom"] == {"x": 1}


@pytest.mark.parametrize("bad", ["x", [], {"ips": "nope"}, {"ips": [1]}, {"ips": [{"address": 5}]}])
def test_malformed_prev_result(bad):
    with pytest.raises(DecodeError):
        convert_result(bad, "0.4.0")


@pytest.mark.parametrize("version", [None, "", 1, "0.2.0", "2.0.0", "1.0"])
def test_unsupported_versions(version):
    with pytest.raises(IncompatibleVersion) as info:
        require_supported(version)
    assert info.value.code == 1
