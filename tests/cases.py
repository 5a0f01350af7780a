"""The table of annotation sets whose rendered rulesets are kept as golden files."""

from __future__ import annotations

from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"

CASES: dict[str, dict[str, str]] = {
    "defaults": {},
    "include-ports": {"include-outbound-ports": "80,443,8000-8100", "include-inbound-ports": "8080"},
    "exclude-everything": {
        "exclude-outbound-ports": "22,6000-6999,6500",
        "exclude-outbound-cidrs": "10.0.0.0/8,10.1.0.0/16,169.254.169.254,fd00::/8,2001:db8::1",
        "exclude-inbound-ports": "15090,15021",
        "exclude-uids": "0,1000",
        "exclude-interfaces": "eth1,wg0",
    },
    "include-cidrs-v4-only": {"include-outbound-cidrs": "10.96.0.0/12,192.168.0.0/16"},
    "dns-and-gid": {"capture-dns": "true", "dns-port": "15054", "proxy-gid": "1337"},
    "no-inbound": {"include-inbound-ports": ""},
    "no-outbound": {"include-outbound-ports": ""},
    "custom-proxy": {"proxy-uid": "101", "outbound-port": "10000", "inbound-port": "10000"},
}

# Entries of the conflist that some cases need.
CASE_CONF: dict[str, dict] = {"exclude-everything": {"allow_root_proxy_uid": True}}


def annotations(case: str) -> dict[str, str]:
    return {"cni-redirect.io/enabled": "true", **{f"cni-redirect.io/{k}": v for k, v in CASES[case].items()}}
