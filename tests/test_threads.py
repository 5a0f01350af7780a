"""Our threads carry their names into the OS, where `top -H` and /proc show them."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from cni_redirect.threads import NamedThread


def test_a_named_thread_has_its_name_in_proc_and_a_long_one_is_cut_to_15_bytes():
    seen: queue.Queue[str] = queue.Queue()

    def report() -> None:
        seen.put(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())

    for name, expected in (("repair", "repair"), ("a-very-long-thread-name", "a-very-long-thr")):
        thread = NamedThread(report, name)
        thread.start()
        thread.join(timeout=5)
        assert thread.daemon and seen.get(timeout=5) == expected
    plain = threading.Thread(target=report)
    plain.start()
    plain.join(timeout=5)
    assert seen.get(timeout=5) != "repair", "a thread we did not name keeps the process's name"
