//! Staging ("partial") outputs of restores and exports, and the sweep of those whose
//! owner died.
//!
//! A restore writes into a hidden staging file (or directory, for server images) next to
//! its target and renames it into place at the end; on an error or cancel it removes
//! it. A process killed with SIGKILL cannot, so the staging name records its owner:
//!
//! ```text
//! .<target name>.partial-<host>-<pid>-<start>-<random>
//!                        │      │     │       └ 8 hex digits: two restores of one name
//!                        │      │     └ the owner's start time (clock ticks since boot,
//!                        │      │       /proc/<pid>/stat field 22): a reused pid is not
//!                        │      │       taken for the owner
//!                        │      └ owner's pid
//!                        └ 8 hex digits of blake3(hostname): a directory shared by two
//!                          appliances (NFS) is only swept of this host's partials
//! ```
//!
//! [`sweep_dir`] removes every partial of this host in a directory whose owner is no
//! longer running (same pid and start time). It runs before every restore into that
//! directory, and at `serve` start over the directories named in the data dir's restore
//! records (`<data>/restores/<host>-<pid>-<start>-<random>`, one line: the target
//! directory; written by `App` while a restore runs, removed when it ends).
//! Names that do not parse (older releases, other programs) are never touched.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// This process as an owner: `<host>-<pid>-<start>`.
pub fn owner_tag() -> String {
    let pid = std::process::id();
    format!("{}-{pid}-{}", host_tag(), start_time(pid).unwrap_or(0))
}

/// 8 hex digits naming this host.
fn host_tag() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    hex::encode(&blake3::hash(host.trim().as_bytes()).as_bytes()[..4])
}

/// Start time of `pid` in clock ticks since boot, if it is running.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after the
    // last ')' are fixed. Field 22 (starttime) is the 20th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A staging path next to `to` for this process.
pub fn staging_path(to: &Path) -> Result<PathBuf> {
    let name = to
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::config(format!("bad restore target {}", to.display())))?;
    Ok(parent_dir(to).join(staging_name(name)))
}

/// A staging file name for `name`, owned by this process.
pub fn staging_name(name: &str) -> String {
    format!(
        ".{name}.partial-{}-{}",
        owner_tag(),
        hex::encode(rand::random::<[u8; 4]>())
    )
}

/// The directory a target lives in (`.` for a bare file name).
pub fn parent_dir(to: &Path) -> PathBuf {
    to.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// The owner of a staging name: (host, pid, start).
fn parse_owner(file_name: &str) -> Option<(&str, u32, u64)> {
    let (_, tail) = file_name.rsplit_once(".partial-")?;
    let mut it = tail.split('-');
    let host = it.next()?;
    let pid = it.next()?.parse().ok()?;
    let start = it.next()?.parse().ok()?;
    let rand = it.next()?;
    if it.next().is_some()
        || host.len() != 8
        || rand.len() != 8
        || !host
            .bytes()
            .chain(rand.bytes())
            .all(|b| b.is_ascii_hexdigit())
    {
        return None;
    }
    Some((host, pid, start))
}

/// Whether the owner (`pid` started at `start`) still runs on this host.
pub(crate) fn owner_alive(pid: u32, start: u64) -> bool {
    start_time(pid) == Some(start)
}

/// Whether `tag` (as made by [`owner_tag`]) names a live process of this host; tags of
/// other hosts count as alive (they are not ours to judge).
pub(crate) fn tag_alive(tag: &str) -> bool {
    let mut it = tag.split('-');
    let (Some(host), Some(pid), Some(start)) = (it.next(), it.next(), it.next()) else {
        return true;
    };
    let (Ok(pid), Ok(start)) = (pid.parse(), start.parse()) else {
        return true;
    };
    host != host_tag() || owner_alive(pid, start)
}

/// Remove the partial outputs in `dir` left by dead restores of this host; returns
/// what was removed. A missing directory has nothing to sweep.
pub fn sweep_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(removed);
        }
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let host = host_tag();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with('.') {
            continue;
        }
        let Some((h, pid, start)) = parse_owner(name) else {
            continue;
        };
        if h != host || owner_alive(pid, start) {
            continue;
        }
        let path = entry.path();
        let r = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match r {
            Ok(()) => {
                tracing::info!(path = %path.display(), pid, "removed the partial output of a dead restore");
                removed.push(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "removing {}, left by a dead restore (pid {pid}); remove it by hand",
                        path.display()
                    ),
                    e,
                ));
            }
        }
    }
    Ok(removed)
}

/// Rename the finished staging file or directory `from` to `to`, never replacing
/// anything: `renameat2(RENAME_NOREPLACE)`, so a file (or symlink) created at `to` while
/// the restore ran is left alone and the restore fails with `Conflict`. On a file system
/// without `RENAME_NOREPLACE` a file is hard-linked into place (which also fails on an
/// existing name) and its staging name removed.
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    use nix::errno::Errno;
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    let exists = || {
        Error::conflict(format!(
            "{} appeared while the restore ran; restore never overwrites a file (the \
             restored copy was removed: restore again to another name)",
            to.display()
        ))
    };
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EEXIST) => Err(exists()),
        Err(Errno::EINVAL | Errno::ENOSYS) if from.is_file() => match fs::hard_link(from, to) {
            Ok(()) => fs::remove_file(from).ctx(|| format!("removing {}", from.display())),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(exists()),
            Err(e) => Err(Error::io(format!("linking into {}", to.display()), e)),
        },
        Err(e) => Err(Error::io(
            format!("renaming {} to {}", from.display(), to.display()),
            std::io::Error::from(e),
        )),
    }
}

/// Create directory `dir` (and missing parents) with mode 0700 when it does not exist;
/// an existing directory keeps its mode (it is the user's).
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .ctx(|| format!("creating {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_created_at_the_target_meanwhile_is_never_replaced() {
        let d = tempfile::tempdir().unwrap();
        let (staging, to) = (d.path().join(".t.partial"), d.path().join("t.raw"));
        fs::write(&staging, b"restored").unwrap();
        fs::write(&to, b"theirs").unwrap();
        let e = rename_noreplace(&staging, &to).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Conflict);
        assert_eq!(fs::read(&to).unwrap(), b"theirs");
        // A dangling symlink counts as a file too.
        fs::remove_file(&to).unwrap();
        std::os::unix::fs::symlink(d.path().join("nowhere"), &to).unwrap();
        assert!(rename_noreplace(&staging, &to).is_err());
        assert!(!d.path().join("nowhere").exists());
        fs::remove_file(&to).unwrap();
        rename_noreplace(&staging, &to).unwrap();
        assert_eq!(fs::read(&to).unwrap(), b"restored");
    }

    #[test]
    fn staging_names_carry_their_owner_and_parse_back() {
        let n = staging_name("disk-0.raw");
        let (h, pid, start) = parse_owner(&n).unwrap();
        assert_eq!(h, host_tag());
        assert_eq!(pid, std::process::id());
        assert!(owner_alive(pid, start));
        assert!(tag_alive(&owner_tag()));
        assert!(
            parse_owner(".x.partial-1a2b3c4d").is_none(),
            "old-style names are left alone"
        );
        assert!(parse_owner("a.raw").is_none());
    }

    #[test]
    fn sweep_removes_partials_of_dead_owners_only() {
        let dir = tempfile::tempdir().unwrap();
        // A process that has exited: its pid no longer runs with that start time.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = start_time(pid).unwrap_or(1);
        child.wait().unwrap();
        let dead = dir.path().join(format!(
            ".d.raw.partial-{}-{pid}-{start}-0badf00d",
            host_tag()
        ));
        let other_host = dir
            .path()
            .join(format!(".d.raw.partial-00000000-{pid}-{start}-0badf00d"));
        let mine = dir.path().join(staging_name("d.raw"));
        let unrelated = dir.path().join(".d.raw.partial-1a2b3c4d");
        for p in [&dead, &other_host, &mine, &unrelated] {
            fs::write(p, b"x").unwrap();
        }
        fs::create_dir(dir.path().join(format!(
            ".srv.partial-{}-{pid}-{start}-00000001",
            host_tag()
        )))
        .unwrap();
        let removed = sweep_dir(dir.path()).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!dead.exists());
        assert!(other_host.exists() && mine.exists() && unrelated.exists());
    }
}
