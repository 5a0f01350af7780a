"""Faults against the real kernel: vanishing netns, rejected batches, SIGKILL mid-ADD, bad log paths."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni_redirect.backend import KernelBackend, normalize
from cni_redirect.errors import CniError, InternalError
from cni_redirect.netns import open_netns
from cni_redirect.ruleset import TCP_DPORT, Chain, Match, Rule, RuleKind, Ruleset, SetRef
from cni_redirect.testing.netlab import PLUGIN, Netns, enabled, plugin_conf, run_plugin
from cni_redirect.testing.sessions import at
from tests.support import INJECTIONS, render


def test_netns_vanishing_between_open_and_transaction(pod):
    """Our fd keeps the namespace alive: the ADD completes there, and nothing reaches the host."""

    def open_then_runtime_deletes(netns: str) -> int:
        fd = open_netns(netns)
        pod.delete()  # the sandbox is torn down right after we opened it
        assert not os.path.exists(netns)
        return fd

    at(KernelBackend(reach=open_then_runtime_deletes), pod.path).apply(render("defaults"))
    # The netns is gone from the filesystem: a later ADD fails cleanly, a later DEL succeeds.
    run = run_plugin("ADD", pod.path, plugin_conf(enabled()))
    assert run.rc == 1 and run.json["code"] == 4 and "does not exist" in run.json["msg"]
    assert run_plugin("DEL", pod.path, plugin_conf(enabled())).rc == 0


def test_rejected_batch_is_a_clear_error_and_the_previous_table_survives(pod):
    backend = KernelBackend()
    good = render("exclude-everything")
    at(backend, pod.path).apply(good)
    before = at(backend, pod.path).read()
    # A rule referencing a set that does not exist: libnftables rejects the whole transaction.
    prerouting, output = good.chains
    bad = Ruleset(good.sets, (prerouting, Chain("output", "output", (*output.rules, _broken_rule()))))
    with pytest.raises(InternalError) as info:
        at(backend, pod.path).apply(bad)
    assert "nftables rejected the apply transaction" in info.value.msg
    assert "missing_set" in info.value.details or "No such file" in info.value.details
    assert at(backend, pod.path).read() == before, "a failed replace is all-or-nothing"


def _broken_rule() -> Rule:
    return Rule((Match(TCP_DPORT, SetRef("missing_set")),), None, RuleKind.CAPTURE_OUTBOUND)  # a set that is not there


def test_sigkill_mid_add_then_add_again_is_consistent(pod):
    conf = json.dumps(plugin_conf(enabled(exclude_outbound_cidrs="10.0.0.0/8", exclude_outbound_ports="22")))
    env = {
        "PATH": os.environ["PATH"],
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "kill-test",
        "CNI_NETNS": pod.path,
        "CNI_IFNAME": "eth0",
    }
    rng = random.Random(7)
    outcomes = []
    for _ in range(12):
        pod.run("nft", "delete", "table", "inet", "cni_redirect", check=False)  # each attempt starts fresh
        proc = subprocess.Popen(
            [str(PLUGIN)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        assert proc.stdin is not None
        proc.stdin.write(conf.encode())
        proc.stdin.close()
        time.sleep(rng.uniform(0.2, 0.6))  # around the moment the transaction is sent
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        listing = pod.ruleset()
        outcomes.append("table" if "cni_redirect" in listing else "none")
        # Killed at any instant, the kernel holds the whole table or none of it.
        assert listing.count("table inet cni_redirect") <= 1
        if "cni_redirect" in listing:
            assert "elements = { 22 }" in listing and "10.0.0.0/8" in listing
    run = run_plugin("ADD", pod.path, json.loads(conf))
    assert run.rc == 0
    assert run_plugin("CHECK", pod.path, json.loads(conf)).rc == 0
    print(f"\n[faults] SIGKILL outcomes: {outcomes}")


@pytest.mark.parametrize("where", ["missing-dir", "a-directory", "read-only-mount"])
def test_unwritable_log_file_does_not_fail_the_pod(pod, tmp_path, where):
    if where == "missing-dir":
        path = tmp_path / "nope" / "log"
    elif where == "a-directory":
        path = tmp_path
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(ro)], check=True)
        path = ro / "log"
    try:
        run = run_plugin("ADD", pod.path, plugin_conf(enabled(), log_file=str(path)))
    finally:
        if where == "read-only-mount":
            subprocess.run(["umount", str(tmp_path / "ro")], check=True)
    assert run.rc == 0, run.stdout + run.stderr
    assert "cannot write log_file" in run.stderr
    assert "table inet cni_redirect" in pod.ruleset()


keys = st.sampled_from(
    ["exclude-outbound-ports", "include-outbound-ports", "exclude-outbound-cidrs", "exclude-interfaces", "proxy-uid"]
)
values = st.one_of(
    st.sampled_from(INJECTIONS[:10]),
    st.lists(st.integers(1, 65535), min_size=1, max_size=40).map(lambda xs: ",".join(map(str, xs))),
    st.lists(
        st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}"), min_size=1, max_size=20
    ).map(",".join),
    st.text(max_size=10),
)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(keys, values, max_size=3))
def test_real_kernel_holds_the_expected_table_or_the_previous_one(annotations):
    from cni_redirect.config import PodRef, parse_conf
    from tests.support import decide

    ns = Netns.create("prop")
    try:
        backend = KernelBackend()
        previous = render("defaults")
        at(backend, ns.path).apply(previous)
        conf = plugin_conf(enabled(**{k.replace("-", "_"): v for k, v in annotations.items()}))
        try:
            decision = decide(parse_conf(conf), PodRef("default", "p", None))
            assert decision.ruleset is not None
            at(backend, ns.path).apply(decision.ruleset)
            expected = decision.ruleset
        except CniError as error:
            assert error.code in (7,), error.msg
            expected = previous
        assert at(backend, ns.path).read() == normalize(expected.objects())
    finally:
        ns.delete()


def test_a_fifo_at_the_netns_path_is_refused_at_once(tmp_path):
    """A sandbox whose netns path is a FIFO must not block repair (or the front) in open()."""
    from cni_redirect.errors import NotANetns

    fifo = tmp_path / "netns"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(NotANetns):
        open_netns(str(fifo))
    assert time.monotonic() - start < 5
    run = run_plugin("DEL", str(fifo), plugin_conf(enabled(), agent_socket="/run/cni-redirect/none.sock"))
    assert run.rc == 0 and run.seconds < 10, "the front's open does not block either"


def test_a_thread_that_cannot_return_home_stops_the_process(pod):
    """Injected: the setns back home fails (ENOMEM). The process exits rather than keep a thread in the pod's netns,
    where a later repair pass would take the pod's netns for its own and could program the node's."""
    code = f"""
import errno, pyroute2.netns
from cni_redirect.backend import KernelBackend
calls = []
real = pyroute2.netns.setns
def flaky(fd, flags=0, libc=None):
    calls.append(fd)
    if len(calls) == 2:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")
    return real(fd, flags=flags, libc=libc)
pyroute2.netns.setns = flaky
with KernelBackend().session({pod.path!r}) as session:
    session.read()
print("returned", flush=True)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 70, (run.returncode, run.stdout, run.stderr)
    assert "returned" not in run.stdout and "stuck in a pod network namespace" in run.stderr
