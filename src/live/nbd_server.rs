//! The NBD server a live backup reads through. QEMU runs at most one; without
//! `nbd_server` we start one on a private unix socket (`blockvault-nbd-<hex>.sock`) and
//! stop it afterwards. When QEMU already runs one (a qemu-storage-daemon started with
//! `--nbd-server`, a libvirt-managed VM), `nbd-server-start` fails and the user must name
//! the running server: the error says exactly what to pass, and when QEMU's own command
//! line shows the address (found through the QMP socket's peer process), that address.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::{Error, ErrorKind, Result};
use crate::qmp::Qmp;

/// Start an NBD server on `sock` for our exports. A server that is already running is a
/// configuration error naming `--nbd-server` / `nbd_server`.
pub(super) fn start_private(qmp: &mut Qmp, qmp_path: &Path, sock: &Path) -> Result<()> {
    match qmp.execute_value(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    ) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::Conflict && e.to_string().contains("already running") => {
            let hint = qmp
                .peer_pid()
                .and_then(running_address)
                .map(|a| {
                    format!(" Its command line says the running server is at {a}: pass --nbd-server {a}.")
                })
                .unwrap_or_default();
            Err(Error::config(format!(
                "QEMU at {} already runs an NBD server ({e}); blockvault adds its temporary \
                 exports to that server when told its address: pass --nbd-server unix:PATH \
                 (its unix socket) or --nbd-server HOST:PORT (TCP), or set \"nbd_server\" in \
                 the resource.{hint}",
                qmp_path.display()
            )))
        }
        Err(e) => Err(e),
    }
}

/// The address of the NBD server process `pid` was started with (`--nbd-server
/// addr.type=unix,addr.path=P` → `unix:P`; `addr.type=inet,addr.host=H,addr.port=N` →
/// `H:N`), if its command line shows one.
fn running_address(pid: u32) -> Option<String> {
    let raw = std::fs::read(PathBuf::from(format!("/proc/{pid}/cmdline"))).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let value = args.iter().enumerate().find_map(|(i, a)| {
        if a == "--nbd-server" || a == "-nbd-server" {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix("--nbd-server=").map(str::to_string)
        }
    })?;
    address_of(&value)
}

/// `addr.type=unix,addr.path=P` → `unix:P`; `addr.type=inet,addr.host=H,addr.port=N` →
/// `H:N`.
fn address_of(opts: &str) -> Option<String> {
    let get = |key: &str| {
        opts.split(',')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    };
    match get("addr.type").as_deref() {
        Some("unix") => get("addr.path").map(|p| format!("unix:{p}")),
        Some("inet") => Some(format!("{}:{}", get("addr.host")?, get("addr.port")?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::address_of;

    #[test]
    fn a_command_line_nbd_server_is_turned_into_the_flag_value() {
        assert_eq!(
            address_of("addr.type=unix,addr.path=/run/n.sock").as_deref(),
            Some("unix:/run/n.sock")
        );
        assert_eq!(
            address_of("addr.type=inet,addr.host=127.0.0.1,addr.port=10809,max-connections=4")
                .as_deref(),
            Some("127.0.0.1:10809")
        );
        assert_eq!(address_of("addr.type=fd,addr.str=3"), None);
        assert_eq!(address_of("{\"addr\": {}}"), None);
    }
}
