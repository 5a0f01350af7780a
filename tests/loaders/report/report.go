// Package report is what both loader harnesses print: the network a runtime's CNI loader picked for a conf
// dir and its plugin chain, as JSON, one object per line. The loaders themselves differ (containerd's go-cni,
// CRI-O's ocicni); this package only parses the command line and writes what they found.
package report

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"
)

// Plugin is one plugin of the chain, in the order the runtime runs it at ADD.
type Plugin struct {
	Type   string          `json:"type"`
	Config json.RawMessage `json:"config"` // its bytes as the loader holds them (inlined, or a drop-in file's)
}

// Load is one load of a conf dir.
type Load struct {
	Loader     string   `json:"loader"`            // which loader, at which module versions
	OK         bool     `json:"ok"`                // the loader has a default network
	Error      string   `json:"error,omitempty"`   // why not (containerd: the whole load failed)
	Network    string   `json:"network"`           // the default network's name
	CNIVersion string   `json:"cniVersion"`        // the list's cniVersion as the loader read it
	Plugins    []Plugin `json:"plugins"`           // the default network's chain
	Networks   []string `json:"networks"`          // every network the loader kept (ocicni drops invalid ones)
	Dropped    []string `json:"dropped,omitempty"` // ocicni: files it skipped, with why
	Start      float64  `json:"start"`             // wall clock (s) when the load began
	End        float64  `json:"end"`               // and ended: a sample covers [start, end]
}

// Now is the wall clock in seconds, as Python's time.time().
func Now() float64 { return float64(time.Now().UnixNano()) / 1e9 }

// PluginsOf turns a list's plugin bytes into the report's form.
func PluginsOf(types []string, sources [][]byte) []Plugin {
	plugins := make([]Plugin, 0, len(types))
	for i, t := range types {
		raw := json.RawMessage(sources[i])
		if !json.Valid(raw) {
			raw, _ = json.Marshal(string(sources[i]))
		}
		plugins = append(plugins, Plugin{Type: t, Config: raw})
	}
	return plugins
}

// Print writes one JSON object on its own line.
func Print(v any) {
	data, err := json.Marshal(v)
	if err != nil {
		Fail("cannot encode the report: %v", err)
	}
	os.Stdout.Write(append(data, '\n'))
}

// Fail ends the harness with one line on stderr and exit code 2.
func Fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "loader: "+format+"\n", args...)
	os.Exit(2)
}

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

// Args are the command line both harnesses take.
type Args struct {
	Command     string
	ConfDir     string
	BinDirs     []string
	CacheDir    string
	NetNS       string
	ID          string
	PodName     string
	PodNS       string
	Annotations map[string]string
	Interval    time.Duration
	Count       int
}

// Usage is the harness's help text.
const Usage = `usage: loader COMMAND --conf-dir DIR --bin-dir DIR [--bin-dir DIR...] [options]
  load     print the network the loader picks for DIR and its plugin chain (one JSON line)
  sample   load again every --interval until --count loads or stdin closes, a JSON line each
  add      run ADD of the picked chain on --netns for sandbox --id (annotations: --annotation k=v)
  check    run CHECK of the chain for sandbox --id (CRI-O: its pod network status, from the cached config;
           containerd runs none)
  del      run DEL for sandbox --id (CRI-O: from the config cached at ADD, as it does)
options: --cache-dir DIR (libcni's cache), --pod NAME, --namespace NS`

// Parse reads the command line.
func Parse() Args {
	if len(os.Args) < 2 || strings.HasPrefix(os.Args[1], "-") {
		Fail("%s", Usage)
	}
	a := Args{Command: os.Args[1], Annotations: map[string]string{}}
	fs := flag.NewFlagSet(a.Command, flag.ContinueOnError)
	var bins, annotations multi
	fs.StringVar(&a.ConfDir, "conf-dir", "", "")
	fs.Var(&bins, "bin-dir", "")
	fs.StringVar(&a.CacheDir, "cache-dir", "", "")
	fs.StringVar(&a.NetNS, "netns", "", "")
	fs.StringVar(&a.ID, "id", "", "")
	fs.StringVar(&a.PodName, "pod", "pod", "")
	fs.StringVar(&a.PodNS, "namespace", "default", "")
	fs.Var(&annotations, "annotation", "")
	fs.DurationVar(&a.Interval, "interval", 5*time.Millisecond, "")
	fs.IntVar(&a.Count, "count", 0, "")
	if err := fs.Parse(os.Args[2:]); err != nil {
		Fail("%v\n%s", err, Usage)
	}
	a.BinDirs = bins
	if a.ConfDir == "" || len(a.BinDirs) == 0 {
		Fail("--conf-dir and --bin-dir are required\n%s", Usage)
	}
	for _, kv := range annotations {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			Fail("--annotation %q: want key=value", kv)
		}
		a.Annotations[k] = v
	}
	switch a.Command {
	case "load", "sample":
	case "add", "check", "del":
		if a.NetNS == "" && a.Command != "del" || a.ID == "" {
			Fail("%s needs --netns and --id", a.Command)
		}
	default:
		Fail("unknown command %q\n%s", a.Command, Usage)
	}
	return a
}

// Sample calls load every interval, printing each, until count loads or stdin is closed.
func Sample(a Args, load func() Load) {
	closed := make(chan struct{})
	go func() {
		buf := make([]byte, 64)
		for {
			if _, err := os.Stdin.Read(buf); err != nil {
				close(closed)
				return
			}
		}
	}()
	for n := 0; a.Count == 0 || n < a.Count; n++ {
		Print(load())
		select {
		case <-closed:
			return
		case <-time.After(a.Interval):
		}
	}
}
