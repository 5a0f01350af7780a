"""Our table in the calling thread's netns without libnftables: whether it is there, how big, and its deletion.

Listing a table through libnftables builds it whole in memory (JSON text,
then Python objects): 300 000 elements a pod's process added to one of our
sets cost a reader 269 MiB. This counts rules and set elements with netlink
dumps filtered to our table, stopping at the bound, so a reader can refuse
to list a table that is not one we could have written. Chains and named
objects count too: 150 000 empty chains list as ~60 MiB of JSON as well.

Deleting goes around libnftables too: its `delete table` fills its cache with
the table first (150 000 chains: 184 MiB). `delete_table` sends one batch with
one NFT_MSG_DELTABLE naming the table by the handle the dump gave, whatever
the pod put in it, and reads the kernel's acknowledgement.
"""

from __future__ import annotations

import struct

from .bounds import Bound
from .errors import KernelError
from .netlink import NETLINK_NETFILTER, attr, attrs, dump, transaction
from .ruleset import TABLE

NFNL_SUBSYS_NFTABLES = 10
NFPROTO_INET = 1
NFT_MSG_GETTABLE, NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_GETSET, NFT_MSG_GETSETELEM = 1, 4, 7, 10, 13
NFT_MSG_GETOBJ, NFT_MSG_GETFLOWTABLE = 19, 23
NFT_MSG_DELTABLE = 2
NFTA_TABLE_NAME, NFTA_TABLE_HANDLE = 1, 4
NFTA_CHAIN_TABLE = 1
NFTA_RULE_TABLE = 1
NFTA_OBJ_TABLE = 1
NFTA_FLOWTABLE_TABLE = 1
NFTA_SET_TABLE, NFTA_SET_NAME = 1, 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
_NFGEN = bytes([NFPROTO_INET, 0, 0, 0])  # struct nfgenmsg: family, version, res_id


def table_exists() -> bool:
    """Whether our table is in this netns, from a dump of the inet tables' names. (libnftables' `list tables`
    fills its cache with every set's elements first: 200 MiB for a table a pod filled with 300 000.)"""
    return table_handle() is not None


def table_handle() -> int | None:
    """Our table's handle, from the dump of the inet tables (stopping at ours); None if it is not there."""
    name = _name(TABLE)
    for _, payload in _dump(NFT_MSG_GETTABLE, b"", "the netns's tables"):
        found = dict(attrs(payload, len(_NFGEN)))
        if found.get(NFTA_TABLE_NAME) == name:
            handle = found.get(NFTA_TABLE_HANDLE, b"")
            return struct.unpack(">Q", handle)[0] if len(handle) == 8 else 0
    return None


def delete_table() -> bool:
    """Delete our table (and all in it) with one message, by the handle the dump gave: nothing is listed, however
    much a pod added. False if it was not there (or went meanwhile); KernelError if the kernel refused."""
    handle = table_handle()
    if handle is None:
        return False
    request = attr(NFTA_TABLE_HANDLE, struct.pack(">Q", handle)) if handle else attr(NFTA_TABLE_NAME, _name(TABLE))
    try:
        transaction(NFNL_SUBSYS_NFTABLES, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE, _NFGEN + request, "our table")
    except KernelError as error:
        if error.errno == 2:  # ENOENT: gone meanwhile (a DEL beside us)
            return False
        raise
    return True


def over(bound: Bound) -> str:
    """Why our table is over `bound` ("" when it is not, or absent), reading at most one message past it."""
    table = _name(TABLE)
    for rules, _ in enumerate(_dump(NFT_MSG_GETRULE, attr(NFTA_RULE_TABLE, table), "our table's rules"), 1):
        if rules > bound.rules:
            return f"more than {bound.rules} rules"
    named = 0
    # The kernel filters a chain dump by nothing: every inet chain streams past, only ours are counted.
    for _, payload in _dump(NFT_MSG_GETCHAIN, b"", "the netns's chains"):
        named += _attr(payload, NFTA_CHAIN_TABLE) == table
        if named > bound.objects:
            return f"more than {bound.objects} chains, sets and objects"
    sets = []
    for _, payload in _dump(NFT_MSG_GETSET, attr(NFTA_SET_TABLE, table), "our table's sets"):
        sets.append(_attr(payload, NFTA_SET_NAME))
        if named + len(sets) > bound.objects:
            return f"more than {bound.objects} chains, sets and objects"
    named += len(sets)
    for message, key in ((NFT_MSG_GETOBJ, NFTA_OBJ_TABLE), (NFT_MSG_GETFLOWTABLE, NFTA_FLOWTABLE_TABLE)):
        for _, payload in _dump(message, attr(key, table), "our table's named objects"):
            named += _attr(payload, key) == table
            if named > bound.objects:
                return f"more than {bound.objects} chains, sets and objects"
    elements = 0
    for name in sets:
        request = attr(NFTA_SET_ELEM_LIST_TABLE, table) + attr(NFTA_SET_ELEM_LIST_SET, name or b"")
        for _, payload in _dump(NFT_MSG_GETSETELEM, request, "our sets' elements"):
            for kind, value in attrs(payload, len(_NFGEN)):
                if kind == NFTA_SET_ELEM_LIST_ELEMENTS:
                    elements += sum(1 for _ in attrs(value))
            if elements > bound.elements:
                return f"more than {bound.elements} set elements"
    return ""


def _attr(payload: bytes, wanted: int) -> bytes | None:
    """One attribute of an nftables message (after its nfgenmsg), or None."""
    return next((value for kind, value in attrs(payload, len(_NFGEN)) if kind == wanted), None)


def _name(text: str) -> bytes:
    return text.encode() + b"\0"


def _dump(message: int, request: bytes, what: str):
    return dump(NETLINK_NETFILTER, (NFNL_SUBSYS_NFTABLES << 8) | message, _NFGEN + request, what)
