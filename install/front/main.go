// The compiled front of the plugin bundle: what the runtime executes as `cni-redirect` on every pod start.
//
// A frozen Python front pays ~25 ms of interpreter start (and its CPU) before ~4 ms of work in the
// CNI server; in a burst of pod starts on a small node, that start is most of what capture adds
// (docs/benchmarks.md, pod start). This front does the one thing that must be fast, in a ~2 ms static
// binary, and hands everything else to the Python front beside it (cni-redirect-py) by exec, with the
// same argv, environment and stdin bytes:
//
//   - VERSION: answered here, from the same constants as cni_redirect/front.py;
//   - ADD, CHECK, DEL, STATUS, GC whose config names a trusted `agent_socket`: forwarded to the CNI
//     server over the wire protocol of cni_redirect/wire.py, with the pod netns as an fd, exactly as
//     the Python front forwards them; the reply's exit code, stdout and stderr are ours;
//   - everything else (no agent_socket, a netns the in-process path must report, the command line,
//     the probes): the Python front, which decides again the same way. When the forward was tried and
//     the server did not answer, CNIR_FORWARD_FAILED carries why, so the Python front works in-process
//     with the same one warning line instead of waiting for the server a second time.
//
// Standard library only; built with CGO_ENABLED=0 by install/build-bundle.sh, so it needs nothing from
// the node. tests/test_compiled_front.py holds it to the Python front's answers.
package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

const (
	versions    = `{"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}`
	magic       = "CNIR1"
	timeout     = 5 * time.Second // wire.TIMEOUT: per operation, as the Python socket's timeout
	pythonFront = "cni-redirect-py"
	failedEnv   = "CNIR_FORWARD_FAILED"
)

var socketDirs = []string{"/run/cni-redirect/", "/var/run/cni-redirect/"}

func main() {
	command, isCNI := os.LookupEnv("CNI_COMMAND")
	if !isCNI {
		execPython(nil, "")
	}
	if command == "VERSION" {
		writeAll(os.Stdout, []byte(versions))
		os.Exit(0)
	}
	stdin, err := io.ReadAll(os.Stdin)
	if err != nil {
		execPython(nil, "") // stdin unread or partly read: the Python front cannot be given it whole
	}
	if forwarded(command) {
		if path := agentSocket(stdin); path != "" {
			reply, err := forward(path, command, stdin)
			if err == nil {
				writeAll(os.Stdout, reply.stdout)
				writeAll(os.Stderr, reply.stderr)
				os.Exit(int(reply.code))
			}
			var wireErr *wireError
			if errors.As(err, &wireErr) {
				execPython(stdin, wireErr.msg)
			}
			execPython(stdin, "") // not forwarded: the in-process path gives the precise error
		}
	}
	execPython(stdin, "")
}

func forwarded(command string) bool {
	switch command {
	case "ADD", "CHECK", "DEL", "STATUS", "GC":
		return true
	}
	return false
}

func withNetns(command string) bool {
	return command == "ADD" || command == "CHECK" || command == "DEL"
}

// agentSocket is wire.config_agent_socket: the config object's own top-level "agent_socket" (the last
// one, as json.loads keeps), when it is a string and a trusted path; "" otherwise.
func agentSocket(config []byte) string {
	var top map[string]json.RawMessage
	if json.Unmarshal(config, &top) != nil {
		return ""
	}
	raw, ok := top["agent_socket"]
	if !ok {
		return ""
	}
	var path string
	if json.Unmarshal(raw, &path) != nil {
		return ""
	}
	if !trustedSocketPath(path) {
		return ""
	}
	return path
}

// trustedSocketPath is wire.trusted_socket_path: a plain absolute `.sock` path inside root's socket dir.
func trustedSocketPath(path string) bool {
	inside := false
	for _, dir := range socketDirs {
		inside = inside || strings.HasPrefix(path, dir)
	}
	if !inside || !strings.HasSuffix(path, ".sock") || strings.Contains(path, "/../") || strings.Contains(path, "/./") {
		return false
	}
	for _, char := range path {
		if char < 33 || char > 126 || char == '\\' || char == '"' || char == '\'' {
			return false
		}
	}
	return true
}

type reply struct {
	code   byte
	stdout []byte
	stderr []byte
}

// wireError: the server was asked and did not answer; the Python front then works in-process.
type wireError struct{ msg string }

func (e *wireError) Error() string { return e.msg }

// errNotForwarded: the request is better done in-process (its netns cannot be opened for a reason the
// in-process path must report).
var errNotForwarded = errors.New("not forwarded")

func forward(path, command string, stdin []byte) (*reply, error) {
	netns := os.Getenv("CNI_NETNS")
	netnsFd := -1
	if netns != "" && withNetns(command) {
		fd, err := syscall.Open(netns, syscall.O_RDONLY|syscall.O_CLOEXEC|syscall.O_NONBLOCK, 0) // a FIFO must not block
		switch {
		case err == nil:
			netnsFd = fd
			defer syscall.Close(fd)
		case err == syscall.ENOENT && command == "DEL":
			// DEL of a netns that is gone: the server answers "nothing to do", as in-process DEL does
		default:
			return nil, errNotForwarded
		}
	}
	if netnsFd < 0 && (command == "ADD" || command == "CHECK") {
		return nil, errNotForwarded // no netns to hand over: the in-process path names what is wrong
	}
	return exchange(path, stdin, netnsFd)
}

// exchange is wire.exchange: one request on one connection to a root server, the reply read to EOF.
func exchange(path string, stdin []byte, netnsFd int) (*reply, error) {
	conn, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		return nil, &wireError{osMessage(err)}
	}
	unix := conn.(*net.UnixConn)
	defer unix.Close()
	if uid, err := peerUID(unix); err != nil {
		return nil, &wireError{osMessage(err)}
	} else if uid != 0 {
		return nil, &wireError{fmt.Sprintf("the socket is served by uid %d, not root", uid)}
	}
	var envBlock []byte
	for _, item := range os.Environ() {
		if strings.HasPrefix(item, "CNI_") {
			envBlock = append(append(envBlock, item...), 0)
		}
	}
	header := make([]byte, 0, len(magic)+16)
	header = append(header, magic...)
	header = binary.BigEndian.AppendUint64(header, uint64(len(envBlock)))
	header = binary.BigEndian.AppendUint64(header, uint64(len(stdin)))
	var rights []byte
	if netnsFd >= 0 {
		rights = syscall.UnixRights(netnsFd)
	}
	_ = unix.SetDeadline(time.Now().Add(timeout))
	if _, _, err := unix.WriteMsgUnix(header, rights, nil); err != nil {
		return nil, &wireError{osMessage(err)}
	}
	for _, part := range [][]byte{envBlock, stdin} {
		_ = unix.SetDeadline(time.Now().Add(timeout))
		if _, err := unix.Write(part); err != nil {
			return nil, &wireError{osMessage(err)}
		}
	}
	if err := unix.CloseWrite(); err != nil {
		return nil, &wireError{osMessage(err)}
	}
	var data []byte
	chunk := make([]byte, 65536)
	for {
		_ = unix.SetDeadline(time.Now().Add(timeout))
		n, err := unix.Read(chunk)
		data = append(data, chunk[:n]...)
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, &wireError{osMessage(err)}
		}
	}
	if len(data) < 9 {
		return nil, &wireError{"the CNI server closed the connection without a reply"}
	}
	length := binary.BigEndian.Uint64(data[1:9])
	if length > uint64(len(data)-9) {
		length = uint64(len(data) - 9)
	}
	return &reply{code: data[0], stdout: data[9 : 9+length], stderr: data[9+length:]}, nil
}

func peerUID(conn *net.UnixConn) (uint32, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *syscall.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, credErr
	}
	return cred.Uid, nil
}

// osMessage words an error as Python's OSError does ("[Errno 111] Connection refused", "timed out"),
// so the fallback warning reads the same whichever front wrote it.
func osMessage(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		text := errno.Error()
		return fmt.Sprintf("[Errno %d] %s", int(errno), strings.ToUpper(text[:1])+text[1:])
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return "timed out"
	}
	return err.Error()
}

// execPython replaces this process with the Python front beside it: the same argv and environment, and
// stdin as read (a memfd holding those bytes), or untouched when stdin is nil. It never returns.
func execPython(stdin []byte, failure string) {
	self, err := os.Executable()
	if err != nil {
		die(fmt.Sprintf("cannot find its own executable: %v", err))
	}
	target := filepath.Join(filepath.Dir(self), pythonFront)
	if stdin != nil {
		fd, err := memfdWith(stdin)
		if err != nil {
			die(fmt.Sprintf("cannot hand stdin to %s: %v", target, err))
		}
		if fd != 0 {
			if err := syscall.Dup3(fd, 0, 0); err != nil {
				die(fmt.Sprintf("cannot hand stdin to %s: %v", target, err))
			}
			syscall.Close(fd)
		}
	}
	env := os.Environ()
	kept := env[:0]
	for _, item := range env {
		if !strings.HasPrefix(item, failedEnv+"=") {
			kept = append(kept, item)
		}
	}
	if failure != "" {
		kept = append(kept, failedEnv+"="+failure)
	}
	err = syscall.Exec(target, os.Args, kept)
	die(fmt.Sprintf("cannot run %s: %v (the bundle is incomplete: reinstall it)", target, err))
}

func memfdWith(data []byte) (int, error) {
	name := []byte("cni-redirect-stdin\x00")
	fd, _, errno := syscall.Syscall(sysMemfdCreate, uintptr(unsafe.Pointer(&name[0])), 0, 0)
	if errno != 0 {
		return -1, errno
	}
	file := os.NewFile(fd, "stdin")
	if _, err := file.Write(data); err != nil {
		file.Close()
		return -1, err
	}
	if _, err := file.Seek(0, io.SeekStart); err != nil {
		file.Close()
		return -1, err
	}
	dup, err := syscall.Dup(int(file.Fd()))
	file.Close()
	return dup, err
}

// die reports a bundle that cannot run its Python front: a CNI error object on stdout for a CNI call,
// one line on stderr for the command line.
func die(msg string) {
	if _, isCNI := os.LookupEnv("CNI_COMMAND"); isCNI {
		payload, _ := json.Marshal(map[string]interface{}{"cniVersion": "1.1.0", "code": 999, "msg": "cni-redirect: " + msg})
		writeAll(os.Stdout, payload)
	} else {
		fmt.Fprintln(os.Stderr, "cni-redirect: "+msg)
	}
	os.Exit(1)
}

func writeAll(file *os.File, data []byte) {
	for len(data) > 0 {
		n, err := file.Write(data)
		if err != nil {
			return
		}
		data = data[n:]
	}
}
