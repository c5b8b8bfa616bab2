//! The fallback reader: any image QEMU reads, through a private `qemu-storage-daemon`.
//!
//! For a format or feature blockvault does not read natively (VHD, VHDX, VDI, QED, qcow
//! v1, zstd-compressed or encrypted qcow2, LUKS, ...), the backup starts its own daemon,
//! reads the disk over NBD with the existing [`NbdSource`] (allocation from
//! `base:allocation`) and stops the daemon when the source is dropped: on success, on
//! error and on cancel alike. The daemon gets:
//!
//! ```text
//! <tmp>/bv-qsd-<random>/      private directory, mode 0700, removed afterwards
//!     nbd.sock                the NBD server's unix socket (only this process can reach it)
//!     daemon.log              the daemon's stderr, quoted in errors
//!     owner                   "<blockvault pid>\n", for the orphan sweep
//! --blockdev {"driver":"file","node-name":"file0","filename":PATH,"read-only":true[,"locking":"off"]}
//! --blockdev {"driver":DRIVER,"node-name":"fmt0","file":"file0","read-only":true[, key secret]}
//! --object   {"qom-type":"secret","id":"sec0","file":SECRET_PATH}     (encrypted images only)
//! --nbd-server {"addr":{"type":"unix","path":"<tmp>/nbd.sock"}}
//! --export   {"type":"nbd","id":"exp0","node-name":"fmt0","name":"disk","writable":false}
//! ```
//!
//! A passphrase never appears in the daemon's argv: only the path of the user's secret
//! file does, and QEMU reads the file itself (its exact bytes are the passphrase).
//! If blockvault itself is killed (SIGKILL), its daemon outlives it: the next fallback
//! read sweeps such orphans (`owner` file: blockvault's pid; the daemon is found by its
//! command line, which names the directory).
//! `locking` is turned off only for `--force-inconsistent`, where the image is known to
//! be open for writing elsewhere. A daemon that dies while the disk is read is reported
//! as such, with the tail of its log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::detect::Encryption;
use super::{BlockSource, Extent, NbdSource, SourceFormat};
use crate::error::{Error, ErrorKind, Result};

/// Name prefix of the daemons' private directories.
const DIR_PREFIX: &str = "bv-qsd-";

/// How long the daemon may take to open the image and listen.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// What to export and how.
#[derive(Debug, Clone)]
pub struct QemuImage<'a> {
    pub path: &'a Path,
    /// QEMU block driver of the image ("vpc", "qcow2", ...).
    pub driver: &'static str,
    pub encryption: Option<Encryption>,
    /// File holding the passphrase of an encrypted image.
    pub secret_file: Option<&'a Path>,
    /// Do not take QEMU's image locks (the image is open for writing elsewhere).
    pub no_locking: bool,
    /// Raised to give up while the daemon is starting.
    pub cancel: Option<&'a std::sync::atomic::AtomicBool>,
}

/// A running private daemon; killed and its directory removed when dropped.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let text = text.trim();
        let tail: String = text
            .chars()
            .rev()
            .take(600)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if tail.is_empty() {
            "(no message)".into()
        } else {
            tail
        }
    }

    /// The daemon's exit status if it is gone.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `dir` is removed after this, with the socket and the log.
    }
}

/// An image read through a private qemu-storage-daemon.
pub struct QemuSource {
    // Field order: the NBD connection closes before the daemon is stopped.
    nbd: NbdSource,
    daemon: Daemon,
    path: PathBuf,
    driver: &'static str,
    encrypted: bool,
}

impl QemuSource {
    /// Start a daemon exporting `img` read-only and connect to it.
    pub fn open(img: &QemuImage<'_>) -> Result<QemuSource> {
        let path = img.path;
        let secret = match (img.encryption, img.secret_file) {
            (Some(enc), None) => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "{} is encrypted ({}, {}): give its passphrase with --secret-file PATH \
                         (a file holding exactly the passphrase) to back up the decrypted disk",
                        path.display(),
                        img.driver,
                        enc.name()
                    ),
                ));
            }
            (Some(_), Some(s)) => Some(std::fs::canonicalize(s).map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!("secret file {}: cannot be read", s.display()),
                )
                .with_source(e)
            })?),
            (None, _) => None,
        };
        let filename = std::fs::canonicalize(path).map_err(|e| {
            Error::new(ErrorKind::NotFound, format!("opening {}", path.display())).with_source(e)
        })?;
        sweep_orphans(&std::env::temp_dir());
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(|e| Error::io("creating a private directory for qemu-storage-daemon", e))?;
        // tempfile creates the directory with mode 0700 already; make it explicit.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(format!("chmod 0700 {}", dir.path().display()), e))?;
        }
        let sock = dir.path().join("nbd.sock");
        let log = std::fs::File::create(dir.path().join("daemon.log"))
            .map_err(|e| Error::io("creating the qemu-storage-daemon log", e))?;

        // Written before the daemon exists, so that no daemon is ever without an owner.
        std::fs::write(
            dir.path().join("owner"),
            format!("{}\n", std::process::id()),
        )
        .map_err(|e| Error::io("writing the qemu-storage-daemon owner file", e))?;
        let args = daemon_args(img, &filename, secret.as_deref(), &sock);
        let child = Command::new("qemu-storage-daemon")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "{}: {} images are read through qemu-storage-daemon, which could not \
                         be started (install the qemu-system-tools / qemu-utils package)",
                        path.display(),
                        img.driver
                    ),
                )
                .with_source(e)
            })?;
        let mut daemon = Daemon { child, dir };
        wait_listening(&mut daemon, &sock, img)?;
        let uri = format!("nbd+unix:///disk?socket={}", sock.display());
        let nbd = NbdSource::open(&uri, None)
            .map_err(|e| daemon_error(&mut daemon, path, e))?
            .described_as(path.display().to_string());
        tracing::info!(
            path = %path.display(),
            driver = img.driver,
            pid = daemon.child.id(),
            "reading through a private qemu-storage-daemon"
        );
        Ok(QemuSource {
            nbd,
            daemon,
            path: path.to_path_buf(),
            driver: img.driver,
            encrypted: img.encryption.is_some(),
        })
    }

    /// The daemon's process id (for tests and logs).
    pub fn daemon_pid(&self) -> u32 {
        self.daemon.child.id()
    }

    /// The daemon's private directory.
    pub fn daemon_dir(&self) -> &Path {
        self.daemon.dir.path()
    }

    fn wrap(&mut self, e: Error) -> Error {
        daemon_error(&mut self.daemon, &self.path, e)
    }
}

/// The daemon's arguments (drawn in the module doc). A secret is passed as the path of
/// the user's file, never as data.
fn daemon_args(
    img: &QemuImage<'_>,
    filename: &Path,
    secret: Option<&Path>,
    sock: &Path,
) -> Vec<String> {
    let mut file_node = json!({
        "driver": "file", "node-name": "file0",
        "filename": filename, "read-only": true,
    });
    if img.no_locking {
        file_node["locking"] = json!("off");
    }
    let mut fmt_node = json!({
        "driver": img.driver, "node-name": "fmt0", "file": "file0", "read-only": true,
    });
    match img.encryption {
        Some(Encryption::Luks) => fmt_node["key-secret"] = json!("sec0"),
        Some(Encryption::Qcow2Luks) => {
            fmt_node["encrypt"] = json!({"format": "luks", "key-secret": "sec0"});
        }
        Some(Encryption::Qcow2Aes) => {
            fmt_node["encrypt"] = json!({"format": "aes", "key-secret": "sec0"});
        }
        None => {}
    }
    let mut args: Vec<String> = Vec::new();
    if let Some(s) = secret {
        args.push("--object".into());
        args.push(json!({"qom-type": "secret", "id": "sec0", "file": s}).to_string());
    }
    args.extend([
        "--blockdev".into(),
        file_node.to_string(),
        "--blockdev".into(),
        fmt_node.to_string(),
        "--nbd-server".into(),
        json!({"addr": {"type": "unix", "path": sock}}).to_string(),
        "--export".into(),
        json!({"type": "nbd", "id": "exp0", "node-name": "fmt0", "name": "disk",
               "writable": false})
        .to_string(),
    ]);
    args
}

/// Stop the daemons of backups that died without cleaning up (SIGKILL): a private
/// directory under `root` whose `owner` file names a blockvault process that is gone.
/// Its daemons are found by their command line, which names the directory (so a reused
/// pid is never hit), killed, and the directory is removed. Best effort.
pub fn sweep_orphans(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        if !e.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let Ok(owner) = std::fs::read_to_string(dir.join("owner")) else {
            continue; // being created, or not ours
        };
        let Ok(owner) = owner.trim().parse::<i32>() else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        for pid in daemons_naming(&dir) {
            tracing::warn!(pid, dir = %dir.display(), "stopping the qemu-storage-daemon of a backup that died");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Pids of the qemu-storage-daemon processes whose command line names `dir`.
fn daemons_naming(dir: &Path) -> Vec<i32> {
    let needle = format!("{}/", dir.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.starts_with("qemu-storage-daemon") && cmd.contains(&needle)
        })
        .collect()
}

/// Wait until the daemon listens on `sock`, or fail with its own message if it exits.
fn wait_listening(daemon: &mut Daemon, sock: &Path, img: &QemuImage<'_>) -> Result<()> {
    let (path, driver) = (img.path, img.driver);
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(st) = daemon.exited() {
            let log = daemon.log();
            let kind = if log.contains("passphrase") || log.contains("Invalid password") {
                ErrorKind::Config
            } else {
                ErrorKind::InvalidFormat
            };
            return Err(Error::new(
                kind,
                format!(
                    "{}: qemu-storage-daemon exited ({st}) before it could serve it as {driver}: {log}",
                    path.display()
                ),
            ));
        }
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            return Ok(());
        }
        if img
            .cancel
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(Error::cancelled(format!(
                "{}: cancelled while qemu-storage-daemon was starting",
                path.display()
            )));
        }
        if start.elapsed() > START_DEADLINE {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "{}: qemu-storage-daemon did not start listening within {}s: {}",
                    path.display(),
                    START_DEADLINE.as_secs(),
                    daemon.log()
                ),
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// An error while talking to the daemon; says so clearly when the daemon died.
fn daemon_error(daemon: &mut Daemon, path: &Path, e: Error) -> Error {
    match daemon.exited() {
        Some(st) => Error::new(
            ErrorKind::Io,
            format!(
                "{}: the qemu-storage-daemon reading it (pid {}) exited ({st}); the backup \
                 cannot go on: {}",
                path.display(),
                daemon.child.id(),
                daemon.log()
            ),
        )
        .with_source(e),
        None => e,
    }
}

impl BlockSource for QemuSource {
    fn set_cancel(&mut self, cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>) {
        self.nbd.set_cancel(cancel);
    }

    fn format(&self) -> SourceFormat {
        SourceFormat::Qemu(self.driver)
    }

    fn reader(&self) -> String {
        format!("qemu-storage-daemon:{}", self.driver)
    }

    fn encryption(&self) -> Option<String> {
        self.encrypted
            .then(|| "encrypted source, decrypted with a user secret".to_string())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> u64 {
        self.nbd.size()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self.nbd.read_at(buf, offset) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.wrap(e)),
        }
    }

    fn allocated_extents(&mut self) -> Result<Vec<Extent>> {
        match self.nbd.allocated_extents() {
            Ok(x) => Ok(x),
            Err(e) => Err(self.wrap(e)),
        }
    }

    fn prefers_large_reads(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_passphrase_is_never_in_the_daemons_argv_only_its_files_path() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("pass");
        std::fs::write(&secret, b"s3cret-passphrase").unwrap();
        let img = QemuImage {
            path: Path::new("/x/enc.qcow2"),
            driver: "qcow2",
            encryption: Some(Encryption::Qcow2Luks),
            secret_file: Some(&secret),
            no_locking: false,
            cancel: None,
        };
        let args = daemon_args(&img, img.path, Some(&secret), Path::new("/t/nbd.sock"));
        let all = args.join(" ");
        assert!(!all.contains("s3cret"), "{all}");
        assert!(
            all.contains(&format!("\"file\":\"{}\"", secret.display())),
            "{all}"
        );
        assert!(all.contains("\"key-secret\":\"sec0\""), "{all}");
        assert!(all.contains("\"writable\":false") && all.contains("\"read-only\":true"));
        assert!(
            !all.contains("locking"),
            "locks stay on unless forced: {all}"
        );
    }
}
