//! One run's footprint on the libvirt host, and what a run that died left behind: the
//! private run directory (`<scratch dir>/blockvault-libvirt-<pid>-<random>`, mode 0700,
//! handed to the uid:gid QEMU runs as, which creates the NBD socket in it) and the
//! domain's backup job (ended with `virsh domjobabort`, waited for until libvirt lists
//! no job). A job whose socket lies in the run directory of a pid that no longer exists
//! is a leftover and is ended; a live pid's job, or a job blockvault did not start, is a
//! conflict.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::virsh::Virsh;
use super::xml;
use crate::error::{Error, ErrorKind, Result};

const RUN_PREFIX: &str = "blockvault-libvirt-";

/// End the domain's backup job and wait until libvirt reports none.
pub(super) fn end_job(virsh: &Virsh, dom: &str) -> Result<()> {
    virsh.run(&["domjobabort", dom])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = virsh.run(&["domjobinfo", dom])?;
        if !job_active(&info) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::Io,
                format!("domain {dom} still lists a job 30 s after domjobabort: {info}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn job_active(domjobinfo: &str) -> bool {
    domjobinfo.lines().any(|l| {
        let mut kv = l.splitn(2, ':');
        kv.next().map(str::trim) == Some("Job type")
            && kv.next().map(str::trim).is_some_and(|v| v != "None")
    })
}

/// A backup job left by a blockvault run that died is ended; any other running backup job
/// is a conflict. Returns a note when one was ended.
pub(super) fn end_dead_job(virsh: &Virsh, dom: &str) -> Result<Option<String>> {
    if !job_active(&virsh.run(&["domjobinfo", dom])?) {
        return Ok(None);
    }
    let xml = match virsh.run(&["backup-dumpxml", dom]) {
        Ok(x) => x,
        Err(_) => {
            return Err(Error::conflict(format!(
                "domain {dom} runs another job (virsh domjobinfo {dom}); try again when it ends"
            )));
        }
    };
    let (socket, _) = xml::parse_backup_job(&xml)?;
    let dir = socket.as_deref().map(Path::new).and_then(Path::parent);
    let pid = dir
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(RUN_PREFIX))
        .and_then(|n| n.split('-').next())
        .and_then(|p| p.parse::<i32>().ok());
    let Some(pid) = pid else {
        return Err(Error::conflict(format!(
            "domain {dom} runs a backup job that blockvault did not start (socket {}); \
             end it with virsh domjobabort {dom} or wait for it",
            socket.as_deref().unwrap_or("none")
        )));
    };
    let alive = pid == std::process::id() as i32
        || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    if alive {
        return Err(Error::conflict(format!(
            "another blockvault backup (pid {pid}) of domain {dom} is running; try again \
             when it ends"
        )));
    }
    tracing::warn!(
        domain = dom,
        pid,
        "ending the backup job of a run that died"
    );
    end_job(virsh, dom)?;
    if let Some(d) = dir {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(Some(format!(
        "ended the backup job left by blockvault pid {pid}, which died"
    )))
}

/// The run's private directory, handed to QEMU's user; removed when dropped.
pub(super) struct RunDir {
    pub(super) path: PathBuf,
}

impl RunDir {
    pub(super) fn create(base: &Path, dac_label: Option<&str>) -> Result<RunDir> {
        use std::os::unix::fs::PermissionsExt;
        let path = base.join(format!(
            "{RUN_PREFIX}{}-{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 4]>())
        ));
        std::fs::create_dir(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        let dir = RunDir { path };
        std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("chmod {}", dir.path.display()), e))?;
        if let Some((uid, gid)) = dac_label.and_then(parse_dac) {
            std::os::unix::fs::chown(&dir.path, Some(uid), Some(gid)).map_err(|e| {
                Error::io(
                    format!(
                        "handing {} to QEMU's user {uid}:{gid} (run blockvault as root, or \
                         as the user QEMU runs as)",
                        dir.path.display()
                    ),
                    e,
                )
            })?;
        }
        Ok(dir)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("removing {}: {e}", self.path.display());
        }
    }
}

/// `+UID:+GID` or `USER:GROUP` → numeric ids.
fn parse_dac(label: &str) -> Option<(u32, u32)> {
    let (u, g) = label.split_once(':')?;
    let uid = match u.strip_prefix('+') {
        Some(n) => n.parse().ok()?,
        None => nix::unistd::User::from_name(u).ok()??.uid.as_raw(),
    };
    let gid = match g.strip_prefix('+') {
        Some(n) => n.parse().ok()?,
        None => nix::unistd::Group::from_name(g).ok()??.gid.as_raw(),
    };
    Some((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_state_and_dac_labels_are_read() {
        assert!(job_active(
            "Job type:         Unbounded\nOperation: Backup\n"
        ));
        assert!(!job_active("Job type:         None        \n"));
        assert_eq!(parse_dac("+64055:+64055"), Some((64055, 64055)));
        assert_eq!(parse_dac("root:root"), Some((0, 0)));
        assert_eq!(parse_dac("nonsense"), None);
    }
}
