// Command cnir-loader-crio loads a CNI conf dir the way CRI-O 1.34 does: CRI-O's CNI loader (ocicni v0.4.3,
// over libcni v1.3.0, the versions CRI-O v1.34.0 pins). ocicni runs VERSION on every plugin of every list
// and drops a network whose plugin is missing, failing or lacking the list's cniVersion; it picks the first
// network left as the default, and tears a pod down from the config libcni cached at ADD.
// It prints what CRI-O would run for a pod and can run ADD and DEL of that chain on a netns.
package main

import (
	"encoding/json"
	"io"
	"os"
	"reflect"
	"sort"
	"unsafe"

	"cni-redirect.local/loaders/report"
	"github.com/containernetworking/cni/libcni"
	"github.com/cri-o/ocicni/pkg/ocicni"
	"github.com/sirupsen/logrus"
)

const loader = "cri-o: ocicni v0.4.3, libcni v1.3.0"

func newPlugin(a report.Args) ocicni.CNIPlugin {
	// No inotify: each load is one syncNetworkConfig, the call CRI-O's watcher makes on every event.
	plugin, err := ocicni.InitCNINoInotify("", a.ConfDir, a.CacheDir, a.BinDirs...)
	if err != nil {
		report.Fail("ocicni: %v", err)
	}
	return plugin
}

// networks reads ocicni's own table of loaded networks. ocicni keeps it unexported; reading it (not parsing
// the conf dir again) keeps the verdict the loader's: which files it kept, after its VERSION checks.
func networks(plugin ocicni.CNIPlugin) map[string]*libcni.NetworkConfigList {
	field := reflect.ValueOf(plugin).Elem().FieldByName("networks")
	field = reflect.NewAt(field.Type(), unsafe.Pointer(field.UnsafeAddr())).Elem()
	found := map[string]*libcni.NetworkConfigList{}
	iter := field.MapRange()
	for iter.Next() {
		network := iter.Value().Elem()
		config := network.FieldByName("config")
		config = reflect.NewAt(config.Type(), unsafe.Pointer(config.UnsafeAddr())).Elem()
		found[iter.Key().String()] = config.Interface().(*libcni.NetworkConfigList)
	}
	return found
}

// dropped collects what ocicni says when it skips a file (its warnings and errors), for the report.
type dropped struct{ lines []string }

func (d *dropped) Levels() []logrus.Level {
	return []logrus.Level{logrus.ErrorLevel, logrus.WarnLevel}
}

func (d *dropped) Fire(entry *logrus.Entry) error {
	d.lines = append(d.lines, entry.Message)
	return nil
}

func load(a report.Args) (ocicni.CNIPlugin, report.Load) {
	out := report.Load{Loader: loader, Start: report.Now(), Networks: []string{}, Plugins: []report.Plugin{}}
	hook := &dropped{}
	logrus.StandardLogger().ReplaceHooks(logrus.LevelHooks{})
	logrus.AddHook(hook)
	plugin := newPlugin(a)
	out.End = report.Now()
	out.Dropped = hook.lines
	loaded := networks(plugin)
	for name := range loaded {
		out.Networks = append(out.Networks, name)
	}
	sort.Strings(out.Networks)
	name := plugin.GetDefaultNetworkName()
	list, ok := loaded[name]
	if name == "" || !ok {
		out.Error = "no default network: CRI-O would start no pod"
		return plugin, out
	}
	out.OK, out.Network, out.CNIVersion = true, name, list.CNIVersion
	types, sources := make([]string, 0, len(list.Plugins)), make([][]byte, 0, len(list.Plugins))
	for _, p := range list.Plugins {
		types = append(types, p.Network.Type)
		sources = append(sources, p.Bytes)
	}
	out.Plugins = report.PluginsOf(types, sources)
	return plugin, out
}

func pod(a report.Args) ocicni.PodNetwork {
	annotations := a.Annotations
	return ocicni.PodNetwork{
		Name: a.PodName, Namespace: a.PodNS, ID: a.ID, UID: a.ID, NetNS: a.NetNS,
		RuntimeConfig: map[string]ocicni.RuntimeConfig{"": {PodAnnotations: &annotations}},
	}
}

func main() {
	a := report.Parse()
	logrus.SetOutput(io.Discard) // what it says about skipped files is in the report's "dropped"
	switch a.Command {
	case "load":
		plugin, out := load(a)
		plugin.Shutdown()
		report.Print(out)
	case "sample":
		report.Sample(a, func() report.Load { plugin, out := load(a); plugin.Shutdown(); return out })
	case "add":
		plugin, out := load(a)
		if !out.OK {
			report.Fail("%s", out.Error)
		}
		network := pod(a)
		network.RuntimeConfig = map[string]ocicni.RuntimeConfig{out.Network: network.RuntimeConfig[""]}
		results, err := plugin.SetUpPod(network)
		if err != nil {
			report.Fail("ADD: %v", err)
		}
		data, _ := json.Marshal(results)
		os.Stdout.Write(append(data, '\n'))
	case "check":
		plugin, _ := load(a)
		// CRI-O's pod network status: CHECK of the chain from the config cached at ADD.
		if _, err := plugin.GetPodNetworkStatus(pod(a)); err != nil {
			report.Fail("CHECK: %v", err)
		}
		report.Print(map[string]bool{"checked": true})
	case "del":
		plugin, _ := load(a)
		// CRI-O's StopPodSandbox: the attachments and each network's config come from libcni's cache of ADD.
		if err := plugin.TearDownPod(pod(a)); err != nil {
			report.Fail("DEL: %v", err)
		}
		report.Print(map[string]bool{"deleted": true})
	}
}
