package main

// Run by tests/test_compiled_front.py, which writes the corpus from the Python front's own answers:
// the two fronts must find the same agent_socket in every config, and trust the same paths.

import (
	"encoding/json"
	"os"
	"testing"
)

type corpus struct {
	Configs []struct {
		Config   []byte `json:"config"` // base64: a config need not be UTF-8
		Expected string `json:"expected"`
		Valid    bool   `json:"valid"` // json.loads reads it as an object
	} `json:"configs"`
	Paths []struct {
		Path    string `json:"path"`
		Trusted bool   `json:"trusted"`
	} `json:"paths"`
}

func readCorpus(t *testing.T) corpus {
	path := os.Getenv("CNIR_FRONT_CORPUS")
	if path == "" {
		t.Fatal("CNIR_FRONT_CORPUS must name the corpus that tests/test_compiled_front.py writes")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var c corpus
	if err := json.Unmarshal(data, &c); err != nil {
		t.Fatal(err)
	}
	if len(c.Configs) == 0 || len(c.Paths) == 0 {
		t.Fatal("an empty corpus would prove nothing")
	}
	return c
}

func TestAgentSocketIsWhatThePythonFrontFinds(t *testing.T) {
	for i, c := range readCorpus(t).Configs {
		got := agentSocket(c.Config)
		// On a valid (RFC 8259) document the two agree exactly. On one json.loads refuses, the compiled front may
		// decline where the Python scanner (which does not validate) finds a path: the Python front then
		// forwards it itself. It must never forward what the Python front would not.
		if got != c.Expected && (c.Valid || got != "") {
			t.Errorf("config %d %q: compiled front %q, Python front %q", i, c.Config, got, c.Expected)
		}
	}
}

func TestTrustedSocketPathIsThePythonRule(t *testing.T) {
	for _, p := range readCorpus(t).Paths {
		if got := trustedSocketPath(p.Path); got != p.Trusted {
			t.Errorf("path %q: compiled front %v, Python front %v", p.Path, got, p.Trusted)
		}
	}
}
