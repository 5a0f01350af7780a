package main

const sysMemfdCreate = 279 // memfd_create(2) on arm64: the syscall package predates it
