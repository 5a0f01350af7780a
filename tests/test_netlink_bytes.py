"""The byte parsers (netlink framing, attributes, the generation, the size counts) over replies captured from
the kernel (tests/fixtures/netlink/capture.py): no root needed, and a parser change is held to real bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cni_redirect import netlink, nftgen, nftsize
from cni_redirect.bounds import Bound, bound_for
from cni_redirect.errors import KernelError
from tests.support import render

FIXTURES = Path(__file__).parent / "fixtures" / "netlink"
DUMPS = {
    nftsize.NFT_MSG_GETTABLE: "gettable.bin",
    nftsize.NFT_MSG_GETCHAIN: "getchain.bin",
    nftsize.NFT_MSG_GETRULE: "getrule.bin",
    nftsize.NFT_MSG_GETSET: "getset.bin",
}


def replies(name: str) -> list[tuple[int, bytes]]:
    return list(netlink.messages((FIXTURES / name).read_bytes(), name))


@pytest.mark.parametrize("name", sorted(DUMPS.values()))
def test_every_dump_parses_to_its_done_message(name):
    found = replies(name)
    assert found and found[-1] == (netlink.NLMSG_DONE, b"")
    assert all(kind >> 8 == nftsize.NFNL_SUBSYS_NFTABLES for kind, _ in found[:-1])


def test_the_generation_is_read_off_the_kernels_reply():
    ((kind, payload),) = replies("getgen.bin")
    expected = json.loads((FIXTURES / "expected.json").read_text())["generation"]
    assert nftgen.generation_of(kind, payload) == expected
    with pytest.raises(KernelError) as wrong_type:
        nftgen.generation_of(kind + 1, payload)
    assert "unexpected reply type" in wrong_type.value.details
    with pytest.raises(KernelError) as no_id:
        nftgen.generation_of(kind, payload[:4])
    assert "no NFTA_GEN_ID" in no_id.value.details


@pytest.fixture
def replayed(monkeypatch):
    """nftsize's dumps answered from the captured bytes (a kind not captured: an empty dump)."""

    def dump(message: int, request: bytes, what: str):
        name = DUMPS.get(message)
        data = (FIXTURES / name).read_bytes() if name else b""
        return (m for m in netlink.messages(data, what) if m[0] != netlink.NLMSG_DONE)

    monkeypatch.setattr(nftsize, "_dump", dump)


def test_the_size_counts_read_the_kernels_table(replayed):
    objects = render("tproxy").objects()
    assert nftsize.table_exists()
    assert nftsize.over(bound_for(objects)) == ""
    rules = sum(1 for obj in objects if "rule" in obj)
    assert nftsize.over(Bound(rules=rules - 1, elements=1 << 30, objects=1 << 30)) == f"more than {rules - 1} rules"
    named = sum(1 for obj in objects if "chain" in obj or "set" in obj)
    assert nftsize.over(Bound(rules=rules, elements=1 << 30, objects=named - 1)) == (
        f"more than {named - 1} chains, sets and objects"
    )


@pytest.mark.parametrize("cut", [1, 3, 17, 100])
def test_truncated_bytes_end_the_parse_without_an_error_or_a_loop(cut):
    data = (FIXTURES / "getrule.bin").read_bytes()[:-cut]
    whole = replies("getrule.bin")
    parsed = list(netlink.messages(data, "rules"))
    assert len(parsed) < len(whole)
    for _, payload in parsed:
        list(netlink.attrs(payload[:-1], 4))


def test_an_error_message_raises_with_its_errno():
    error = netlink.HEADER.pack(netlink.HEADER.size + 4, netlink.NLMSG_ERROR, 0, 1, 0) + (-1 & 0xFFFFFFFF).to_bytes(
        4, "little"
    )
    with pytest.raises(KernelError) as raised:
        list(netlink.messages(error, "a test"))
    assert raised.value.errno == 1
