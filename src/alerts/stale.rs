//! `backup_stale` and `backup_fresh`: the check the scheduler runs at start and then
//! every [`EVERY`].
//!
//! Every enabled backup policy watches each of its resources. A resource is late when
//! a run of the policy fell due more than the grace ago and no good backup came after
//! it: the policy has a fire time after the resource's newest backup in its vault (a
//! backup exists only once its manifest is written, so every backup in the catalog is a
//! good one) — or, if it has none, after the moment the check started watching it — and
//! at least the grace before now. For a regular schedule that is "no good backup within
//! the period plus the grace"; for an irregular one (weekdays only) a weekend is not
//! taken for a missed run. The period is the time between the policy's next two fire
//! times; the grace is `[alerts] stale_grace_minutes`, by default half the period and at
//! least 10 minutes (the console's RPO column marks "late" with the same default grace).
//!
//! One `backup_stale` per episode: the episode is recorded in the catalog
//! (`stale_watch.stale_since`) when the alert is raised, so neither the next check nor
//! a restart raises it again. When the resource is no longer late (a good backup
//! arrived) the episode closes with `backup_fresh`. A pair that stops being watched
//! (policy deleted or disabled, resource unbound) is forgotten without an event.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{AlertDetails, Alerter};
use crate::catalog::{Catalog, LastBackup, StaleWatch, Table};
use crate::config::AlertKind;
use crate::error::Result;
use crate::policy::Schedule;

/// How often the scheduler runs the check.
pub const EVERY: Duration = Duration::from_secs(2);

/// The fields of a stored policy the check reads.
#[derive(Deserialize)]
struct PolicyView {
    name: String,
    #[serde(default)]
    kind: Option<String>,
    schedule: String,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

/// The fields of a stored resource the check reads.
#[derive(Deserialize)]
struct ResourceView {
    name: String,
    vault: String,
}

/// The time between the next two fire times of `schedule` after `now`.
pub fn period_of(schedule: &Schedule, now: OffsetDateTime) -> Option<Duration> {
    let a = schedule.next_after(now)?;
    let b = schedule.next_after(a)?;
    Duration::try_from(b - a).ok()
}

/// The grace past the period: the configured minutes, or half the period and at least
/// 10 minutes.
pub fn grace_of(period: Duration, grace_minutes: Option<f64>) -> Duration {
    match grace_minutes {
        Some(m) => Duration::from_secs_f64(m * 60.0),
        None => (period / 2).max(Duration::from_secs(600)),
    }
}

fn parse(t: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(t, &Rfc3339).ok()
}

fn fmt(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        7200..172_800 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

/// Run the check once at `now`.
pub fn check(
    cat: &Catalog,
    alerter: &Alerter,
    grace_minutes: Option<f64>,
    now: OffsetDateTime,
) -> Result<()> {
    let policies: Vec<PolicyView> = cat.list_named(Table::Policies)?;
    let resources: HashMap<String, String> = cat
        .list_named::<ResourceView>(Table::Resources)?
        .into_iter()
        .map(|r| (r.name, r.vault))
        .collect();
    let mut left: HashMap<(String, String), StaleWatch> = cat
        .stale_watches()?
        .into_iter()
        .map(|w| ((w.resource.clone(), w.policy.clone()), w))
        .collect();
    let now_s = fmt(now);
    for p in policies
        .iter()
        .filter(|p| p.enabled && p.kind.as_deref().is_none_or(|k| k == "backup"))
    {
        let Ok(schedule) = Schedule::parse(&p.schedule) else {
            continue;
        };
        let Some(period) = period_of(&schedule, now) else {
            continue;
        };
        let grace = grace_of(period, grace_minutes);
        for r in &p.resources {
            let Some(vault) = resources.get(r) else {
                continue;
            };
            let w = match left.remove(&(r.clone(), p.name.clone())) {
                Some(w) => w,
                None => {
                    cat.watch_stale(r, &p.name, &now_s)?;
                    StaleWatch {
                        resource: r.clone(),
                        policy: p.name.clone(),
                        watched_since: now_s.clone(),
                        stale_since: None,
                    }
                }
            };
            let last = cat.last_backup(vault, r)?;
            let since = parse(&w.watched_since).unwrap_or(now);
            let reference = last
                .as_ref()
                .and_then(|b| parse(&b.created))
                .map_or(since, |t| t.max(since));
            let age = Duration::try_from(now - reference).unwrap_or_default();
            let late = schedule.missed(reference, now - grace).is_some();
            let details = AlertDetails {
                resource: Some(r.clone()),
                vault: Some(vault.clone()),
                backup: last.as_ref().map(|b| b.id.clone()),
                backup_name: last.as_ref().map(|b| b.name.clone()),
                policy: Some(p.name.clone()),
                backup_time: last.as_ref().map(|b| b.created.clone()),
                period_seconds: Some(period.as_secs()),
                ..Default::default()
            };
            match (late, &w.stale_since) {
                (true, None) => {
                    let msg = stale_message(r, &p.name, last.as_ref(), age, period, grace);
                    alerter.raise_with(AlertKind::BackupStale, r, &msg, &details)?;
                    cat.set_stale(r, &p.name, Some(&now_s))?;
                }
                (false, Some(at)) => {
                    let msg = match &last {
                        Some(b) => format!(
                            "{r} has a good backup again: {} at {} (policy {}; stale since {at})",
                            b.name, b.created, p.name
                        ),
                        None => format!("{r} is no longer late (policy {})", p.name),
                    };
                    alerter.raise_with(AlertKind::BackupFresh, r, &msg, &details)?;
                    cat.set_stale(r, &p.name, None)?;
                }
                _ => {}
            }
        }
    }
    for (r, p) in left.into_keys() {
        cat.unwatch_stale(&r, &p)?;
    }
    alerter
        .counters
        .stale_checks
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

fn stale_message(
    r: &str,
    policy: &str,
    last: Option<&LastBackup>,
    age: Duration,
    period: Duration,
    grace: Duration,
) -> String {
    let last = match last {
        Some(b) => format!("last good backup {} at {}", b.name, b.created),
        None => "no backup yet".into(),
    };
    format!(
        "{r}: no good backup for {} (policy {policy} runs every {}, grace {}); {last}",
        human(age),
        human(period),
        human(grace)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_weekend_without_runs_is_not_late_and_a_missed_run_is_once_the_grace_passed() {
        use time::macros::datetime;
        let weekdays = Schedule::parse("0 2 * * 1-5").unwrap();
        // Friday's backup at 02:00:30; Saturday afternoon nothing was due.
        let friday = datetime!(2026-11-27 02:00:30 UTC);
        let grace = grace_of(Duration::from_secs(86_400), None);
        let saturday = datetime!(2026-11-28 15:00 UTC);
        assert!(weekdays.missed(friday, saturday - grace).is_none());
        // Monday's run did not back up: late once Monday 02:00 + 12 h passed.
        let monday_noon = datetime!(2026-11-30 12:00 UTC);
        assert!(weekdays.missed(friday, monday_noon - grace).is_none());
        let monday_late = datetime!(2026-11-30 14:01 UTC);
        assert!(weekdays.missed(friday, monday_late - grace).is_some());
    }

    #[test]
    fn the_period_is_the_gap_between_two_runs_and_the_grace_half_of_it_at_least_10_min() {
        let now = OffsetDateTime::now_utc();
        let hourly = Schedule::parse("0 * * * *").unwrap();
        assert_eq!(period_of(&hourly, now), Some(Duration::from_secs(3600)));
        let daily = Schedule::parse("30 2 * * *").unwrap();
        let p = period_of(&daily, now).unwrap();
        assert_eq!(grace_of(p, None), Duration::from_secs(43_200));
        assert_eq!(
            grace_of(Duration::from_secs(60), None),
            Duration::from_secs(600)
        );
        assert_eq!(
            grace_of(Duration::from_secs(60), Some(0.5)),
            Duration::from_secs(30)
        );
    }
}
