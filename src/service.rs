//! What the service protects and how: resources (a disk or a server, its sources and
//! vault), backup policies (schedule + retention + resources), and the jobs the API and
//! the scheduler queue for them (backup, prune, GC, restore).
//!
//! A resource's backups are identified in the vault by the resource name (its disk id,
//! or its server name). Policy backups are named `autobk_<yyyymmdd-hhmmss>`; retention
//! prunes only `autobk_` backups of the policy's resources, never protected ones, and
//! never one-off (`manualbk_…` or named) backups.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::app::App;
use crate::backup::BackupOptions;
use crate::error::{Error, ErrorKind, Result};
use crate::freeze::FreezeHooks;
use crate::live::LiveOptions;
use crate::manifest::{BackupManifest, ResourceKind};
use crate::policy::{Candidate, Decision, Retention, Schedule, plan};

/// A disk or a server the appliance protects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resource {
    pub name: String,
    pub kind: ResourceKind,
    /// Disk: one source (path, `raw:`/`qcow2:`/`vmdk:` path, NBD URI). Server: image
    /// files as `NAME=PATH` (or PATH), one `qmp:SOCKET`, or one `libvirt:DOMAIN[?uri=URI]`.
    pub sources: Vec<String>,
    pub vault: String,
    /// qmp: node or device names to capture (default: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// qmp: an NBD server QEMU already runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_server: Option<String>,
}

impl Resource {
    pub fn validate(&self, app: &App) -> Result<()> {
        if self.name.is_empty() || self.name.len() > 200 || self.name.chars().any(char::is_control)
        {
            return Err(Error::config(
                "a resource needs a name (1-200 printable characters)",
            ));
        }
        app.catalog().vault(&self.vault)?;
        match (self.kind, self.sources.len()) {
            (_, 0) => Err(Error::config(format!("resource {}: no sources", self.name))),
            (ResourceKind::Disk, n) if n > 1 => Err(Error::config(format!(
                "resource {}: a disk has one source (use kind \"server\" for several)",
                self.name
            ))),
            (ResourceKind::Disk, _) if self.sources[0].starts_with("qmp:") => Err(Error::config(
                format!("resource {}: qmp: sources are servers", self.name),
            )),
            (ResourceKind::Disk, _) if crate::libvirt::is_libvirt(&self.sources[0]) => {
                Err(Error::config(format!(
                    "resource {}: libvirt: sources are servers",
                    self.name
                )))
            }
            (ResourceKind::Server, n)
                if n > 1
                    && self
                        .sources
                        .iter()
                        .any(|s| s.starts_with("qmp:") || crate::libvirt::is_libvirt(s)) =>
            {
                Err(Error::config(format!(
                    "resource {}: a qmp: or libvirt: server has exactly one source",
                    self.name
                )))
            }
            (ResourceKind::Server, _) if crate::libvirt::is_libvirt(&self.sources[0]) => {
                crate::libvirt::LibvirtOptions::parse(&self.sources[0])
                    .map(|_| ())
                    .map_err(|e| e.context_prefix(format!("resource {}", self.name)))
            }
            _ => Ok(()),
        }
    }
}

fn default_true() -> bool {
    true
}

/// A backup policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    /// Cron, 5 fields, or 6 with seconds first.
    pub schedule: String,
    #[serde(default)]
    pub retention: Retention,
    pub resources: Vec<String>,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Policy {
    pub fn validate(&self, app: &App) -> Result<Schedule> {
        if self.name.is_empty() || self.name.len() > 200 {
            return Err(Error::config("a policy needs a name (1-200 characters)"));
        }
        let s = Schedule::parse(&self.schedule).map_err(Error::config)?;
        for r in &self.resources {
            app.catalog()
                .get_named::<Resource>(crate::catalog::Table::Resources, r)?;
        }
        Ok(s)
    }
}

/// `autobk_<yyyymmdd-hhmmss>` for now.
pub fn auto_name() -> String {
    crate::manifest::manual_name().replacen("manualbk_", "autobk_", 1)
}

/// Marks errors of unreachable sources (for alerts).
pub const UNREACHABLE: &str = "source unreachable";

/// Back up `res` (opening its own catalog connection: this runs on a task thread).
pub fn backup_resource(
    data: &Path,
    res: &Resource,
    opts: &BackupOptions,
) -> Result<BackupManifest> {
    let app = App::open(data)?;
    let info = app.vault_info(&res.vault)?;
    if let Some(cap) = info.capacity
        && info.pack_bytes >= cap
    {
        return Err(Error::new(
            ErrorKind::Full,
            format!(
                "vault {} is full: {} bytes stored of its {} byte limit; nothing was written",
                res.vault, info.pack_bytes, cap
            ),
        ));
    }
    probe(res)?;
    let r = backup_kind(&app, res, opts);
    if let Err(e) = &r
        && e.kind() == ErrorKind::Full
    {
        // The pipeline stopped before the limit; what it wrote is unreferenced: free it.
        match app.gc(&res.vault, 50) {
            Ok(s) => tracing::info!(
                vault = res.vault,
                "freed {} bytes of the refused backup",
                s.bytes_freed
            ),
            Err(g) => tracing::warn!(
                vault = res.vault,
                "could not collect the refused backup's data: {g}"
            ),
        }
    }
    r
}

fn backup_kind(app: &App, res: &Resource, opts: &BackupOptions) -> Result<BackupManifest> {
    let mut opts = opts.clone();
    match res.kind {
        ResourceKind::Disk => {
            opts.disk_id = Some(res.name.clone());
            app.backup(&res.sources[0], &res.vault, &opts)
        }
        ResourceKind::Server if crate::libvirt::is_libvirt(&res.sources[0]) => {
            let lv = crate::libvirt::LibvirtOptions::parse(&res.sources[0])?;
            app.backup_libvirt(&res.name, &res.vault, &lv, &opts)
        }
        ResourceKind::Server if res.sources[0].starts_with("qmp:") => {
            let live = LiveOptions {
                qmp: PathBuf::from(&res.sources[0]["qmp:".len()..]),
                nodes: res.nodes.clone(),
                nbd_server: res.nbd_server.clone(),
                ..Default::default()
            };
            app.backup_live(&res.name, &res.vault, &live, &opts)
        }
        ResourceKind::Server => {
            let disks: Vec<(String, String)> = res
                .sources
                .iter()
                .enumerate()
                .map(|(i, s)| named_disk(i, s))
                .collect();
            app.backup_server_files(
                &res.name,
                &res.vault,
                &disks,
                &FreezeHooks::default(),
                &opts,
            )
        }
    }
}

/// `NAME=SPEC` or `SPEC` (named `disk<i>`).
pub fn named_disk(i: usize, arg: &str) -> (String, String) {
    match arg.split_once('=') {
        Some((name, spec))
            if !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !Path::new(arg).exists() =>
        {
            (name.to_string(), spec.to_string())
        }
        _ => (format!("disk{i}"), arg.to_string()),
    }
}

/// Can every source be reached? Errors say `source unreachable: …`.
fn probe(res: &Resource) -> Result<()> {
    for (i, s) in res.sources.iter().enumerate() {
        let (_, spec) = named_disk(i, s);
        let r = if crate::libvirt::is_libvirt(&spec) {
            crate::libvirt::probe(&spec)
        } else if let Some(sock) = spec.strip_prefix("qmp:") {
            std::os::unix::net::UnixStream::connect(sock)
                .map(|_| ())
                .map_err(|e| Error::io(format!("connecting to {sock}"), e))
        } else if crate::nbd::NbdUri::is_nbd(&spec) {
            crate::nbd::NbdUri::parse(&spec)
                .and_then(|u| crate::nbd::NbdClient::connect(&u, &[]).map(|_| ()))
        } else {
            crate::source::open_source(&spec).map(|_| ())
        };
        if let Err(e) = r {
            return Err(e.context_prefix(format!("{UNREACHABLE}: {spec}")));
        }
    }
    Ok(())
}

/// Retention of `policy` over the `autobk_` backups of `resource`; with `apply`, delete
/// what it does not keep. Returns the decisions, newest first.
pub fn prune(
    app: &App,
    resource: &Resource,
    retention: &Retention,
    apply: bool,
) -> Result<Vec<Decision>> {
    let backups = app
        .catalog()
        .backups(Some(&resource.vault), Some(&resource.name))?;
    let mut candidates = Vec::new();
    for b in backups
        .iter()
        .filter(|b| b.manifest.name.starts_with("autobk_"))
    {
        let created = OffsetDateTime::parse(&b.manifest.created, &Rfc3339).map_err(|e| {
            Error::invalid(format!("backup {} has a bad time", b.manifest.id)).with_source(e)
        })?;
        candidates.push(Candidate {
            id: b.manifest.id.clone(),
            created,
            protected: app.catalog().is_protected(&b.manifest.id)?,
        });
    }
    let decisions = plan(retention, &candidates, OffsetDateTime::now_utc());
    if apply {
        for d in decisions.iter().filter(|d| !d.keep) {
            app.delete_backup(&d.id)?;
        }
    }
    Ok(decisions)
}

/// The disk (or server) resource a backup belongs to, by its resource id.
pub fn resource_of(app: &App, name: &str) -> Result<Resource> {
    app.catalog()
        .get_named(crate::catalog::Table::Resources, name)
}
