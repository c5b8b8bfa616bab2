//! Integration tests: the real `blockvault` binary against real images made with
//! qemu-img and qemu-io, compared with `qemu-img compare`.

mod common;

mod appliance;
mod backup;
mod export;
mod incremental;
mod integrity;
mod nbd;
mod nbd_server;
mod qsd;
mod quickstart;
mod remote;
mod server;
mod service;
mod sources;
mod vault;
