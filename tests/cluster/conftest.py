"""The cluster tier: a real Kubernetes (kine, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet) on
our private containerd 2.4, driven the way an admin drives one: the real kubectl and helm. Nothing here skips: a
missing binary fails, naming `scripts/setup.sh`.

The node registers with the new-node taint; the agent's image and the app pods' image (the pause image) are
imported into containerd beforehand (no registry here). Host paths in the manifests are the test node's own
(its CNI dirs and CRI socket under the temp dir), set the way an admin sets them for a platform: a kustomize
patch, or the chart's values.
"""

from __future__ import annotations

import pytest

from cni_redirect.testing.cluster import running_cluster


@pytest.fixture(scope="module")
def cluster(host_snapshot, agent_image):
    """A fresh single-node cluster per module; torn down and the host checked afterwards."""
    yield from running_cluster(host_snapshot, agent_image)
