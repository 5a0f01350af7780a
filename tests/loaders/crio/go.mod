module cni-redirect.local/loaders/crio

go 1.26.0

require (
	cni-redirect.local/loaders/report v0.0.0
	github.com/containernetworking/cni v1.3.0
	github.com/cri-o/ocicni v0.4.3
	github.com/sirupsen/logrus v1.9.3
)

require (
	github.com/containernetworking/plugins v1.4.1 // indirect
	github.com/fsnotify/fsnotify v1.7.0 // indirect
	github.com/vishvananda/netlink v1.2.1-beta.2 // indirect
	github.com/vishvananda/netns v0.0.4 // indirect
	golang.org/x/sys v0.23.0 // indirect
)

replace cni-redirect.local/loaders/report => ../report
