package main

const sysMemfdCreate = 319 // memfd_create(2) on x86-64: the syscall package predates it
