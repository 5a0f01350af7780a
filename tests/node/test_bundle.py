"""Installing the plugin bundle into a temp node's CNI bin dir: versions, links, pruning, repair."""

from __future__ import annotations

import os
import subprocess

from cni_redirect.node.bundle import BUNDLE_PREFIX


def test_bundle_install_is_versioned_linked_and_keeps_one_previous(host):
    installer = host.agent()
    installer.install()
    link = host.bin / "cni-redirect"
    assert link.is_symlink() and subprocess.run([str(link)], capture_output=True, text=True).stdout == "v1\n"
    v1 = os.readlink(link)
    installer.install()  # same content: nothing copied, same link
    assert os.readlink(link) == v1
    host.set_bundle_version("v2")
    installer.install()
    assert subprocess.run([str(link)], capture_output=True, text=True).stdout == "v2\n"
    host.set_bundle_version("v3")
    installer.install()
    bundles = sorted(p.name for p in host.bin.glob(f"{BUNDLE_PREFIX}*"))
    assert len(bundles) == 2, "current and previous only"
    assert not [p for p in host.bin.iterdir() if ".tmp-" in p.name or ".link-" in p.name]


def test_single_file_plugin_source(host):
    single = host.root / "cni-redirect-single"
    single.write_text("#!/bin/sh\necho single\n")
    installer = host.agent(plugin_source=single)
    installer.install()
    target = host.bin / "cni-redirect"
    assert not target.is_symlink() and os.access(target, os.X_OK)
    assert subprocess.run([str(target)], capture_output=True, text=True).stdout == "single\n"


def test_deleted_binary_is_reinstalled(host):
    host.put("10-calico.conflist")
    installer = host.agent()
    installer.install()
    installer.reconcile()
    (host.bin / "cni-redirect").unlink()
    assert installer.reconcile()
    assert os.access(host.bin / "cni-redirect", os.X_OK)
