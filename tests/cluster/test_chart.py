"""The Helm chart against the kustomize install: the real helm (built by scripts/setup.sh) lints it, renders it for
every platform, and each rendering equals the kustomize overlay of the same name in substance: the same objects,
the same fields, with Helm's own labels and the entry's checksum annotation left aside, and lists compared as sets
where Kubernetes merges them by key. Its values.schema.json refuses a bad value with a message naming it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cni_redirect.testing.cluster import CHART, helm

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "install" / "kubernetes"
KUBECTL = Path(sys.executable).parent / "kubectl"
HELM_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
}
#: Lists Kubernetes merges by a key: their order carries no meaning.
KEYED = {"env": "name", "volumes": "name", "volumeMounts": "mountPath"}


def template(*values: str) -> dict[tuple[str, str], dict]:
    args = [arg for value in values for arg in ("--set", value)]
    out = helm("template", "cni-redirect", str(CHART), "--namespace", "cni-redirect", *args).stdout
    return _objects(out)


def kustomize(directory: Path) -> dict[tuple[str, str], dict]:
    out = subprocess.run([str(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True, check=True)
    return {key: doc for key, doc in _objects(out.stdout).items() if key[0] != "Namespace"}  # helm: --create-namespace


def _objects(text: str) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): normal(d) for d in yaml.safe_load_all(text) if d}


def normal(value, key: str = ""):
    """Helm's labels dropped, keyed lists sorted by their key, the entry's JSON parsed."""
    if isinstance(value, dict):
        out = {k: normal(v, k) for k, v in value.items()}
        if key == "labels":
            out = {k: v for k, v in out.items() if k not in HELM_LABELS}
        if key == "annotations":
            out.pop("checksum/entry", None)  # the chart's: a new entry rolls the agents
        if key == "data" and "entry.json" in out:
            out["entry.json"] = yaml.safe_load(out["entry.json"])
        return out
    if isinstance(value, list):
        items = [normal(v) for v in value]
        return sorted(items, key=lambda item: item[KEYED[key]]) if key in KEYED else items
    return value


def with_component(tmp_path: Path, base: str, *components: str) -> Path:
    """A kustomization beside a copy of install/kubernetes: base plus components (as docs/install.md writes one)."""
    shutil.copytree(K8S, tmp_path / "install" / "kubernetes", dirs_exist_ok=True)
    mine = tmp_path / "mine"
    mine.mkdir(exist_ok=True)
    listed = "".join(f"  - ../install/kubernetes/components/{c}\n" for c in components)
    (mine / "kustomization.yaml").write_text(f"resources:\n  - ../install/kubernetes/{base}\ncomponents:\n{listed}")
    return mine


def test_helm_lint_passes_strictly():
    run = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in run.stdout


@pytest.mark.parametrize("platform", ["", "gke", "k3s", "microk8s", "openshift", "crio"])
def test_each_platform_renders_what_its_kustomize_overlay_renders(platform):
    chart = template(f"platform={platform}")
    overlay = kustomize(K8S / "overlays" / platform if platform else K8S)
    assert chart == overlay


def test_minimal_renders_what_the_minimal_overlay_renders():
    assert template("minimal=true") == kustomize(K8S / "overlays" / "minimal")


def test_the_node_taint_guard_renders_what_its_component_adds(tmp_path):
    assert template("nodeTaint.enabled=true") == kustomize(with_component(tmp_path, "base", "node-taint"))


def test_uninstall_renders_the_uninstall_daemonset_and_no_agent():
    chart = template("uninstall=true")
    uninstall = kustomize(K8S / "uninstall")
    assert chart.pop(("DaemonSet", "cni-redirect-uninstall")) == uninstall[("DaemonSet", "cni-redirect-uninstall")]
    assert set(chart) == {("ConfigMap", "cni-redirect-entry"), ("ServiceAccount", "cni-redirect")}


def test_the_podmonitor_is_the_monitoring_example():
    chart = template("monitoring.podMonitor=true")
    (example,) = yaml.safe_load_all((K8S / "monitoring" / "podmonitor.yaml").read_text())
    assert chart[("PodMonitor", "cni-redirect-node")] == normal(example)


def test_values_override_single_paths_and_settings():
    chart = template(
        "cni.binDir=/srv/cni/bin", "cni.confFile=10-calico.conflist", "chainMode=edit", "image.tag=0.2.0",
        "entry.profile=istio", "priorityClassName=", "kubernetesApi.host=10.0.0.5", "kubernetesApi.port=6443",
    )  # fmt: skip
    daemonset = chart[("DaemonSet", "cni-redirect-node")]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in daemonset["volumes"]}
    assert volumes["cni-bin"]["hostPath"] == {"path": "/srv/cni/bin", "type": "Directory"}
    assert volumes["cni-conf"]["hostPath"]["path"] == "/etc/cni/net.d"
    (container,) = daemonset["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (env["CONF_FILE"], env["CHAIN_MODE"]) == ("10-calico.conflist", "edit")
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("10.0.0.5", "6443")
    assert container["image"] == "cni-redirect:0.2.0" and "priorityClassName" not in daemonset
    assert chart[("ConfigMap", "cni-redirect-entry")]["data"]["entry.json"]["profile"] == "istio"


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("platform=gkee", "at '/platform': value must be one of"),
        ("entry.log_level=loud", "at '/entry/log_level': value must be one of"),
        ("entry.defaults.proxyuid=1337", "at '/entry/defaults': additional properties 'proxyuid' not allowed"),
        ("entry.annotation_policy=closed", "at '/entry/annotation_policy'"),
        ("entry.exclude_namespace[0]=x", "at '/entry': additional properties 'exclude_namespace' not allowed"),
        ("entry.max_set_elements=0", "at '/entry/max_set_elements'"),
        ("repair.mode=sometimes", "at '/repair/mode'"),
        ("chainMode=inline", "at '/chainMode'"),
        ("updateStrategy.maxSurge=0", "at '/updateStrategy/maxSurge'"),
        ("cni.binDir=opt/cni/bin", "at '/cni/binDir'"),
        ("readinessPort=70000", "at '/readinessPort'"),
        ("minimal=yes", "at '/minimal'"),
        ("imagee.tag=1", "additional properties 'imagee' not allowed"),
    ],
)
def test_the_schema_refuses_a_bad_value_naming_it(value, named):
    run = helm("template", "cni-redirect", str(CHART), "--set", value, check=False)
    assert run.returncode != 0
    assert named in run.stderr, run.stderr


def test_a_new_entry_rolls_the_agents_and_nothing_else_does():
    """The agent reads its entry when it starts: the pod template carries the entry's checksum, so `helm upgrade`
    with new settings rolls the agents; the same settings leave the template as it was."""
    template_of = lambda *values: _raw_template(*values)["spec"]["template"]["metadata"]["annotations"]  # noqa: E731
    first, same, other = template_of(), template_of("minimal=false"), template_of("entry.log_level=info")
    assert first["checksum/entry"] == same["checksum/entry"] != other["checksum/entry"]


def _raw_template(*values: str) -> dict:
    args = [arg for value in values for arg in ("--set", value)]
    out = helm("template", "cni-redirect", str(CHART), "--namespace", "cni-redirect", *args).stdout
    (daemonset,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "DaemonSet"]
    return daemonset


# --- the schema accepts what the agent accepts (#36 item 2) ---

#: Values per grammar, good and bad: each goes through `helm template` (the schema) and the agent's own check.
SAMPLES: dict[str, list[object]] = {
    "bool": ["true", "FALSE", " true ", "yes", "1", "", "maybe", True, False, 1],
    "port": ["80", "0", "65535", "65536", "0080", "0000000080", "00000000080", " 443 ", "-1", "8o", 80, 0, 70000, True],
    "uid": ["1337", "0", "4294967294", "4294967295", "true", "", " 7 ", "1e3", 1337, 0, True],
    "optional-gid": ["", "1337", "0", "x", " ", 1337, 0],
    "uid-list": ["", "1,2", "1,,2", "0", "1, 0", "4294967295", "2102, 2103", 5, 0, "*"],
    "port-list": ["", "80,443", "80-90", "80-", "*", "80 - 90", "65536", "1-65535", 22, ",80"],
    "port-selection": ["*", " * ", "*,80", "80,443", "", "80-90", 443, "x"],
    "network-list": [
        "10.0.0.0/8",
        "::1/128",
        "10.0.0.1/255.0.0.0",
        "10.0.0.1/0.0.0.255",
        "10.0.0.1/255.0.255.0",
        "010.0.0.1",
        "fe80::1%eth0",
        "1.2.3.4/33",
        "1.2.3.4/032",
        "*",
        "",
        "10.0.0.0/8, ::/0",
        "::ffff:1.2.3.4",
        "1:2:3:4:5:6:7:8:9",
        "2001:db8::/129",
        5,
    ],
    "network-selection": ["*", "10.0.0.0/8", "*,10.0.0.0/8", "", "fd00::/8,10.1.0.0/16"],
    "interface-list": ["eth0", "eth0,net1", ".eth", "a" * 16, "tap+1", "", "*", True, 123, "eth0,,net1"],
    "inbound-mode": ["redirect", "TPROXY", " tproxy ", "nat", "", True],
    "proxy-mark": ["", "0x539", "0x539/0xfff", " 1337 / 4095 ", "1337", 1337, "0x1ffffffff", "mark", "0x539/", True],
    "tcp-buffers": ["", "4096 8388608 33554432", "1 2", "a b c", "4096\t87380 6291456", "1 2 3 4", 4096, True],
}


def _kinds() -> dict[str, str]:
    from cni_redirect.spec import CaptureSpec

    return {str(info.alias): next(m.func.kind for m in info.metadata if hasattr(m, "func"))
            for info in CaptureSpec.model_fields.values()}  # fmt: skip


def _agent_accepts(entry: dict) -> bool:
    from cni_redirect.errors import SettingsError
    from cni_redirect.node.chaining.chain import check_entry

    try:
        check_entry(entry, "entry")
    except SettingsError:
        return False
    return True


def _helm_accepts(entry: dict) -> tuple[bool, str]:
    import json

    run = helm("template", "cni-redirect", str(CHART), "--set-json", f"entry={json.dumps(entry)}", check=False)
    return run.returncode == 0, run.stderr


def _corpus() -> list[dict]:
    corpus: list[dict] = []
    for key, kind in _kinds().items():
        corpus += [{"defaults": {key: value}} for value in SAMPLES[kind]]
    for uid in ("0", 0, "1, 0", "00"):  # root's consent: only with allow_root_proxy_uid
        for key in ("proxy-uid", "proxy-gid", "exclude-uids"):
            corpus += [{"defaults": {key: uid}}, {"defaults": {key: uid}, "allow_root_proxy_uid": True}]
    corpus += [{"exclude_namespaces": names} for names in ([""], ["kube-system", ""], ["a"], [])]
    return corpus


def test_the_schema_and_the_agent_give_equal_verdicts_on_a_corpus():
    """On main the schema let `proxy-uid: "true"`, `"0"` and `exclude_namespaces: [""]` through, which the agent
    refuses. Now the catalogue's constraints are generated from the value grammar itself (valueschema.py)."""
    from concurrent.futures import ThreadPoolExecutor

    corpus = _corpus()
    with ThreadPoolExecutor(4) as pool:
        helm_verdicts = list(pool.map(_helm_accepts, corpus))
    differ = []
    for entry, (by_helm, stderr) in zip(corpus, helm_verdicts, strict=True):
        by_agent = _agent_accepts(entry)
        if by_helm != by_agent:
            differ.append(f"{entry}: helm {'accepts' if by_helm else 'refuses'}, the agent "
                          f"{'accepts' if by_agent else 'refuses'} {stderr.strip()[-200:]}")  # fmt: skip
    print(
        f"\n[schema] {len(corpus)} entries, {sum(v for v, _ in helm_verdicts)} accepted by both, {len(differ)} differ"
    )
    assert not differ, differ[:10]


def test_what_a_pattern_cannot_say_the_agent_refuses_at_start():
    """The gaps the schema says it has (valueschema's docstring): an empty port range, a list longer than
    max_set_elements after merging, TCP buffer sizes out of order, a proxy mark of 0 or outside its mask. Helm
    lets them through; the agent refuses the entry, naming the field."""
    long_list = ",".join(str(uid) for uid in range(1, 40))
    for entry in ({"defaults": {"exclude-inbound-ports": "90-80"}},
                  {"defaults": {"exclude-uids": long_list}, "max_set_elements": 8},
                  {"defaults": {"tcp-rmem": "8 4 2"}}, {"defaults": {"proxy-mark": "0x1539/0xfff"}},
                  {"defaults": {"proxy-mark": "0"}}):  # fmt: skip
        assert _helm_accepts(entry)[0] and not _agent_accepts(entry), entry


# --- every free string the chart renders is quoted (#36 item 2) ---

PAYLOAD = "x\nhostPID: true\nhostIPC: true"


def _string_leaves(schema: dict, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every value path whose schema admits a string (the entry's catalogue has its own test above)."""
    if path == ("entry", "defaults"):
        return []
    if "properties" in schema:
        return [leaf for key, sub in schema["properties"].items() for leaf in _string_leaves(sub, (*path, key))]
    types = schema.get("type", [])
    return [path] if "string" in (types if isinstance(types, list) else [types]) else []


def _walk(value) -> list[str]:
    if isinstance(value, dict):
        return [k for k in value] + [k for v in value.values() for k in _walk(v)]
    if isinstance(value, list):
        return [k for v in value for k in _walk(v)]
    return []


@pytest.mark.parametrize("uninstall", [False, True], ids=["agent", "uninstall"])
def test_a_value_with_newlines_never_adds_a_field(uninstall):
    """On main `priorityClassName` rendered bare: a value with newlines added hostPID/hostIPC to the agent's pod.
    Every string value of the schema, set to such a payload, is refused by the schema or rendered as one string."""
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    leaves = _string_leaves(schema)
    assert ("priorityClassName",) in leaves and ("kubernetesApi", "host") in leaves
    rendered = refused = 0
    for leaf in leaves:
        args = ["--set-json", f"{'.'.join(leaf)}={json.dumps(PAYLOAD)}", "--set", f"uninstall={str(uninstall).lower()}"]
        if leaf[:1] == ("kubernetesApi",) or leaf == ("nodeTaint", "key"):
            args += ["--set", "nodeTaint.enabled=true"]
        run = helm("template", "cni-redirect", str(CHART), "--namespace", "cni-redirect", *args, check=False)
        if run.returncode != 0:
            assert "at '/" in run.stderr, (leaf, run.stderr)  # the schema refused it, naming it
            refused += 1
            continue
        documents = [d for d in yaml.safe_load_all(run.stdout) if d]
        keys = [k for d in documents for k in _walk(d)]
        assert "hostPID" not in keys and "hostIPC" not in keys, leaf
        rendered += 1
    print(
        f"\n[quoting] {len(leaves)} string values: {rendered} rendered as one string, {refused} refused by the schema"
    )
