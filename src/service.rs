//! What the service protects and how: resources (a disk or a server, its sources and
//! vault), policies, and the jobs the API and the scheduler queue for them (backup,
//! prune, GC, verify, restore).
//!
//! Policies have a kind: `backup` (schedule + retention + resources; after retention
//! pruned something, GC runs in the vault unless `gc_after_prune` is false), `verify`
//! (schedule + vaults, optionally a random `sample` percent of their backups and a read
//! rate limit `rate_mb_s`), `gc` (schedule + vaults, `repack_below`) and `drill`
//! (schedule + resources, `check`, `timeout_seconds`: boot the latest backup of each
//! resource, every server resource when none is named; see `drill`) and `replicate`
//! (schedule + `from` and `to` vaults + optional resources + the target's own
//! `retention`; see `replicate`). A field that does
//! not belong to the kind is refused when the policy is saved.
//!
//! Verify and GC run as tasks (`maintenance`: [`submit_verify`], [`submit_gc`]) for the
//! API and the scheduler alike: kind `verify`/`gc`, target the vault, one at a time per
//! vault. A verify that finds damage fails with the `corrupt` kind and names the damaged
//! backups.
//!
//! Live-capture settings of a server resource: `hooks` names a freeze/thaw hook set of
//! the appliance's config file (`[hooks.NAME]`, installed by [`configure`] when the
//! service starts); `qga` is a guest-agent socket (fsfreeze around the instant); `nodes`
//! and `nbd_server` are for `qmp:` sources. A resource never carries a command: a request
//! that tries (`"freeze"`, `"thaw"`) is refused, so an API caller cannot make the
//! service run anything the config file does not name.
//!
//! A resource's backups are identified in the vault by the resource name (its disk id,
//! or its server name). Policy backups are named `autobk_<yyyymmdd-hhmmss>`; retention
//! prunes only `autobk_` backups of the policy's resources, never protected or locked ones
//! (a locked backup is kept with the reason `locked until DATE`, and the task log says so), and
//! never one-off (`manualbk_…` or named) backups.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::app::App;
use crate::backup::BackupOptions;
use crate::config::HookSet;
use crate::error::{Error, ErrorKind, Result};
use crate::freeze::FreezeHooks;
use crate::live::LiveOptions;
use crate::manifest::{BackupManifest, ResourceKind};
use crate::policy::{Candidate, Decision, Retention, Schedule, plan};

mod drill;
mod maintenance;
mod replicate;
pub use drill::{DrillRequest, drill_alert, drill_backup, submit_drill, submit_policy_drills};
pub use maintenance::{
    GcRequest, VerifyRequest, gc_vault, maintenance_alert, submit_gc, submit_verify, verify_report,
    verify_vault,
};
pub use replicate::{ReplicateRequest, replicate_job, submit_replicate};

/// A disk or a server the appliance protects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// Server: the freeze/thaw hook set (`[hooks.NAME]` in the config file) to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<String>,
    /// Server: guest-agent socket; its file systems are frozen around the instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub qga: Option<PathBuf>,
    /// Never accepted: present so that a request carrying a freeze command is refused
    /// with a clear message (commands come from the config file only). Never stored.
    #[serde(default, skip_serializing)]
    #[schema(value_type = Option<Object>)]
    pub freeze: Option<Value>,
    /// Never accepted, like `freeze`.
    #[serde(default, skip_serializing)]
    #[schema(value_type = Option<Object>)]
    pub thaw: Option<Value>,
    /// Fail a backup that cannot be application-consistent instead of storing a
    /// crash-consistent one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_app_consistent: bool,
    /// `nbds://` sources: paths of the CA (and client certificate/key) and the host name
    /// to verify, as `{"ca": PATH, "cert": PATH, "key": PATH, "hostname": NAME}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub nbd_tls: Option<crate::nbd::NbdTlsClient>,
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
        if self.freeze.is_some() || self.thaw.is_some() {
            return Err(Error::config(format!(
                "resource {}: freeze/thaw commands are not accepted through the API; define \
                 them as a hook set in the appliance's config file ([hooks.NAME] freeze = …, \
                 thaw = …) and name it here with \"hooks\": \"NAME\"",
                self.name
            )));
        }
        if let Some(h) = &self.hooks {
            hook_set(h).map_err(|e| e.context_prefix(format!("resource {}", self.name)))?;
        }
        if self.kind == ResourceKind::Disk && (self.hooks.is_some() || self.qga.is_some()) {
            return Err(Error::config(format!(
                "resource {}: hooks and qga apply to servers (kind \"server\"), not to a disk",
                self.name
            )));
        }
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

/// What the service takes from its config file: the hook sets, and whether a backup
/// policy that does not say collects garbage after a prune.
struct Settings {
    hooks: BTreeMap<String, HookSet>,
    gc_after_prune: bool,
    scratch_dir: Option<PathBuf>,
}

/// The settings of the config file the service runs with (see [`configure`]).
static SETTINGS: std::sync::RwLock<Settings> = std::sync::RwLock::new(Settings {
    hooks: BTreeMap::new(),
    gc_after_prune: true,
    scratch_dir: None,
});

fn settings() -> std::sync::RwLockReadGuard<'static, Settings> {
    SETTINGS.read().unwrap_or_else(|e| e.into_inner())
}

/// Install the config file's settings (done once by `serve` before it answers).
pub fn configure(config: &crate::config::Config) {
    *SETTINGS.write().unwrap_or_else(|e| e.into_inner()) = Settings {
        hooks: config.hooks.clone(),
        gc_after_prune: config.gc_after_prune,
        scratch_dir: config.scratch_dir.clone(),
    };
    replicate::configure_remotes(&config.remotes);
}

/// Hook set `name` of the config file.
fn hook_set(name: &str) -> Result<HookSet> {
    let sets = &settings().hooks;
    sets.get(name).cloned().ok_or_else(|| {
        let known: Vec<&str> = sets.keys().map(String::as_str).collect();
        Error::config(format!(
            "no hook set {name:?} in the appliance's config file (known: {}); add \
             [hooks.{name}] with freeze/thaw commands there and restart the service",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    })
}

/// The freeze/thaw steps of `res`: its hook set's commands and its guest agent.
fn freeze_hooks(res: &Resource) -> Result<FreezeHooks> {
    let set = res.hooks.as_deref().map(hook_set).transpose()?;
    Ok(FreezeHooks {
        freeze_script: set.as_ref().and_then(|s| s.freeze.clone()),
        thaw_script: set.as_ref().and_then(|s| s.thaw.clone()),
        qga: res.qga.clone(),
        timeout: set.map(|s| std::time::Duration::from_secs(s.timeout_seconds)),
        require_app_consistent: res.require_app_consistent,
        ..FreezeHooks::default()
    })
}

fn default_true() -> bool {
    true
}

/// What a policy does when it fires.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Back up `resources`, then apply `retention` (and GC after a prune).
    #[default]
    Backup,
    /// Verify `vaults` (all backups, or a `sample` percent), at most `rate_mb_s`.
    Verify,
    /// Collect garbage in `vaults`.
    Gc,
    /// Boot the latest backup of each of `resources` (every server resource when empty)
    /// in a throwaway VM and wait for `check` (recovery drill).
    Drill,
    /// Copy the backups of `resources` (all when empty) from vault `from` to vault `to`,
    /// with `retention` applied on the target (see `replicate`).
    Replicate,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Backup => "backup",
            PolicyKind::Verify => "verify",
            PolicyKind::Gc => "gc",
            PolicyKind::Drill => "drill",
            PolicyKind::Replicate => "replicate",
        }
    }
}

/// A policy: a schedule and what to do then (see the module doc for the kinds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    /// `backup` when absent.
    #[serde(default)]
    pub kind: PolicyKind,
    /// Cron, 5 fields, or 6 with seconds first.
    pub schedule: String,
    /// backup: what to keep.
    #[serde(default)]
    pub retention: Retention,
    /// backup: the resources to back up.
    #[serde(default)]
    pub resources: Vec<String>,
    /// verify, gc: the vaults to work on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vaults: Vec<String>,
    /// verify: percent (1-100) of each vault's backups, drawn at random per run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<u8>,
    /// verify: read at most this many MB (10^6 bytes) per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_mb_s: Option<f64>,
    /// gc: rewrite packs whose live share fell below this percentage (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repack_below: Option<u8>,
    /// backup: collect garbage after retention pruned something (default: the config
    /// file's `[scheduler] gc_after_prune`, true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc_after_prune: Option<bool>,
    /// backup: lock every backup the policy makes for this many days (recorded in the
    /// vault's lock journal: nothing deletes it before then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_days: Option<u32>,
    /// drill: `agent` (default), `console:REGEX` or `port:N`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// drill: seconds from the VM's start to the signal (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<f64>,
    /// replicate: the source vault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// replicate: the target vault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// replicate: a mirror vault on another appliance instead of `to`, by the name of
    /// its `[remote.NAME]` in the config file (no retention: the mirror's own policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_remote: Option<String>,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Policy {
    pub fn validate(&self, app: &App) -> Result<Schedule> {
        if self.name.is_empty() || self.name.len() > 200 {
            return Err(Error::config("a policy needs a name (1-200 characters)"));
        }
        let s = Schedule::parse(&self.schedule).map_err(Error::config)?;
        let kind = self.kind.as_str();
        let refuse = |field: &str, belongs: &str| {
            Err(Error::config(format!(
                "policy {}: \"{field}\" belongs to {belongs} policies, not to a {kind} policy",
                self.name
            )))
        };
        if self.kind != PolicyKind::Drill
            && (self.check.is_some() || self.timeout_seconds.is_some())
        {
            return refuse("check/timeout_seconds", "drill");
        }
        if self.kind != PolicyKind::Replicate
            && (self.from.is_some() || self.to.is_some() || self.to_remote.is_some())
        {
            return refuse("from/to/to_remote", "replicate");
        }
        match self.kind {
            PolicyKind::Replicate => {
                if !self.vaults.is_empty() {
                    return refuse("vaults", "verify and gc");
                }
                if self.gc_after_prune.is_some() || self.lock_days.is_some() {
                    return refuse("gc_after_prune/lock_days", "backup");
                }
                if self.sample.is_some() || self.rate_mb_s.is_some() {
                    return refuse("sample/rate_mb_s", "verify");
                }
                if self.repack_below.is_some() {
                    return refuse("repack_below", "gc");
                }
                let req = self.replicate_request()?;
                req.validate(app)?;
                req.check_retention(Some(&self.retention))?;
            }
            PolicyKind::Drill => {
                if !self.vaults.is_empty() {
                    return refuse("vaults", "verify and gc");
                }
                if self.retention != Retention::default() || self.gc_after_prune.is_some() {
                    return refuse("retention/gc_after_prune", "backup");
                }
                if self.sample.is_some() || self.rate_mb_s.is_some() {
                    return refuse("sample/rate_mb_s", "verify");
                }
                if self.repack_below.is_some() {
                    return refuse("repack_below", "gc");
                }
                for r in &self.resources {
                    app.catalog()
                        .get_named::<Resource>(crate::catalog::Table::Resources, r)?;
                }
                self.drill_request().options()?;
            }
            PolicyKind::Backup => {
                if !self.vaults.is_empty() {
                    return refuse("vaults", "verify and gc");
                }
                if self.sample.is_some() || self.rate_mb_s.is_some() {
                    return refuse("sample/rate_mb_s", "verify");
                }
                if self.repack_below.is_some() {
                    return refuse("repack_below", "gc");
                }
                if self.lock_days.is_some_and(|d| d == 0 || d > 36_500) {
                    return Err(Error::config(format!(
                        "policy {}: lock_days must be between 1 and 36500",
                        self.name
                    )));
                }
                for r in &self.resources {
                    app.catalog()
                        .get_named::<Resource>(crate::catalog::Table::Resources, r)?;
                }
            }
            PolicyKind::Verify | PolicyKind::Gc => {
                if !self.resources.is_empty() || self.retention != Retention::default() {
                    return refuse("resources/retention", "backup");
                }
                if self.gc_after_prune.is_some() {
                    return refuse("gc_after_prune", "backup");
                }
                if self.lock_days.is_some() {
                    return refuse("lock_days", "backup");
                }
                if self.vaults.is_empty() {
                    return Err(Error::config(format!(
                        "policy {}: a {kind} policy needs \"vaults\": [NAME, …]",
                        self.name
                    )));
                }
                for v in &self.vaults {
                    app.catalog().vault(v)?;
                }
                if self.kind == PolicyKind::Verify {
                    if self.repack_below.is_some() {
                        return refuse("repack_below", "gc");
                    }
                    self.verify_request().validate()?;
                } else {
                    if self.sample.is_some() || self.rate_mb_s.is_some() {
                        return refuse("sample/rate_mb_s", "verify");
                    }
                    self.gc_request().validate()?;
                }
            }
        }
        Ok(s)
    }

    /// backup: whether GC follows a prune (the policy's word, else the config file's).
    pub fn gc_after_prune(&self) -> bool {
        self.gc_after_prune
            .unwrap_or_else(|| settings().gc_after_prune)
    }

    /// What a verify policy asks of each of its vaults.
    pub fn verify_request(&self) -> VerifyRequest {
        VerifyRequest {
            sample: self.sample,
            backups: Vec::new(),
            rate_mb_s: self.rate_mb_s,
        }
    }

    /// What a drill policy asks of each drill.
    pub fn drill_request(&self) -> DrillRequest {
        DrillRequest {
            check: self.check.clone(),
            timeout_seconds: self.timeout_seconds,
            ..Default::default()
        }
    }

    /// What a replicate policy asks each run (`from` and one of `to`/`to_remote` are
    /// required).
    pub fn replicate_request(&self) -> Result<ReplicateRequest> {
        let Some(from) = &self.from else {
            return Err(Error::config(format!(
                "policy {}: a replicate policy needs \"from\": VAULT and \"to\": VAULT or \"to_remote\": NAME",
                self.name
            )));
        };
        Ok(ReplicateRequest {
            from: from.clone(),
            to: self.to.clone(),
            to_remote: self.to_remote.clone(),
            backup: None,
            resources: self.resources.clone(),
        })
    }

    /// What a gc policy asks of each of its vaults.
    pub fn gc_request(&self) -> GcRequest {
        GcRequest {
            repack_below: self.repack_below,
        }
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
            opts.nbd_tls = res.nbd_tls.clone();
            app.backup(&res.sources[0], &res.vault, &opts)
        }
        ResourceKind::Server if crate::libvirt::is_libvirt(&res.sources[0]) => {
            let mut lv = crate::libvirt::LibvirtOptions::parse(&res.sources[0])?;
            lv.scratch_dir = settings().scratch_dir.clone();
            app.backup_libvirt(&res.name, &res.vault, &lv, &opts)
        }
        ResourceKind::Server if res.sources[0].starts_with("qmp:") => {
            let live = LiveOptions {
                qmp: PathBuf::from(&res.sources[0]["qmp:".len()..]),
                nodes: res.nodes.clone(),
                nbd_server: res.nbd_server.clone(),
                hooks: freeze_hooks(res)?,
                fleece_dir: settings().scratch_dir.clone(),
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
            opts.nbd_tls = res.nbd_tls.clone();
            app.backup_server_files(&res.name, &res.vault, &disks, &freeze_hooks(res)?, &opts)
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
            crate::nbd::NbdUri::parse(&spec).and_then(|u| {
                crate::nbd::NbdClient::connect_tls(&u, &[], res.nbd_tls.as_ref()).map(|_| ())
            })
        } else {
            crate::source::open_source(&spec).map(|_| ())
        };
        if let Err(e) = r {
            return Err(e
                .context_prefix(format!("{UNREACHABLE}: {spec}"))
                .with_kind(crate::error::ErrorKind::Unreachable));
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
    let mut decisions = plan(retention, &candidates, OffsetDateTime::now_utc());
    // A backup under a retention lock is skipped, never deleted, and the prune goes on:
    // it is kept with the reason `locked until DATE`.
    for d in decisions.iter_mut().filter(|d| !d.keep) {
        let held = match backups.iter().find(|b| b.manifest.id == d.id) {
            Some(b) => app.lock_status(b)?.locked_until(),
            None => None,
        };
        if let Some(until) = held {
            d.keep = true;
            d.reasons.push(format!(
                "locked until {}",
                crate::vault::retention::format_time(until)
            ));
            continue;
        }
        if apply {
            match app.delete_backup(&d.id) {
                Ok(_) => {}
                // Locked or protected meanwhile (a second appliance): skip it.
                Err(e) if e.kind() == ErrorKind::Conflict => {
                    d.keep = true;
                    d.reasons.push(format!("not deleted: {}", e.context()));
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(decisions)
}

/// The disk (or server) resource a backup belongs to, by its resource id.
pub fn resource_of(app: &App, name: &str) -> Result<Resource> {
    app.catalog()
        .get_named(crate::catalog::Table::Resources, name)
}
