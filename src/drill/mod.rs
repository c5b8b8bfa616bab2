//! Recovery drills: boot a backup in a throwaway QEMU VM, without restoring it, and
//! record whether it came up.
//!
//! ```text
//!  vault ──▶ instant::serve_backup (one thread per disk, unix socket in the run dir)
//!              ▲ nbd+unix:///?socket=<run>/nbdN.sock   (read-only export)
//!  <run>/overlayN.qcow2  (qcow2, backing = that NBD URI: every guest write lands here)
//!              ▲
//!  qemu-system-x86_64 -machine q35 -nodefaults -vga std -display none -nic none
//!      -sandbox on  -qmp unix:<run>/qmp.sock  -serial file:<drill>/console.log
//!      isa-debugcon 0x402 → <drill>/firmware.log (SeaBIOS's own messages)
//!      [agent: virtio-serial org.qemu.guest_agent.0 → <run>/qga.sock]
//!      [port:N: -nic user,restrict=on,hostfwd=tcp:127.0.0.1:P-:N]
//! ```
//! `<run>` is a private temporary directory (sockets, overlays, our pid), removed with
//! everything in it when the drill ends however it ends (success, failure, timeout,
//! cancel, error): QEMU is killed and reaped, the NBD servers are stopped and joined,
//! their sockets go. Should the drilling process itself be killed (SIGKILL), QEMU dies
//! with it (`setpriv --pdeathsig KILL`) and the next drill removes the orphaned `<run>`.
//! `<drill>` = `<data>/drills/<backup-id>/<yyyymmddThhmmssZ>/` keeps what the drill
//! shows: `console.log`, `firmware.log`, `qemu.log` (QEMU's stderr) and the VGA
//! screenshot (`screenshot.png`, or `.ppm` from a QEMU without PNG `screendump`).
//!
//! The backup is never written (the exports are read-only, the vault is pinned against
//! GC while the VM runs) and the source VM is never touched: only the vault is read.
//!
//! Success signals ([`Check`]): the guest agent answering `guest-ping`; a regex on the
//! serial console; or a TCP port inside the guest, reached through a user-mode NIC with
//! `restrict=on` (the guest can reach nothing; only the forwarded port comes in). Slirp
//! accepts a forwarded connection on the host side before the guest answers, so the
//! drill holds one connection and asks QEMU (`info usernet`) whether slirp's side to the
//! guest port is ESTABLISHED: only then did the guest accept.
//! Failure: the deadline passes, QEMU exits, or SeaBIOS reports "No bootable device".
//!
//! Accelerator: KVM when `/dev/kvm` can be opened read-write, TCG otherwise. A VM that
//! KVM fails once started (seen here: "failed to set MSR 0x10a") is booted again under
//! TCG, on fresh overlays; the record says which accelerator ran it.
//!
//! Firmware: SeaBIOS only; a backup whose recorded hardware says UEFI is refused
//! (`Unsupported`) rather than drilled into a misleading failure.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::BackupManifest;
use crate::vault::Vault;

mod check;
mod serve;
mod vm;

pub use check::Check;

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when usable, else TCG (and TCG again when KVM fails the guest).
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Accel> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(Error::config(format!(
                "accelerator {s:?}: expected auto, kvm or tcg"
            ))),
        }
    }
}

/// What a drill does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillOptions {
    /// Time from QEMU's start to the success signal.
    pub timeout: Duration,
    pub check: Check,
    #[serde(default)]
    pub accel: Accel,
    /// Guest RAM in MiB (default: the backup's recorded hardware, else 1024).
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Disk bus for every disk: sata, virtio, ide, scsi or nvme (default: the backup's
    /// recorded bus per disk, else sata).
    #[serde(default)]
    pub bus: Option<String>,
    /// QEMU CPU model (default: `host` under KVM, `max` under TCG).
    #[serde(default)]
    pub cpu: Option<String>,
}

impl Default for DrillOptions {
    fn default() -> Self {
        DrillOptions {
            timeout: Duration::from_secs(300),
            check: Check::Agent,
            accel: Accel::Auto,
            memory_mib: None,
            bus: None,
            cpu: None,
        }
    }
}

/// The result of one drill, as recorded on the backup (`verified_boot`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifiedBoot {
    /// When the drill started (RFC 3339).
    pub at: String,
    /// The backup drilled.
    pub backup: String,
    /// The check, as given (`agent`, `console:REGEX`, `port:N`).
    pub check: String,
    /// Whether the check passed.
    pub ok: bool,
    /// Seconds from QEMU's start to the signal (or to the failure).
    pub seconds: f64,
    /// "kvm" or "tcg": what ran the guest.
    pub accel: String,
    /// Why it failed (absent on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What else happened (e.g. KVM failed the guest and it ran under TCG).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The VGA screenshot (PNG, else PPM), when QEMU was still running to take it.
    pub screenshot: Option<PathBuf>,
    /// Last lines of the serial console (at most 4 KiB).
    pub console_tail: String,
    /// Last lines of the firmware's own log (SeaBIOS debug console, at most 2 KiB).
    #[serde(default)]
    pub firmware_tail: String,
    /// Directory holding the console log, firmware log, QEMU's log and the screenshot.
    pub dir: PathBuf,
    /// Disks booted, in order.
    pub disks: Vec<String>,
}

/// Boot `m` (every disk, in order) from `vault` and wait for `opts.check`. Results go
/// into a new directory under `drills_dir/<backup-id>/`. A guest that does not pass
/// is `Ok` with `ok: false`; `Err` is for a drill that could not run (QEMU missing,
/// vault unreadable, UEFI) or was cancelled.
pub fn run_drill(
    vault: Arc<Vault>,
    m: &BackupManifest,
    drills_dir: &Path,
    opts: &DrillOptions,
    cancel: &AtomicBool,
    progress: &dyn Fn(&str),
) -> Result<VerifiedBoot> {
    vm::check_options(opts)?;
    if m.disks.is_empty() {
        return Err(Error::invalid(format!("backup {} has no disks", m.name)));
    }
    let hw = m.capture.as_ref().and_then(|c| c.hardware.as_ref());
    if hw.and_then(|h| h.firmware.as_deref()) == Some("uefi") {
        return Err(Error::unsupported(format!(
            "backup {} is of a UEFI VM: drills boot SeaBIOS only for now; restore it to \
             test it",
            m.name
        )));
    }
    let at = crate::manifest::now_rfc3339();
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .map_err(|e| Error::invalid(format!("formatting the time: {e}")))?;
    let dir = new_drill_dir(&drills_dir.join(&m.id), &stamp)?;
    let _pin = vault.pin(&[m])?;
    sweep_stale_runs(&std::env::temp_dir());
    let run = tempfile::Builder::new()
        .prefix(RUN_PREFIX)
        .tempdir()
        .map_err(|e| Error::io("creating the drill's temporary directory", e))?;
    std::fs::write(run.path().join("pid"), std::process::id().to_string())
        .map_err(|e| Error::io(format!("writing {}/pid", run.path().display()), e))?;
    progress(&format!(
        "serving {} disk(s) of backup {} over NBD",
        m.disks.len(),
        m.name
    ));
    let servers = serve::Servers::start(&vault, &m.disks, run.path())?;
    let plan = vm::Plan::new(m, opts, servers.served(), run.path(), &dir)?;
    let outcome = vm::boot(&plan, opts, cancel, progress);
    let server_errors = servers.errors();
    drop(servers);
    drop(run);
    let mut outcome = outcome?;
    if !outcome.ok && !server_errors.is_empty() {
        let e = server_errors.join("; ");
        outcome.reason = Some(match outcome.reason {
            Some(r) => format!("{r}; {e}"),
            None => e,
        });
    }
    Ok(VerifiedBoot {
        at,
        backup: m.id.clone(),
        check: opts.check.to_string(),
        ok: outcome.ok,
        seconds: outcome.seconds,
        accel: outcome.accel.to_string(),
        reason: outcome.reason,
        note: outcome.note,
        screenshot: outcome.screenshot,
        console_tail: tail(&dir.join("console.log"), 4096),
        firmware_tail: tail(&dir.join("firmware.log"), 2048),
        disks: m.disks.iter().map(|d| d.name.clone()).collect(),
        dir,
    })
}

/// A new directory `parent/stamp` (or `stamp-2`, `-3`, … when a drill of the same backup
/// started in the same second), private to us.
fn new_drill_dir(parent: &Path, stamp: &str) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    crate::restore::partial::create_private_dir(parent)?;
    for n in 1..1000 {
        let dir = match n {
            1 => parent.join(stamp),
            _ => parent.join(format!("{stamp}-{n}")),
        };
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
        }
    }
    Err(Error::conflict(format!(
        "{}: too many drills of this backup in one second",
        parent.display()
    )))
}

/// Name prefix of the run directories in the temp dir.
const RUN_PREFIX: &str = "blockvault-drill-";

/// Remove the run directories of drills whose process is gone (killed before it could
/// clean up: its QEMU died with it, see `vm`). A directory without a readable pid, or
/// whose process still exists, is left alone.
fn sweep_stale_runs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(RUN_PREFIX) {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(e.path().join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!("removing {} (its drill died)", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The last `max` bytes of `path` (from a line start when there is one), lossily UTF-8.
fn tail(path: &Path, max: usize) -> String {
    let Ok(b) = std::fs::read(path) else {
        return String::new();
    };
    let mut t = &b[b.len().saturating_sub(max)..];
    if t.len() < b.len()
        && let Some(i) = t.iter().position(|&c| c == b'\n')
    {
        t = &t[i + 1..];
    }
    String::from_utf8_lossy(t).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_starts_at_a_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, "first line\nsecond\nthird\n").unwrap();
        assert_eq!(tail(&p, 100), "first line\nsecond\nthird\n");
        assert_eq!(tail(&p, 10), "third\n");
        assert_eq!(tail(&d.path().join("none"), 10), "");
    }

    #[test]
    fn only_runs_of_dead_drills_are_swept() {
        let d = tempfile::tempdir().unwrap();
        let mk = |name: &str, pid: Option<&str>| {
            let p = d.path().join(name);
            std::fs::create_dir(&p).unwrap();
            if let Some(pid) = pid {
                std::fs::write(p.join("pid"), pid).unwrap();
            }
            p
        };
        let dead = mk("blockvault-drill-dead", Some("4194304999"));
        let alive = mk(
            "blockvault-drill-alive",
            Some(&std::process::id().to_string()),
        );
        let unknown = mk("blockvault-drill-nopid", None);
        let other = mk("someone-else", Some("4194304999"));
        sweep_stale_runs(d.path());
        assert!(!dead.exists());
        assert!(alive.exists() && unknown.exists() && other.exists());
    }

    #[test]
    fn drills_started_in_the_same_second_get_their_own_directories() {
        let d = tempfile::tempdir().unwrap();
        let a = new_drill_dir(&d.path().join("b"), "20260101T000000Z").unwrap();
        let b = new_drill_dir(&d.path().join("b"), "20260101T000000Z").unwrap();
        assert_ne!(a, b);
        assert!(b.ends_with("20260101T000000Z-2") && a.is_dir() && b.is_dir());
    }

    #[test]
    fn accel_parses() {
        assert_eq!("tcg".parse::<Accel>().unwrap(), Accel::Tcg);
        assert_eq!(
            "xen".parse::<Accel>().unwrap_err().kind(),
            crate::ErrorKind::Config
        );
    }
}
