// Command cnir-loader-containerd loads a CNI conf dir the way containerd 2.4 does: containerd's own CNI
// library (go-cni, at the version containerd v2.4.2 pins, over libcni v1.3.1 with drop-in support), with the
// options containerd's CRI plugin passes (the loopback network, then the default config; one network).
// It prints what containerd would run for a pod and can run ADD and DEL of that chain on a netns.
package main

import (
	"context"
	"encoding/json"
	"os"

	"cni-redirect.local/loaders/report"
	gocni "github.com/containerd/go-cni"
	"github.com/containernetworking/cni/libcni"
)

const loader = "containerd: go-cni v1.1.14, libcni v1.3.1"

// podAnnotations is the capability containerd passes the pod's annotations under.
const podAnnotations = "io.kubernetes.cri.pod-annotations"

func newCNI(a report.Args) gocni.CNI {
	if a.CacheDir != "" {
		// containerd keeps libcni's default cache (/var/lib/cni); a test keeps its own.
		libcni.CacheDir = a.CacheDir
	}
	// containerd's criService.initPlatform: two networks attached (loopback + the pod's), one config loaded.
	cni, err := gocni.New(
		gocni.WithMinNetworkCount(2),
		gocni.WithPluginConfDir(a.ConfDir),
		gocni.WithPluginMaxConfNum(1),
		gocni.WithPluginDir(a.BinDirs),
	)
	if err != nil {
		report.Fail("go-cni: %v", err)
	}
	return cni
}

func load(a report.Args) (gocni.CNI, report.Load) {
	cni := newCNI(a)
	out := report.Load{Loader: loader, Start: report.Now(), Networks: []string{}, Plugins: []report.Plugin{}}
	// containerd's cniLoadOptions on Linux, as its config syncer calls Load on every event.
	err := cni.Load(gocni.WithLoNetwork, gocni.WithDefaultConf)
	out.End = report.Now()
	if err != nil {
		out.Error = err.Error()
		return cni, out
	}
	networks := cni.GetConfig().Networks
	for _, n := range networks {
		out.Networks = append(out.Networks, n.Config.Name)
	}
	if len(networks) < 2 { // [0] is the loopback network
		out.Error = "no pod network loaded"
		return cni, out
	}
	pod := networks[1].Config
	out.OK, out.Network, out.CNIVersion = true, pod.Name, pod.CNIVersion
	types, sources := make([]string, 0, len(pod.Plugins)), make([][]byte, 0, len(pod.Plugins))
	for _, p := range pod.Plugins {
		types = append(types, p.Network.Type)
		sources = append(sources, []byte(p.Source))
	}
	out.Plugins = report.PluginsOf(types, sources)
	return cni, out
}

func main() {
	a := report.Parse()
	ctx := context.Background()
	switch a.Command {
	case "load":
		_, out := load(a)
		report.Print(out)
	case "sample":
		report.Sample(a, func() report.Load { _, out := load(a); return out })
	case "add":
		cni, out := load(a)
		if !out.OK {
			report.Fail("containerd would start no pod: %s", out.Error)
		}
		result, err := cni.Setup(ctx, a.ID, a.NetNS,
			gocni.WithCapability(podAnnotations, a.Annotations),
			gocni.WithLabels(map[string]string{
				"K8S_POD_NAMESPACE": a.PodNS, "K8S_POD_NAME": a.PodName, "K8S_POD_INFRA_CONTAINER_ID": a.ID,
				"IgnoreUnknown": "1",
			}))
		if err != nil {
			report.Fail("ADD: %v", err)
		}
		data, _ := json.Marshal(result)
		os.Stdout.Write(append(data, '\n'))
	case "check":
		// containerd's CRI plugin never runs CNI CHECK (no call of go-cni's Check in v2.4.2's internal/cri).
		report.Fail("containerd runs no CNI CHECK")
	case "del":
		cni, out := load(a)
		if !out.OK {
			report.Fail("containerd would run no DEL: %s", out.Error)
		}
		// containerd tears down with the config loaded now (not a cached one), as teardownPodNetwork does.
		if err := cni.Remove(ctx, a.ID, a.NetNS,
			gocni.WithCapability(podAnnotations, a.Annotations),
			gocni.WithLabels(map[string]string{
				"K8S_POD_NAMESPACE": a.PodNS, "K8S_POD_NAME": a.PodName, "K8S_POD_INFRA_CONTAINER_ID": a.ID,
				"IgnoreUnknown": "1",
			})); err != nil {
			report.Fail("DEL: %v", err)
		}
		report.Print(map[string]bool{"deleted": true})
	}
}
