module cni-redirect.local/loaders/report

go 1.26.0
