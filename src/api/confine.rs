//! Least privilege for API callers: the host paths, sockets and NBD servers a request
//! may name (`[paths]` in the config file; see [`crate::config::PathsConfig`]).
//!
//! - A source file must lie under one of `sources` (default `<data>/images`); a new
//!   restore or export target under one of `restore_to` (default `<data>/restored`;
//!   not `<data>/restores`, which holds the records of running restores). Missing
//!   directories are created (`0700`) when the service starts.
//! - `nbd://`/`nbds://` sources and restore targets only to hosts in `nbd_hosts`;
//!   `nbd+unix://` sockets under `sources`; `qmp:` and guest-agent sockets under
//!   `qmp_sockets`; `libvirt:` specs listed in `libvirt_domains`. All default to none.
//! - The CA, certificate and key files of a restore's `nbd_tls` under one of `nbd_tls`
//!   (default `<data>/nbd-tls`; never the appliance's own `<data>/tls`).
//!
//! Resolution: the path must be absolute and hold no `..`; then it is canonicalized
//! (every symlink followed; for a target that does not exist yet, its parent) and the
//! result must lie under a canonicalized root, so a symlink that points out of a root is
//! refused; an existing symlink as a restore target is refused outright. Canonicalizing
//! only looks at directory entries and links (lstat/readlink): a refused file is never
//! opened or read. The restore then creates its target exclusively (a staging file
//! renamed with `RENAME_NOREPLACE`), so a file that appears meanwhile is never replaced.
//! What this does not cover: a local user who can write into an allowed directory and
//! swaps a component for a symlink between the check and the open.
//!
//! Refusals: `403` for something outside what is allowed, `400` for a malformed path.
//! The CLI in local mode (root on the appliance) is not confined.

use std::path::{Component, Path, PathBuf};

use axum::http::StatusCode;

use super::ApiError;
use crate::config::PathsConfig;
use crate::error::{Error, Result};
use crate::nbd::NbdUri;
use crate::nbd::uri::Transport;

/// The confinement the service runs with.
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    sources: Vec<PathBuf>,
    restore_to: Vec<PathBuf>,
    nbd_hosts: Vec<String>,
    qmp_sockets: Vec<PathBuf>,
    libvirt_domains: Vec<String>,
    nbd_tls: Vec<PathBuf>,
}

fn forbidden(msg: String) -> ApiError {
    ApiError(StatusCode::FORBIDDEN, msg)
}

fn bad(msg: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg)
}

/// Canonical form of root `d` (created `0700` first when missing).
fn root(d: &Path) -> Result<PathBuf> {
    crate::restore::partial::create_private_dir(d)?;
    std::fs::canonicalize(d).map_err(|e| {
        Error::io(
            format!(
                "[paths]: resolving {} (create it or fix the config)",
                d.display()
            ),
            e,
        )
    })
}

impl Confinement {
    /// The confinement of `cfg` on data dir `data`; default roots are created.
    pub fn new(cfg: &PathsConfig, data: &Path) -> Result<Confinement> {
        let roots = |given: &Option<Vec<PathBuf>>, default: &str| -> Result<Vec<PathBuf>> {
            match given {
                Some(dirs) => dirs.iter().map(|d| root(d)).collect(),
                None => Ok(vec![root(&data.join(default))?]),
            }
        };
        Ok(Confinement {
            sources: roots(&cfg.sources, "images")?,
            restore_to: roots(&cfg.restore_to, "restored")?,
            nbd_hosts: cfg.nbd_hosts.clone(),
            // A socket may be named itself: keep the entries as given when they do not
            // resolve yet (QEMU not running).
            qmp_sockets: cfg
                .qmp_sockets
                .iter()
                .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()))
                .collect(),
            libvirt_domains: cfg.libvirt_domains.clone(),
            nbd_tls: roots(&cfg.nbd_tls, "nbd-tls")?,
        })
    }

    /// May a restore onto `nbds://` use these CA, certificate and key files?
    pub fn check_nbd_tls(
        &self,
        tls: &crate::nbd::NbdTlsClient,
    ) -> std::result::Result<(), ApiError> {
        for (what, p) in [
            ("CA", &tls.ca),
            ("certificate", &tls.cert),
            ("key", &tls.key),
        ] {
            if let Some(p) = p {
                under(p, &self.nbd_tls, &format!("nbd_tls {what} file"), "nbd_tls")?;
            }
        }
        Ok(())
    }

    /// May a resource read `spec` (one entry of its `sources`, `NAME=` already cut)?
    pub fn check_source(&self, spec: &str) -> std::result::Result<(), ApiError> {
        if NbdUri::is_nbd(spec) {
            return self.check_nbd(spec, "source");
        }
        if let Some(sock) = spec.strip_prefix("qmp:") {
            return self.check_socket(Path::new(sock), "qmp socket");
        }
        if let Some(rest) = spec.strip_prefix("libvirt:") {
            if self.libvirt_domains.iter().any(|d| d == "*" || d == rest) {
                return Ok(());
            }
            return Err(forbidden(format!(
                "source {spec}: libvirt domains are not allowed through the API unless listed \
                 in [paths] libvirt_domains of the appliance's config file"
            )));
        }
        let (_, path) = crate::source::split_spec(spec);
        under(Path::new(path), &self.sources, "source", "sources")
    }

    /// May a guest-agent socket be named?
    pub fn check_qga(&self, sock: &Path) -> std::result::Result<(), ApiError> {
        self.check_socket(sock, "guest-agent socket")
    }

    /// May a restore write to `to` (a new file or directory, or an NBD export)?
    pub fn check_target(&self, to: &str, overwrite: bool) -> std::result::Result<(), ApiError> {
        if NbdUri::is_nbd(to) {
            return self.check_nbd(to, "restore target");
        }
        let p = Path::new(to);
        lexical(p, "restore target")?;
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_symlink() => Err(forbidden(format!(
                "restore target {to} is a symbolic link: a restore never writes through one"
            ))),
            Ok(m) if m.is_file() && overwrite => {
                under(p, &self.restore_to, "restore target", "restore_to")
            }
            Ok(m) if !m.is_dir() => {
                under(p, &self.restore_to, "restore target", "restore_to")?;
                Err(ApiError(
                    StatusCode::CONFLICT,
                    format!(
                        "restore target {to} already exists; a restore never overwrites a \
                         file: name a new one"
                    ),
                ))
            }
            Ok(_) => under(p, &self.restore_to, "restore target", "restore_to"),
            Err(_) => {
                let parent = p
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .ok_or_else(|| {
                        bad(format!("restore target {to}: name a file in a directory"))
                    })?;
                under(parent, &self.restore_to, "restore target", "restore_to")
            }
        }
    }

    fn check_socket(&self, sock: &Path, what: &str) -> std::result::Result<(), ApiError> {
        lexical(sock, what)?;
        let real = std::fs::canonicalize(sock).unwrap_or_else(|_| sock.to_path_buf());
        if self.qmp_sockets.iter().any(|r| real.starts_with(r)) {
            return Ok(());
        }
        Err(forbidden(format!(
            "{what} {}: not under [paths] qmp_sockets of the appliance's config file \
             (allowed: {})",
            sock.display(),
            list(&self.qmp_sockets)
        )))
    }

    fn check_nbd(&self, uri: &str, what: &str) -> std::result::Result<(), ApiError> {
        let u = NbdUri::parse(uri).map_err(|e| bad(e.to_string()))?;
        match &u.transport {
            Transport::Unix(sock) => under(sock, &self.sources, what, "sources"),
            Transport::Tcp { host, port } => {
                let hp = format!("{host}:{port}");
                if self
                    .nbd_hosts
                    .iter()
                    .any(|h| h == "*" || *h == hp || h == host)
                {
                    return Ok(());
                }
                Err(forbidden(format!(
                    "{what} {uri}: NBD server {hp} is not in [paths] nbd_hosts of the \
                     appliance's config file (allowed: {})",
                    if self.nbd_hosts.is_empty() {
                        "none".to_string()
                    } else {
                        self.nbd_hosts.join(", ")
                    }
                )))
            }
        }
    }
}

fn list(roots: &[PathBuf]) -> String {
    if roots.is_empty() {
        return "none".into();
    }
    roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Absolute, without `..` (and without NUL, which no path holds).
fn lexical(p: &Path, what: &str) -> std::result::Result<(), ApiError> {
    if !p.is_absolute() {
        return Err(bad(format!(
            "{what} {}: give an absolute path",
            p.display()
        )));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(forbidden(format!(
            "{what} {}: a path with \"..\" is refused",
            p.display()
        )));
    }
    Ok(())
}

/// `p` with every symlink of its longest existing ancestor followed.
fn resolve(p: &Path) -> PathBuf {
    let mut tail = Vec::new();
    let mut cur = p;
    loop {
        if let Ok(r) = std::fs::canonicalize(cur) {
            return tail.iter().rev().fold(r, |acc: PathBuf, c| acc.join(c));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                tail.push(name.to_os_string());
                cur = parent;
            }
            _ => return p.to_path_buf(),
        }
    }
}

/// Does `p` (resolved) lie under one of `roots` (`key` of `[paths]`)?
fn under(p: &Path, roots: &[PathBuf], what: &str, key: &str) -> std::result::Result<(), ApiError> {
    lexical(p, what)?;
    // A path that does not exist (yet: a disk not created, a source gone) is resolved
    // through its longest existing ancestor; the rest holds no link to follow. A backup
    // of a missing source then fails as unreachable, like any other.
    let real = resolve(p);
    if roots.iter().any(|r| real.starts_with(r)) {
        return Ok(());
    }
    Err(forbidden(format!(
        "{what} {} is outside the directories API callers may use ([paths] {key} of the \
         appliance's config file: {})",
        p.display(),
        list(roots)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(dir: &Path) -> Confinement {
        let cfg = PathsConfig {
            sources: Some(vec![dir.join("img")]),
            restore_to: Some(vec![dir.join("out")]),
            nbd_hosts: vec!["nbd.example:10809".into()],
            ..Default::default()
        };
        std::fs::create_dir_all(dir.join("img")).unwrap();
        std::fs::create_dir_all(dir.join("out")).unwrap();
        Confinement::new(&cfg, dir).unwrap()
    }

    #[test]
    fn symlinks_out_dotdot_and_other_hosts_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let c = conf(t.path());
        std::fs::write(t.path().join("img/a.raw"), b"x").unwrap();
        std::fs::write(t.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(t.path().join("secret"), t.path().join("img/out")).unwrap();
        let img = t.path().join("img");
        assert!(
            c.check_source(&img.join("a.raw").display().to_string())
                .is_ok()
        );
        assert!(
            c.check_source(&format!("raw:{}", img.join("a.raw").display()))
                .is_ok()
        );
        for s in [
            img.join("out").display().to_string(),
            format!("{}/../secret", img.display()),
            "/proc/self/environ".into(),
            "a.raw".into(),
            "nbd://other:10809/x".into(),
            "qmp:/run/qmp.sock".into(),
            "libvirt:web".into(),
        ] {
            let e = c.check_source(&s).unwrap_err();
            assert!(
                e.status == StatusCode::FORBIDDEN || e.status == StatusCode::BAD_REQUEST,
                "{s}"
            );
        }
        assert!(c.check_source("nbd://nbd.example:10809/x").is_ok());
        let out = t.path().join("out");
        assert!(
            c.check_target(&out.join("new.raw").display().to_string(), false)
                .is_ok()
        );
        std::os::unix::fs::symlink("/etc/passwd", out.join("l.raw")).unwrap();
        assert!(
            c.check_target(&out.join("l.raw").display().to_string(), true)
                .is_err()
        );
        assert!(
            c.check_target(&img.join("new.raw").display().to_string(), false)
                .is_err()
        );
        // An existing file: refused (409) unless overwrite, and then only under a root.
        std::fs::write(out.join("old.raw"), b"x").unwrap();
        std::fs::write(img.join("old.raw"), b"x").unwrap();
        let old = out.join("old.raw").display().to_string();
        assert_eq!(
            c.check_target(&old, false).unwrap_err().status,
            StatusCode::CONFLICT
        );
        assert!(c.check_target(&old, true).is_ok());
        let elsewhere = img.join("old.raw").display().to_string();
        assert_eq!(
            c.check_target(&elsewhere, true).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn nbd_tls_files_only_from_their_directory() {
        let t = tempfile::tempdir().unwrap();
        let c = conf(t.path());
        let ok = t.path().join("nbd-tls");
        std::fs::write(ok.join("ca.pem"), b"x").unwrap();
        std::fs::create_dir_all(t.path().join("tls")).unwrap();
        std::fs::write(t.path().join("tls/key.pem"), b"x").unwrap();
        std::os::unix::fs::symlink(t.path().join("tls/key.pem"), ok.join("link.pem")).unwrap();
        let tls = |ca: PathBuf, key: Option<PathBuf>| crate::nbd::NbdTlsClient {
            ca: Some(ca),
            key,
            ..Default::default()
        };
        assert!(c.check_nbd_tls(&tls(ok.join("ca.pem"), None)).is_ok());
        for bad in [
            tls(t.path().join("tls/key.pem"), None),
            tls(ok.join("link.pem"), None),
            tls(ok.join("ca.pem"), Some("/etc/shadow".into())),
            tls(ok.join("../tls/key.pem"), None),
            tls("rel/ca.pem".into(), None),
        ] {
            let e = c.check_nbd_tls(&bad).unwrap_err();
            assert!(
                e.status == StatusCode::FORBIDDEN || e.status == StatusCode::BAD_REQUEST,
                "{bad:?}: {}",
                e.message
            );
        }
    }
}
