//! The scheduler: turns due policies into tasks.
//!
//! A thread wakes every 200 ms, reads the enabled policies from the catalog and, for each
//! one whose next fire time has come, queues its tasks. A backup policy queues one
//! backup task per resource (named `autobk_<time>`; the task runner runs one backup per
//! resource at a time, a second waits); each such task backs up, then prunes that
//! resource with the policy's retention, then collects garbage in the vault when
//! anything was pruned (unless the policy, or else the config file's `[scheduler]
//! gc_after_prune`, says false). A verify or gc policy queues one verify or GC task per
//! vault. A failed task raises `task_failed`; a verify that found damage also raises
//! `vault_damaged` (the service's task-end hooks).
//!
//! Stale backups: at start and then every `alerts::stale::EVERY`, the thread checks
//! that every resource of a backup policy has a good backup within the policy's period
//! plus the grace, and raises `backup_stale` / `backup_fresh` (`alerts::stale`).
//!
//! Missed runs: the last run of every policy is recorded in the catalog. At start, a
//! policy that had a fire time between its last run and now runs once, not once per
//! missed slot; a policy that never ran starts with its next slot.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::app::App;
use crate::backup::BackupOptions;
use crate::catalog::{Catalog, Table};
use crate::error::Result;
use crate::policy::Schedule;
use crate::service::{
    Policy, PolicyKind, auto_name, backup_resource, prune, resource_of, submit_gc, submit_verify,
};
use crate::task::Tasks;

/// Queue the tasks of `policy` now. Returns the task ids.
pub fn run_policy(data: &Path, tasks: &Tasks, policy: &Policy, by: &str) -> Result<Vec<String>> {
    match policy.kind {
        PolicyKind::Backup => run_backup_policy(data, tasks, policy, by),
        PolicyKind::Drill => crate::service::submit_policy_drills(
            &App::open(data)?,
            tasks,
            data,
            &policy.resources,
            &policy.drill_request(),
            by,
        ),
        PolicyKind::Replicate => {
            let app = App::open(data)?;
            let req = policy.replicate_request()?;
            Ok(vec![crate::service::submit_replicate(
                &app,
                tasks,
                data,
                req,
                Some(policy.retention.clone()),
                by,
            )?])
        }
        PolicyKind::Verify | PolicyKind::Gc => {
            let app = App::open(data)?;
            let mut ids = Vec::new();
            for v in &policy.vaults {
                let id = if policy.kind == PolicyKind::Verify {
                    submit_verify(&app, tasks, data, v, policy.verify_request(), by)?
                } else {
                    submit_gc(&app, tasks, data, v, policy.gc_request(), by)?
                };
                ids.push(id);
            }
            Ok(ids)
        }
    }
}

/// Queue one backup (+ retention, + GC after a prune) task per resource of `policy`.
fn run_backup_policy(data: &Path, tasks: &Tasks, policy: &Policy, by: &str) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for r in &policy.resources {
        let (data, policy, r2) = (data.to_path_buf(), policy.clone(), r.clone());
        let id = tasks.submit(
            "backup",
            r,
            Some(r.clone()),
            by,
            Box::new(move |ctx| {
                let app = App::open(&data)?;
                let res = resource_of(&app, &r2)?;
                drop(app);
                let opts = BackupOptions {
                    name: Some(auto_name()),
                    cancel: Some(Arc::clone(&ctx.cancel)),
                    progress: Some(Arc::clone(&ctx.progress)),
                    ..Default::default()
                };
                ctx.log(format!("backing up {} (policy {})", res.name, policy.name));
                let m = backup_resource(&data, &res, &opts)?;
                ctx.log(format!("backup {} ({}) done", m.name, m.id));
                let app = App::open(&data)?;
                lock_for_policy(&app, &policy, &m, ctx)?;
                let decisions = prune(&app, &res, &policy.retention, true)?;
                log_skipped(&decisions, ctx);
                let pruned: Vec<&str> = decisions
                    .iter()
                    .filter(|d| !d.keep)
                    .map(|d| d.id.as_str())
                    .collect();
                if !pruned.is_empty() {
                    ctx.log(format!("retention pruned {}", pruned.join(", ")));
                }
                if !pruned.is_empty() && policy.gc_after_prune() {
                    match app.gc(&res.vault, 50) {
                        Ok(s) => ctx.log(format!("gc freed {} bytes", s.bytes_freed)),
                        // GC needs the vault alone; another backup may hold it. Next time.
                        Err(e) => ctx.log(format!("gc skipped: {e}")),
                    }
                }
                Ok(json!({"backup": m.id, "name": m.name, "pruned": pruned}))
            }),
        )?;
        ids.push(id);
    }
    Ok(ids)
}

/// A backup policy's `lock_days`: lock the backup it just made, and say so in the log.
fn lock_for_policy(
    app: &App,
    policy: &Policy,
    m: &crate::manifest::BackupManifest,
    ctx: &crate::task::TaskCtx,
) -> Result<()> {
    if let Some(days) = policy.lock_days {
        let st = app.lock_backup_days(&m.id, days, &format!("policy {}", policy.name))?;
        if let Some(u) = st.until {
            let u = crate::vault::retention::format_time(u);
            ctx.log(format!("backup {} locked until {u}", m.name));
        }
    }
    Ok(())
}

/// Log the backups retention would have deleted but a lock or protection kept.
fn log_skipped(decisions: &[crate::policy::Decision], ctx: &crate::task::TaskCtx) {
    for d in decisions.iter().filter(|d| d.keep) {
        for r in &d.reasons {
            if r.starts_with("locked until") || r.starts_with("not deleted") {
                ctx.log(format!("retention skipped {}: {r}", d.id));
            }
        }
    }
}

/// What the scheduler needs to check for stale backups: the alerter and `[alerts]
/// stale_grace_minutes`.
pub struct StaleCheck {
    pub alerter: crate::alerts::Alerter,
    pub grace_minutes: Option<f64>,
}

/// The scheduler thread.
pub struct Scheduler {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Scheduler {
    pub fn start(data: &Path, tasks: Tasks, stale: Option<StaleCheck>) -> Scheduler {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, data) = (Arc::clone(&stop), data.to_path_buf());
        let handle = std::thread::spawn(move || run(data, tasks, s, stale));
        Scheduler {
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop();
    }
}

fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

fn run(data: PathBuf, tasks: Tasks, stop: Arc<AtomicBool>, stale: Option<StaleCheck>) {
    // Next fire time per policy (by name, with its schedule text to notice edits);
    // None: the schedule is invalid or never fires, skipped until it is edited.
    let mut next: HashMap<String, (String, Option<OffsetDateTime>)> = HashMap::new();
    let mut first = true;
    let mut last_stale: Option<std::time::Instant> = None;
    // One catalog connection for the thread's life (the loop runs 5 times a second: no
    // open per tick), opened again after an error.
    let mut catalog: Option<Catalog> = None;
    while !stop.load(Ordering::Relaxed) {
        if !first {
            std::thread::sleep(Duration::from_millis(200));
        }
        let cat = match catalog.take().map_or_else(|| Catalog::open(&data), Ok) {
            Ok(c) => catalog.insert(c),
            Err(e) => {
                tracing::error!("scheduler: {e}");
                first = false;
                continue;
            }
        };
        let mut ok = true;
        if let Err(e) = tick(&data, cat, &tasks, &mut next, first) {
            tracing::error!("scheduler: {e}");
            ok = false;
        }
        first = false;
        if let Some(sc) = &stale
            && last_stale.is_none_or(|t| t.elapsed() >= crate::alerts::stale::EVERY)
        {
            last_stale = Some(std::time::Instant::now());
            let now = OffsetDateTime::now_utc();
            if let Err(e) = crate::alerts::stale::check(cat, &sc.alerter, sc.grace_minutes, now) {
                tracing::error!("stale-backup check: {e}");
                ok = false;
            }
        }
        if !ok {
            catalog = None;
        }
    }
}

fn tick(
    data: &Path,
    catalog: &Catalog,
    tasks: &Tasks,
    next: &mut HashMap<String, (String, Option<OffsetDateTime>)>,
    first: bool,
) -> Result<()> {
    let policies: Vec<Policy> = catalog.list_named(Table::Policies)?;
    let now = OffsetDateTime::now_utc();
    next.retain(|name, _| policies.iter().any(|p| &p.name == name && p.enabled));
    for p in policies.iter().filter(|p| p.enabled) {
        if let Some((expr, None)) = next.get(&p.name)
            && *expr == p.schedule
        {
            continue;
        }
        let Ok(schedule) = Schedule::parse(&p.schedule) else {
            // Saved before such schedules were refused: searching it again on every tick
            // would burn a core for nothing.
            tracing::warn!(
                policy = p.name,
                schedule = p.schedule,
                "the schedule is invalid or never fires; skipped until it is changed"
            );
            next.insert(p.name.clone(), (p.schedule.clone(), None));
            continue;
        };
        let due = match next.get(&p.name) {
            Some((expr, Some(at))) if *expr == p.schedule => *at <= now,
            _ => {
                // New to this process (or edited): a missed slot since the last run
                // runs once, at start only.
                let last = catalog
                    .policy_last_run(&p.name)?
                    .and_then(|s| parse_time(&s));
                let missed = first && last.is_some_and(|l| schedule.missed(l, now).is_some());
                if !missed {
                    let at = schedule.next_after(now);
                    next.insert(p.name.clone(), (p.schedule.clone(), at));
                    continue;
                }
                tracing::info!(
                    policy = p.name,
                    "running a slot missed while the appliance was down"
                );
                true
            }
        };
        if !due {
            continue;
        }
        catalog.set_policy_last_run(&p.name, &crate::manifest::now_rfc3339())?;
        if let Err(e) = run_policy(data, tasks, p, "scheduler") {
            tracing::error!(policy = p.name, "queueing backups failed: {e}");
        }
        next.insert(
            p.name.clone(),
            (p.schedule.clone(), schedule.next_after(now)),
        );
    }
    Ok(())
}
