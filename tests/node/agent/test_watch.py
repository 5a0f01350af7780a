"""The agent's loop wakes on changes to its dirs (inotify), not by polling them."""

from __future__ import annotations

import json
import threading
import time

from cni_redirect.node.agent.watch import DirWatch
from tests.support import NODE_SETTINGS as SETTINGS
from tests.support import AgentThread as Agent
from tests.support import wait_for


def test_a_change_wakes_the_wait_at_once(tmp_path):
    watch = DirWatch([tmp_path], fallback=30, poll=30)
    try:
        assert not watch.degraded
        threading.Timer(0.1, lambda: (tmp_path / "10-net.conflist").write_text("{}")).start()
        start = time.monotonic()
        assert watch.wait() is True
        assert time.monotonic() - start < 5
        time.sleep(0.05)
        watch.wait(timeout=0.05)  # the rest of that write's events (modify, close)
        assert watch.wait(timeout=0.05) is False, "the queue was drained: nothing new"
    finally:
        watch.close()


def test_a_wake_ends_the_wait_without_a_change(tmp_path):
    watch = DirWatch([tmp_path], fallback=30, poll=30)
    try:
        threading.Timer(0.1, watch.wake).start()
        start = time.monotonic()
        assert watch.wait() is False and time.monotonic() - start < 5
    finally:
        watch.close()


def test_a_dir_that_does_not_exist_yet_is_polled_then_watched(tmp_path):
    later = tmp_path / "net.d"
    watch = DirWatch([later], fallback=30, poll=0.05)
    try:
        assert watch.degraded and watch.wait() is False  # the poll interval, not the fallback
        later.mkdir()
        watch.wait(timeout=0.01)
        assert not watch.degraded
    finally:
        watch.close()


def test_the_agent_reinserts_on_a_rewrite_long_before_its_recheck(host, tmp_path):
    entry_file = tmp_path / "entry.json"
    entry_file.write_text(json.dumps(SETTINGS))
    original = host.put("10-calico.conflist")
    agent = Agent(host, entry_file=entry_file, poll_interval=60.0, recheck_interval=60.0)
    try:
        wait_for(lambda: len(host.entries("10-calico.conflist")) == 1)
        host.put("10-calico.conflist", original)  # the primary rewrites its file without us
        seconds = wait_for(lambda: len(host.entries("10-calico.conflist")) == 1, timeout=10)
        assert seconds < 10, "woken by the change: neither the 60 s poll nor the 60 s re-check ran"
    finally:
        start = time.monotonic()
        assert agent.terminate() == 0
        assert time.monotonic() - start < 15, "the stop wakes the loop"
