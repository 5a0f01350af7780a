module cni-redirect/front

go 1.19
