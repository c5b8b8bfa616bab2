//! Verify and GC of a vault as tasks, for the API and the scheduler alike: the requests
//! (`POST /vaults/{name}/verify` and `/gc` bodies, and what verify/gc policies ask), the
//! jobs (progress and cancel through the task, verify's read rate limit), and the alert
//! a verify's damage calls for.
//!
//! Tasks: kind `verify`/`gc`, target the vault, lock key `vault:<name>` (one verify or
//! GC per vault at a time). A verify that finds damage fails with `Corrupt`; its error
//! names the damaged backups and its log every damaged place.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::app::App;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::BackupManifest;
use crate::task::{TaskCtx, Tasks};
use crate::vault::gc::gc_with_progress;
use crate::vault::verify::{Pace, VerifyReport, verify_paced};

/// What `POST /vaults/{name}/verify` (and a verify policy) asks for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Verify a random N percent (1-100) of the vault's backups, at least one, reading
    /// only the packs they reference. Absent or 100 (and no `backups`): every pack of
    /// the vault, also blobs no backup references.
    #[serde(default)]
    pub sample: Option<u8>,
    /// Verify only these backups (ids, unique id prefixes or names).
    #[serde(default)]
    pub backups: Vec<String>,
    /// Read at most this many MB (10^6 bytes) per second.
    #[serde(default)]
    pub rate_mb_s: Option<f64>,
}

impl VerifyRequest {
    /// The rate limit in bytes per second (at least 1: a tiny rate is still a limit).
    pub fn bytes_per_second(&self) -> Option<u64> {
        self.rate_mb_s.map(|r| ((r * 1e6) as u64).max(1))
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(p) = self.sample
            && !(1..=100).contains(&p)
        {
            return Err(Error::config(format!(
                "verify: sample is a percentage of the backups, 1-100, got {p}"
            )));
        }
        if self.sample.is_some() && !self.backups.is_empty() {
            return Err(Error::config(
                "verify: give either a sample percentage or a list of backups, not both",
            ));
        }
        if let Some(r) = self.rate_mb_s
            && !(r.is_finite() && r > 0.0)
        {
            return Err(Error::config(format!(
                "verify: rate_mb_s must be a positive number of MB per second, got {r}"
            )));
        }
        Ok(())
    }
}

/// What `POST /vaults/{name}/gc` (and a gc policy) asks for: the CLI's options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    /// Rewrite packs whose live share fell below this percentage (default 50).
    #[serde(default)]
    pub repack_below: Option<u8>,
}

impl GcRequest {
    pub fn validate(&self) -> Result<()> {
        match self.repack_below {
            Some(p) if p > 100 => Err(Error::config(format!(
                "gc: repack_below is a percentage, 0-100, got {p}"
            ))),
            _ => Ok(()),
        }
    }
}

/// The lock key of maintenance tasks on vault `name`: one verify or GC at a time.
fn vault_lock(name: &str) -> String {
    format!("vault:{name}")
}

/// The backups of `vault` that `req` names (None: the whole vault, every pack).
fn chosen_backups(
    app: &App,
    vault: &str,
    req: &VerifyRequest,
) -> Result<Option<Vec<BackupManifest>>> {
    if !req.backups.is_empty() {
        let mut out = Vec::new();
        for b in &req.backups {
            let e = app.find_backup(b)?;
            if e.vault != vault {
                return Err(Error::config(format!(
                    "backup {b} is in vault {}, not {vault}",
                    e.vault
                )));
            }
            out.push(e.manifest);
        }
        return Ok(Some(out));
    }
    match req.sample {
        Some(p) if p < 100 => {
            let all = app.catalog().backups(Some(vault), None)?;
            let n = (all.len() * usize::from(p))
                .div_ceil(100)
                .max(1)
                .min(all.len());
            let mut rng = rand::thread_rng();
            let picked = rand::seq::index::sample(&mut rng, all.len(), n);
            Ok(Some(
                picked
                    .into_iter()
                    .map(|i| all[i].manifest.clone())
                    .collect(),
            ))
        }
        _ => Ok(None),
    }
}

/// Verify `vault` as `req` asks (the CLI's local `verify` and the task alike). Returns
/// the report and the backups verified (None: the whole vault).
pub fn verify_report(
    app: &App,
    vault: &str,
    req: &VerifyRequest,
    threads: usize,
    pace: Pace<'_>,
) -> Result<(VerifyReport, Option<Vec<BackupManifest>>)> {
    req.validate()?;
    let chosen = chosen_backups(app, vault, req)?;
    let v = app.open_vault(vault)?;
    let report = verify_paced(&v, chosen.as_deref(), threads, pace)?;
    Ok((report, chosen))
}

/// Verify `vault` as `req` asks, reporting progress and honouring cancel through `ctx`.
/// Damage fails with `Corrupt`, naming the damaged backups (the log lists each place).
pub fn verify_vault(app: &App, vault: &str, req: &VerifyRequest, ctx: &TaskCtx) -> Result<Value> {
    ctx.log(format!("verifying vault {vault} ({req:?})"));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pace = Pace {
        bytes_total: Some(&ctx.progress.bytes_total),
        bytes_done: Some(&ctx.progress.bytes_done),
        cancel: Some(&ctx.cancel),
        bytes_per_second: req.bytes_per_second(),
    };
    let t = std::time::Instant::now();
    let (report, chosen) = verify_report(app, vault, req, threads, pace)?;
    if let Some(ms) = &chosen {
        ctx.log(format!(
            "verified backups: {}",
            ms.iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let seconds = t.elapsed().as_secs_f64();
    for b in &report.corrupt_blobs {
        ctx.log(format!(
            "corrupt blob {} in pack {}: {}",
            b.digest, b.pack, b.error
        ));
    }
    for d in &report.damage {
        let at = d
            .offset
            .map(|o| format!(" at offset {o}"))
            .unwrap_or_default();
        ctx.log(format!(
            "damaged: backup {} ({}) disk {}{at}: {}",
            d.backup_name, d.backup_id, d.disk, d.what
        ));
    }
    for p in &report.lock_journal {
        ctx.log(format!("lock journal damaged: {p}"));
    }
    if !report.is_clean() {
        let mut hurt: Vec<String> = report
            .damage
            .iter()
            .map(|d| format!("{} ({})", d.backup_name, d.backup_id))
            .collect();
        hurt.dedup();
        let hurt = if hurt.is_empty() {
            "no backup references them".to_string()
        } else {
            format!("damaged backups: {}", hurt.join(", "))
        };
        let journal = if report.lock_journal.is_empty() {
            String::new()
        } else {
            format!(
                " The lock journal is damaged ({}); restore it from a copy of the vault.",
                report.lock_journal.join("; ")
            )
        };
        return Err(Error::corrupt(format!(
            "vault {vault}: verify found {} corrupt blob(s); {hurt}. Restore those from another \
             copy or back the resources up again (a new backup stores good copies); see the \
             task log for every damaged place.{journal}",
            report.corrupt_blobs.len()
        )));
    }
    let mut out = serde_json::to_value(&report)
        .map_err(|e| Error::invalid("verify report").with_source(e))?;
    out["vault"] = json!(vault);
    out["seconds"] = json!(seconds);
    out["verified_backups"] = match &chosen {
        None => json!("all"),
        Some(ms) => json!(ms.iter().map(|m| &m.id).collect::<Vec<_>>()),
    };
    ctx.log(format!(
        "verified {} packs, {} blobs, {} bytes in {seconds:.1}s: all good",
        report.packs_checked, report.blobs_checked, report.bytes_checked
    ));
    Ok(out)
}

/// Collect garbage in `vault` as `req` asks.
pub fn gc_vault(app: &App, vault: &str, req: &GcRequest, ctx: &TaskCtx) -> Result<Value> {
    req.validate()?;
    let repack = req.repack_below.unwrap_or(50);
    ctx.log(format!(
        "gc of vault {vault}: marking live blobs, sweeping packs (repack below {repack}%)"
    ));
    let progress = (&ctx.progress.bytes_total, &ctx.progress.bytes_done);
    let stats = gc_with_progress(&app.open_vault(vault)?, repack, Some(progress))?;
    ctx.log(format!(
        "gc freed {} bytes: deleted {} packs, rewrote {}",
        stats.bytes_freed, stats.packs_deleted, stats.packs_rewritten
    ));
    let mut out =
        serde_json::to_value(&stats).map_err(|e| Error::invalid("gc stats").with_source(e))?;
    out["vault"] = json!(vault);
    Ok(out)
}

/// Queue a verify of `vault` (checked now: the vault, the request and the backups it
/// names). Returns the task id.
pub fn submit_verify(
    app: &App,
    tasks: &Tasks,
    data: &Path,
    vault: &str,
    req: VerifyRequest,
    by: &str,
) -> Result<String> {
    req.validate()?;
    app.catalog().vault(vault)?;
    chosen_backups(app, vault, &req)?;
    let (data, name) = (data.to_path_buf(), vault.to_string());
    tasks.submit(
        "verify",
        vault,
        Some(vault_lock(vault)),
        by,
        Box::new(move |ctx| verify_vault(&App::open(&data)?, &name, &req, ctx)),
    )
}

/// Queue a GC of `vault` (checked now). Returns the task id.
pub fn submit_gc(
    app: &App,
    tasks: &Tasks,
    data: &Path,
    vault: &str,
    req: GcRequest,
    by: &str,
) -> Result<String> {
    req.validate()?;
    app.catalog().vault(vault)?;
    let (data, name) = (data.to_path_buf(), vault.to_string());
    tasks.submit(
        "gc",
        vault,
        Some(vault_lock(vault)),
        by,
        Box::new(move |ctx| gc_vault(&App::open(&data)?, &name, &req, ctx)),
    )
}

/// The alert a finished task calls for beyond `task_failed`: a verify that found damage
/// raises `vault_damaged` for its vault, naming the damaged backups and places in its
/// details (read back from the `damaged:` lines [`verify_vault`] logs); a failed drill
/// `drill_failed` for its resource.
pub fn maintenance_alert(
    t: &crate::task::TaskInfo,
) -> Option<(
    crate::config::AlertKind,
    String,
    String,
    crate::alerts::AlertDetails,
)> {
    let task = Some(t.id.clone());
    if let Some((k, subject, msg)) = super::drill::drill_alert(t) {
        let details = crate::alerts::AlertDetails {
            resource: Some(subject.clone()),
            task,
            ..Default::default()
        };
        return Some((k, subject, msg, details));
    }
    (t.kind == "verify"
        && t.state == crate::task::TaskState::Failed
        && t.error_kind == Some(ErrorKind::Corrupt))
    .then(|| {
        let damaged: Vec<Value> = t.log.iter().filter_map(|l| damage_of_line(l)).collect();
        let details = crate::alerts::AlertDetails {
            vault: Some(t.target.clone()),
            task,
            damaged: Some(Value::Array(damaged)),
            ..Default::default()
        };
        (
            crate::config::AlertKind::VaultDamaged,
            t.target.clone(),
            t.error.clone().unwrap_or_default(),
            details,
        )
    })
}

/// One `damaged: backup NAME (ID) disk DISK[ at offset N]: WHAT` log line of
/// [`verify_vault`] as `{"backup", "backup_name", "disk", "offset", "problem"}` (the
/// task log may carry a time prefix before `damaged:`).
fn damage_of_line(line: &str) -> Option<Value> {
    let rest = line.split_once("damaged: backup ")?.1;
    let (name, rest) = rest.split_once(" (")?;
    let (id, rest) = rest.split_once(") disk ")?;
    let (place, what) = rest.split_once(": ")?;
    let (disk, offset) = match place.split_once(" at offset ") {
        Some((d, o)) => (d, o.parse::<u64>().ok()),
        None => (place, None),
    };
    Some(serde_json::json!({
        "backup": id, "backup_name": name, "disk": disk, "offset": offset, "problem": what,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> std::result::Result<(), String> {
        let r: VerifyRequest = serde_json::from_str(json).map_err(|e| e.to_string())?;
        r.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn a_damaged_line_of_the_verify_log_becomes_a_damage_record() {
        let v = damage_of_line(
            "2026-11-28T23:50:00Z damaged: backup autobk_1 (abc) disk d0 at offset 65536: chunk x corrupt: bad",
        )
        .unwrap();
        assert_eq!(v["backup"], "abc");
        assert_eq!(v["backup_name"], "autobk_1");
        assert_eq!(v["disk"], "d0");
        assert_eq!(v["offset"], 65536);
        assert_eq!(v["problem"], "chunk x corrupt: bad");
        let v = damage_of_line("t damaged: backup b (i) disk d1: index page gone").unwrap();
        assert!(v["offset"].is_null() && v["disk"] == "d1", "{v}");
        assert!(damage_of_line("t lock journal damaged: chain broken").is_none());
    }

    #[test]
    fn verify_requests_are_checked() {
        for ok in [
            "{}",
            r#"{"sample":1}"#,
            r#"{"sample":100,"rate_mb_s":0.5}"#,
            r#"{"backups":["x"]}"#,
        ] {
            assert!(req(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            (r#"{"sample":0}"#, "1-100"),
            (r#"{"sample":101}"#, "1-100"),
            (r#"{"sample":5,"backups":["x"]}"#, "not both"),
            (r#"{"rate_mb_s":0}"#, "positive"),
            (r#"{"rate_mb_s":-3}"#, "positive"),
            (r#"{"rate":3}"#, "unknown field"),
        ] {
            let e = req(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
        let tiny = VerifyRequest {
            rate_mb_s: Some(1e-9),
            ..Default::default()
        };
        assert_eq!(
            tiny.bytes_per_second(),
            Some(1),
            "a tiny rate is still a limit"
        );
    }

    #[test]
    fn gc_requests_are_checked() {
        let r = |p| GcRequest { repack_below: p }.validate();
        assert!(r(None).is_ok() && r(Some(0)).is_ok() && r(Some(100)).is_ok());
        assert_eq!(r(Some(101)).unwrap_err().kind(), ErrorKind::Config);
    }
}
