"""The agent's metrics stay bounded whatever the requests say (the labels come from closed sets)."""

from __future__ import annotations

from cni_redirect import errors
from cni_redirect.node.agent.metrics import CNI_CODES, Metrics
from cni_redirect.skel import REQUIRED_ENV


def test_made_up_commands_do_not_grow_the_scrape():
    metrics = Metrics()
    metrics.observe("ADD", 0, 0.001)
    baseline = len(metrics.render())
    for index in range(300):
        metrics.observe(f"MADE-UP-{index}-" + "x" * 50, 4, 0.001)
    grown = len(metrics.render()) - baseline
    assert grown < 4000, f"/metrics grew by {grown} bytes for 300 made-up commands"
    assert 'command="other"' in metrics.render().decode()
    assert "MADE-UP" not in metrics.render().decode()


def test_error_codes_outside_the_tree_are_one_value():
    metrics = Metrics()
    metrics.observe("ADD", 123456, 0.001)
    assert 'code="999"' in metrics.render().decode() and "123456" not in metrics.render().decode()


def test_the_closed_sets_are_the_dispatchers_and_the_error_trees():
    codes = {cls.code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.CniError)}
    assert codes | {0} == CNI_CODES
    assert set(REQUIRED_ENV) == {"ADD", "CHECK", "DEL", "STATUS", "GC", "VERSION"}


def test_a_failed_pass_says_so_and_failed_sandboxes_are_counted():
    from collections import Counter

    metrics = Metrics()
    metrics.pass_done(Counter({"ok": 3}), {}, "", failed=1)
    text = metrics.render().decode()
    assert 'cni_redirect_pods{state="ok"} 3.0' in text and "cni_redirect_repair_last_pass_ok 1.0" in text
    assert "cni_redirect_repair_sandbox_failures_total 1.0" in text
    metrics.pass_done(Counter(), {}, "CRI ListPodSandbox at /run/containerd/containerd.sock: UNAVAILABLE")
    text = metrics.render().decode()
    assert "cni_redirect_repair_last_pass_ok 0.0" in text and "cni_redirect_repair_pass_failures_total 1.0" in text
