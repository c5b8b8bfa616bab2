//! Integration tests: the real `blockvault` binary against real images made with
//! qemu-img and qemu-io, compared with `qemu-img compare`.

mod common;

mod api_security;
mod appliance;
mod backup;
mod bitmaps;
mod catalog_full;
mod cli;
mod console;
mod drill;
mod drill_service;
mod encryption;
mod export;
mod files;
mod garage;
mod hostile;
mod incremental;
mod integrity;
mod libvirt;
mod limits;
mod live;
mod live_names;
mod live_settings;
mod locks;
mod maintenance;
mod mirror;
mod nbd;
mod nbd_server;
mod nbd_tls;
mod qemu_formats;
mod qsd;
mod quickstart;
mod remote;
mod replicate;
mod restore;
mod server;
mod service;
mod service_load;
mod sources;
mod tls;
mod vault;
mod vm;
mod vsphere_cbt;
