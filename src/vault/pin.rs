//! Pins: long readers (restore, export, serve-nbd) keep what they read alive without
//! holding the vault lock, so a days-long serve-nbd no longer makes every GC fail.
//!
//! A reader writes one pin file naming the backups it reads (with their disks' index
//! roots, so GC can mark them even after their manifests are deleted), its pid and host,
//! and a lease it renews from a thread. GC (under the exclusive lock) reads the
//! manifests first and the pins second and marks every pinned root live; it ignores and
//! removes pins whose lease has expired or whose pid is dead on this host. A reader
//! checks, after its pin is durable, that each manifest still exists: so either GC saw
//! the manifest, or GC saw the pin, or the reader refuses (`NotFound`).
//!
//! File `<vault>/locks/pins/<random hex>.pin`, JSON, written atomically:
//!
//! ```text
//! { "version": 1, "pid": 4242, "host": "appliance-1",
//!   "lease_until": 1795000000,                    unix seconds; renewed every LEASE/4
//!   "backups": [ { "id": "...", "name": "...", "disks": [ DiskManifest, ... ] } ] }
//! ```

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::manifest::{BackupManifest, DiskManifest};

use super::store::write_atomic;

const PIN_VERSION: u32 = 1;
/// How long a pin stays valid without renewal.
pub const LEASE: Duration = Duration::from_secs(120);
/// Pin files larger than this are ignored as damaged (a cap on what GC reads).
const MAX_PIN_FILE: u64 = 16 << 20;

/// One pinned backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinnedBackup {
    pub id: String,
    pub name: String,
    pub disks: Vec<DiskManifest>,
}

/// The content of a pin file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinFile {
    pub version: u32,
    pub pid: u32,
    pub host: String,
    pub lease_until: u64,
    pub backups: Vec<PinnedBackup>,
}

/// A held pin; renewed on a thread, removed on drop.
pub struct PinGuard {
    path: PathBuf,
    stop: Option<Sender<()>>,
    renewer: Option<JoinHandle<()>>,
    /// Shared store: the use lease that keeps a GC on another appliance off (pins are
    /// local files it cannot see); released after the pin.
    _lease: Option<super::lease::Lease>,
}

impl PinGuard {
    /// Hold `lease` as long as the pin (see `Vault::pin`).
    pub(crate) fn with_lease(mut self, lease: super::lease::Lease) -> PinGuard {
        self._lease = Some(lease);
        self
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("removing pin {}: {e}", self.path.display());
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// This machine's host name (pins of dead local pids are ignored; remote ones expire).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

pub fn pins_dir(vault_root: &Path) -> PathBuf {
    vault_root.join("locks").join("pins")
}

/// Write a pin for `backups` and start renewing it.
pub fn pin(vault_root: &Path, backups: &[&BackupManifest]) -> Result<PinGuard> {
    let dir = pins_dir(vault_root);
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.pin", hex::encode(rand::random::<[u8; 12]>())));
    let mut file = PinFile {
        version: PIN_VERSION,
        pid: std::process::id(),
        host: host_name(),
        lease_until: unix_now() + LEASE.as_secs(),
        backups: backups
            .iter()
            .map(|m| PinnedBackup {
                id: m.id.clone(),
                name: m.name.clone(),
                disks: m.disks.clone(),
            })
            .collect(),
    };
    let encode = |f: &PinFile| {
        serde_json::to_vec(f).map_err(|e| Error::invalid("encoding a pin").with_source(e))
    };
    write_atomic(&path, &encode(&file)?)?;
    let (stop, stopped) = mpsc::channel::<()>();
    let renew_path = path.clone();
    let renewer = std::thread::Builder::new()
        .name("vault-pin".into())
        .spawn(move || {
            // Wake every quarter lease (or at once when the guard is dropped).
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(LEASE / 4) {
                file.lease_until = unix_now() + LEASE.as_secs();
                let written = encode(&file).and_then(|b| write_atomic(&renew_path, &b));
                if let Err(e) = written {
                    tracing::error!("renewing pin {}: {e}", renew_path.display());
                }
            }
        })
        .ctx(|| "starting the pin renewal thread")?;
    Ok(PinGuard {
        path,
        stop: Some(stop),
        renewer: Some(renewer),
        _lease: None,
    })
}

/// Is the process `pid` alive on this host?
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// The pins GC must honour. Expired pins and pins of dead local processes are removed
/// (call only under the exclusive vault lock). A pin file that cannot be parsed stops
/// GC with `Corrupt` (GC must not guess what it protects); pins are written atomically,
/// so this means damage.
pub fn live_pins(vault_root: &Path) -> Result<Vec<PinFile>> {
    let dir = pins_dir(vault_root);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let (now, host) = (unix_now(), host_name());
    let mut out = Vec::new();
    for e in entries {
        let e = e.ctx(|| format!("listing {}", dir.display()))?;
        let path = e.path();
        if path.extension().is_none_or(|x| x != "pin") {
            continue;
        }
        let text = match std::fs::metadata(&path) {
            Ok(m) if m.len() <= MAX_PIN_FILE => std::fs::read(&path),
            Ok(_) => {
                tracing::warn!("ignoring oversized pin {}", path.display());
                continue;
            }
            Err(e) => Err(e),
        };
        let bytes = match text {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // released
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let pin: PinFile = match serde_json::from_slice(&bytes) {
            Ok(p) => p,
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "pin {} cannot be read ({e}); GC will not guess what it protects: remove it if no reader is running",
                        path.display()
                    ),
                ));
            }
        };
        let expired = pin.lease_until < now;
        let dead = pin.host == host && !pid_alive(pin.pid);
        if expired || dead {
            tracing::info!(
                pid = pin.pid,
                host = pin.host,
                expired,
                dead,
                "removing a stale pin {}",
                path.display()
            );
            let _ = std::fs::remove_file(&path);
            continue;
        }
        out.push(pin);
    }
    Ok(out)
}
