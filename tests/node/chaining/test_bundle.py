"""Installing the plugin bundle into a temp node's CNI bin dir: versions, links, pruning, repair."""

from __future__ import annotations

import os
import subprocess

from cni_redirect.node.chaining.bundle import BUNDLE_PREFIX


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


def test_pruning_keeps_the_bundle_the_link_pointed_to_not_the_newest(host):
    """v1 -> v2 -> rollback to v1 -> v3: the bundle in use a moment ago is v1, whatever the mtimes say."""
    installer = host.agent()
    link = host.bin / "cni-redirect"
    versions = {}
    for name in ("v1", "v2"):
        host.set_bundle_version(name)
        installer.install()
        versions[name] = os.readlink(link).split("/")[0]
    host.set_bundle_version("v1")
    installer.install()  # the rollback
    assert os.readlink(link).split("/")[0] == versions["v1"]
    os.utime(host.bin / versions["v2"], (2_000_000_000, 2_000_000_000))  # copytree copies the image's mtimes
    host.set_bundle_version("v3")
    installer.install()
    kept = {p.name for p in host.bin.glob(f"{BUNDLE_PREFIX}*")}
    assert versions["v1"] in kept and versions["v2"] not in kept and len(kept) == 2
