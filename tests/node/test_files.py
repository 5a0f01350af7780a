"""Atomic writes on the node: two writers of one file (an old and a new agent, both PID 1) never mix."""

from __future__ import annotations

import json
import os
import threading

from cni_redirect.node.files import copy_tree_atomic, write_atomic


def test_two_writers_of_one_file_never_show_a_reader_a_mixed_file(tmp_path):
    """Threads share a PID as two agents in containers do: a temp name from the PID would be one inode for both."""
    path = tmp_path / "10-calico.conflist"
    documents = [json.dumps({"writer": w, "pad": str(w) * 200_000}).encode() for w in (1, 2)]
    write_atomic(path, documents[0])
    done = threading.Event()
    bad: list[int] = []
    reads = 0

    def writer(data: bytes) -> None:
        for _ in range(150):
            write_atomic(path, data)

    def reader() -> None:
        nonlocal reads
        while not done.is_set():
            try:
                json.loads(path.read_bytes())
            except ValueError:
                bad.append(1)
            reads += 1

    threads = [threading.Thread(target=writer, args=(d,)) for d in documents]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join()
    assert reads > 0 and bad == [], f"{len(bad)} of {reads} reads were not valid JSON"
    assert sorted(os.listdir(tmp_path)) == ["10-calico.conflist"], "no temp file left"


def test_a_copy_that_fails_half_way_leaves_no_staging_dir(tmp_path, monkeypatch):
    import errno
    import shutil

    source = tmp_path / "bundle"
    source.mkdir()
    (source / "cni-redirect").write_text("x")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real_copytree = shutil.copytree

    def disk_full(src, dst, **kwargs):
        real_copytree(src, dst, **kwargs)  # half the bytes are there, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cni_redirect.node.files.shutil.copytree", disk_full)
    try:
        copy_tree_atomic(source, bin_dir / "v1")
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    assert os.listdir(bin_dir) == [], "no half-copied bundle, no staging dir"
    monkeypatch.undo()
    assert copy_tree_atomic(source, bin_dir / "v1") is True and os.listdir(bin_dir) == ["v1"]
    assert copy_tree_atomic(source, bin_dir / "v1") is False, "a version already there is kept"
    assert os.listdir(bin_dir) == ["v1"], "and the second staging copy is gone"
