//! Backup schedules and retention.
//!
//! This module owns two pure, I/O-free pieces of policy:
//!
//! * [`Schedule`]: a cron expression evaluated in UTC. 5 fields
//!   (`min hour dom month dow`) or 6 fields with seconds first
//!   (`sec min hour dom month dow`); month and weekday names (`JAN`, `MON`)
//!   are accepted. Parsing and matching are delegated to `croner`, which
//!   works on `chrono`; `chrono` is used only inside this module and every
//!   public signature uses `time::OffsetDateTime`. Fire times are whole
//!   seconds; sub-second parts of the inputs are respected (a fire time is
//!   never returned at or before `after`). [`Schedule::missed`] returns only
//!   the latest missed slot so that downtime causes one catch-up run.
//!
//! * [`Retention`] and [`plan`]: the prune plan, following Proxmox Backup
//!   Server's `compute_prune_info` semantics:
//!   - candidates are sorted newest first (`created`, ties: greater `id` is
//!     newer); the output has one [`Decision`] per candidate in that order;
//!   - rules run in the order last, daily, weekly, monthly, yearly; each rule
//!     keeps the newest backup of each of its next N distinct periods (UTC
//!     day, ISO week, month, year; for `keep_last` every backup is its own
//!     period). Periods without backups are not counted;
//!   - a backup kept by an earlier rule "uses up" its period exactly as in
//!     PBS: a later rule never keeps a second backup from that period, and
//!     that period is skipped, i.e. it does NOT count toward the later rule's
//!     N (keep_last 3 + keep_daily 2 with three backups today keeps today's
//!     three plus the newest of the two previous days that have backups);
//!   - protected backups are always kept, are invisible to every rule, and
//!     do not occupy a period;
//!   - `keep_days` (not a PBS option; like restic `--keep-within`) is
//!     independent: it additionally keeps every unprotected backup with
//!     `created >= now - N*24h` (future-dated backups included) and does not
//!     influence the other rules' counting;
//!   - a rule of `Some(0)` keeps nothing by itself; if no rule has N > 0 the
//!     retention is "empty" and everything is kept (as PBS does).
//!
//! All functions are total: no input makes them panic.

use std::collections::HashSet;

use croner::Cron;
use croner::parser::{CronParser, Year};
use time::{Duration, OffsetDateTime, UtcOffset};

/// A cron schedule: 5 fields (min hour dom month dow) or 6 fields with
/// SECONDS FIRST (sec min hour dom month dow). Day-of-week names (MON..SUN)
/// and month names allowed. UTC.
#[derive(Clone, Debug)]
pub struct Schedule {
    expr: String,
    cron: Cron,
}

fn to_chrono(t: OffsetDateTime) -> Option<chrono::DateTime<chrono::Utc>> {
    // Whole seconds only: croner keeps sub-second parts otherwise.
    chrono::DateTime::<chrono::Utc>::from_timestamp(t.unix_timestamp(), 0)
}

fn from_chrono(t: chrono::DateTime<chrono::Utc>) -> Option<OffsetDateTime> {
    let secs = OffsetDateTime::from_unix_timestamp(t.timestamp()).ok()?;
    secs.checked_add(Duration::nanoseconds(i64::from(t.timestamp_subsec_nanos())))
}

impl Schedule {
    /// Parse a 5- or 6-field cron expression.
    pub fn parse(expr: &str) -> Result<Schedule, String> {
        let trimmed = expr.trim();
        let fields = trimmed.split_whitespace().count();
        if fields != 5 && fields != 6 {
            return Err(format!(
                "schedule {expr:?}: expected 5 fields (min hour dom month dow) or 6 fields \
                 (sec min hour dom month dow), got {fields}"
            ));
        }
        // Seconds are optional (6 fields = seconds first); no year field.
        let parser = CronParser::builder().year(Year::Disallowed).build();
        let cron = parser.parse(trimmed);
        let cron = cron.map_err(|e| format!("schedule {expr:?}: {e}"))?;
        let expr = trimmed.to_string();
        let schedule = Schedule { expr, cron };
        // A schedule that can never fire (`0 0 31 2 *`) would be searched for ever by
        // the scheduler and protect nothing: refuse it when it is saved.
        if schedule.next_after(OffsetDateTime::now_utc()).is_none() {
            return Err(format!(
                "schedule {:?} never fires (no such date): check the day and month fields",
                schedule.expr
            ));
        }
        Ok(schedule)
    }

    /// The expression as parsed (surrounding whitespace removed).
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// First fire time strictly after `after`.
    pub fn next_after(&self, after: OffsetDateTime) -> Option<OffsetDateTime> {
        // Searching exclusively from floor(after) yields a whole second
        // >= floor(after) + 1s, which is strictly after `after`.
        let start = to_chrono(after)?;
        let next = self.cron.find_next_occurrence(&start, false).ok()?;
        from_chrono(next)
    }

    /// The latest fire time in (since, now], if any: used at startup so that
    /// runs missed while the appliance was down run ONCE, not once per missed
    /// slot.
    pub fn missed(&self, since: OffsetDateTime, now: OffsetDateTime) -> Option<OffsetDateTime> {
        if now <= since {
            return None;
        }
        // Inclusive search from floor(now) yields a whole second <= now.
        let start = to_chrono(now)?;
        let prev = self.cron.find_previous_occurrence(&start, true).ok()?;
        from_chrono(prev).filter(|t| *t > since && *t <= now)
    }
}

#[derive(
    Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Keep every backup younger than N days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_days: Option<u32>,
    /// Newest backup of each of the last N days that have backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// Newest backup of each of the last N ISO weeks that have backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
}

impl Retention {
    /// No rule with N > 0 is set => keeps everything.
    pub fn is_empty(&self) -> bool {
        let Retention {
            keep_last: a,
            keep_days: b,
            keep_daily: c,
            ..
        } = *self;
        let Retention {
            keep_weekly: d,
            keep_monthly: e,
            keep_yearly: f,
            ..
        } = *self;
        [a, b, c, d, e, f].iter().all(|r| r.unwrap_or(0) == 0)
    }
}

/// One backup as retention sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub created: OffsetDateTime,
    pub protected: bool,
}

/// The verdict for one candidate; `reasons` is empty for a deleted one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    pub id: String,
    pub keep: bool,
    pub reasons: Vec<String>,
}

/// A counting rule: `Last` makes every backup its own period.
#[derive(Clone, Copy)]
enum Period {
    Last,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    /// The period of `t` (in UTC) as shown in reasons; `i` is the position.
    fn key(self, i: usize, t: OffsetDateTime) -> String {
        let d = t.checked_to_offset(UtcOffset::UTC).unwrap_or(t).date();
        let (y, m) = (d.year(), u8::from(d.month()));
        match self {
            Period::Last => i.to_string(),
            Period::Day => format!("daily {y:04}-{m:02}-{:02}", d.day()),
            Period::Week => {
                let (y, w, _) = d.to_iso_week_date();
                format!("weekly {y:04}-W{w:02}")
            }
            Period::Month => format!("monthly {y:04}-{m:02}"),
            Period::Year => format!("yearly {y:04}"),
        }
    }
}

/// The prune plan: one [`Decision`] per candidate, newest first. See the
/// module documentation for the exact semantics.
pub fn plan(retention: &Retention, candidates: &[Candidate], now: OffsetDateTime) -> Vec<Decision> {
    let mut list: Vec<&Candidate> = candidates.iter().collect();
    list.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.id.cmp(&a.id)));
    let keep_all = retention.is_empty();
    let initial = |c: &&Candidate| match (c.protected, keep_all) {
        (true, _) => vec!["protected".to_string()],
        (false, true) => vec!["no retention rules".to_string()],
        (false, false) => Vec::new(),
    };
    let mut reasons: Vec<Vec<String>> = list.iter().map(initial).collect();
    // PBS's "mark": protected backups and backups a rule decided on (kept,
    // or removed as an older member of a counted period) are skipped by
    // every later rule.
    let mut marked: Vec<bool> = list.iter().map(|c| c.protected).collect();
    let rules = [
        (retention.keep_last, Period::Last),
        (retention.keep_daily, Period::Day),
        (retention.keep_weekly, Period::Week),
        (retention.keep_monthly, Period::Month),
        (retention.keep_yearly, Period::Year),
    ];
    for (n, period) in rules {
        let Some(n) = n.filter(|n| *n > 0 && !keep_all) else {
            continue;
        };
        let keys: Vec<String> = list
            .iter()
            .enumerate()
            .map(|(i, c)| period.key(i, c.created))
            .collect();
        // Periods already holding a backup kept by an earlier rule.
        let already: HashSet<&str> = (0..list.len())
            .filter(|&i| !list[i].protected && !reasons[i].is_empty())
            .map(|i| keys[i].as_str())
            .collect();
        let mut included: HashSet<&str> = HashSet::new();
        for (i, key) in keys.iter().enumerate() {
            if marked[i] || already.contains(key.as_str()) {
                continue;
            }
            marked[i] = true;
            if included.contains(key.as_str()) {
                continue; // PBS: Remove
            }
            if included.len() >= n as usize {
                marked[i] = false;
                break;
            }
            included.insert(key);
            reasons[i].push(match period {
                Period::Last => format!("last {}/{n}", included.len()),
                _ => key.clone(),
            });
        }
    }
    if let Some(n) = retention.keep_days.filter(|n| *n > 0) {
        let cutoff = now.checked_sub(Duration::days(i64::from(n)));
        for (i, c) in list.iter().enumerate() {
            if !c.protected && cutoff.is_none_or(|cut| c.created >= cut) {
                reasons[i].push(format!("within {n} days"));
            }
        }
    }
    let decide = |(c, reasons): (&&Candidate, Vec<String>)| {
        let (id, keep) = (c.id.clone(), !reasons.is_empty());
        Decision { id, keep, reasons }
    };
    list.iter().zip(reasons).map(decide).collect()
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_schedule_that_never_fires_is_refused() {
        let e = Schedule::parse("0 0 31 2 *").unwrap_err();
        assert!(e.contains("never fires"), "{e}");
        let e = Schedule::parse("0 0 0 30 2 *").unwrap_err();
        assert!(e.contains("never fires"), "{e}");
        assert!(Schedule::parse("0 0 29 2 *").is_ok(), "leap days do fire");
    }

    use super::*;
    use time::format_description::well_known::Rfc3339;

    /// RFC 3339 timestamp.
    fn t(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s.trim(), &Rfc3339).expect(s)
    }
    fn ret(json: &str) -> Retention {
        serde_json::from_str(json).expect(json)
    }
    fn cand(id: String, created: OffsetDateTime) -> Candidate {
        let protected = false;
        Candidate {
            id,
            created,
            protected,
        }
    }
    /// Candidates from "id created, id created, ..." (RFC 3339 times).
    fn cands(list: &str) -> Vec<Candidate> {
        let c = |s: &str| {
            s.trim()
                .split_once(' ')
                .map(|(id, at)| cand(id.into(), t(at)))
        };
        list.split(',').map(|s| c(s).expect(s)).collect()
    }
    /// Space-separated ids of all decisions / of the kept ones.
    fn all(d: &[Decision]) -> String {
        d.iter()
            .map(|d| d.id.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }
    fn kept(d: &[Decision]) -> String {
        let kept: Vec<Decision> = d.iter().filter(|d| d.keep).cloned().collect();
        all(&kept)
    }
    fn plan_at(json: &str, cs: &[Candidate], now: &str) -> Vec<Decision> {
        plan(&ret(json), cs, t(now))
    }

    #[test]
    fn cron_next_after_five_and_six_fields() {
        let cases = [
            "*/3 * * * * *  | 2026-11-22T12:00:01Z      | 2026-11-22T12:00:03Z",
            "*/3 * * * * *  | 2026-11-22T12:00:03Z      | 2026-11-22T12:00:06Z",
            "*/3 * * * * *  | 2026-11-22T12:00:02.999Z  | 2026-11-22T12:00:03Z",
            "30 15 10 * * * | 2026-11-22T12:00:00Z      | 2026-11-23T10:15:30Z",
            // 2026-11-22 is a Sunday.
            "0 2 * * MON    | 2026-11-22T12:00:00Z      | 2026-11-23T02:00:00Z",
            // 05:30+02:00 is 03:30 UTC, past this Monday's 02:00.
            "0 2 * * mon    | 2026-11-23T05:30:00+02:00 | 2026-11-30T02:00:00Z",
            "15 4 1 JAN *   | 2026-03-01T00:00:00Z      | 2027-01-01T04:15:00Z",
            "0 0 * * SAT-SUN | 2026-11-22T12:00:00Z     | 2026-11-28T00:00:00Z",
        ];
        for case in cases {
            let v: Vec<&str> = case.split('|').collect();
            let (expr, after, want) = (v[0], v[1], v[2]);
            let s = Schedule::parse(expr).expect(expr);
            assert_eq!(s.expr(), expr.trim());
            assert_eq!(s.next_after(t(after)), Some(t(want)), "{case}");
        }
    }

    #[test]
    fn cron_bad_expressions_rejected() {
        let bad = "|  |* * * * * * *|61 * * * *|garbage|a b c d e|@daily|* * 32 * *|* * * 13 *";
        let bad = format!("{bad}|60 * * * * *|*/0 * * * *|* * * * FOO|0 0 * * 8");
        for e in bad.split('|') {
            let err = Schedule::parse(e).expect_err(e);
            assert!(err.starts_with("schedule \""), "{err}");
        }
        let err = Schedule::parse("* * * * * * *").expect_err("7 fields");
        assert!(err.contains("got 7"), "{err}");
    }

    #[test]
    fn cron_extremes_do_not_panic() {
        if let Ok(s) = Schedule::parse("0 0 31 2 *") {
            let (since, now) = (t("2020-01-01T00:00:00Z"), t("2026-01-01T00:00:00Z"));
            assert_eq!((s.next_after(now), s.missed(since, now)), (None, None));
        }
        let s = Schedule::parse("* * * * *").expect("valid");
        let min = time::Date::MIN.midnight().assume_utc();
        let max = time::Date::MAX.midnight().assume_utc();
        let _ = (s.next_after(max), s.next_after(min), s.missed(min, max));
    }

    #[test]
    fn missed_returns_only_latest_slot() {
        let s = Schedule::parse("*/3 * * * * *").expect("valid");
        let missed = |since: &str, now: &str| s.missed(t(since), t(now));
        let since = "2026-11-22T12:00:00Z";
        // Down for 60 s: one catch-up time, the last slot.
        let want = Some(t("2026-11-22T12:01:00Z"));
        assert_eq!(missed(since, "2026-11-22T12:01:00.5Z"), want);
        let want = Some(t("2026-11-22T12:00:57Z"));
        assert_eq!(missed(since, "2026-11-22T12:00:59Z"), want);
        // Nothing missed in (12:00:00, 12:00:02]; empty and reversed ranges.
        assert_eq!(missed(since, "2026-11-22T12:00:02Z"), None);
        assert_eq!(missed(since, since), None);
        assert_eq!(missed("2026-11-22T12:01:00Z", since), None);
        let daily = Schedule::parse("0 2 * * *").expect("valid");
        let (since, now) = (t("2026-11-20T03:00:00Z"), t("2026-11-22T12:00:00Z"));
        assert_eq!(daily.missed(since, now), Some(t("2026-11-22T02:00:00Z")));
    }

    #[test]
    fn keep_last_protected_and_ties() {
        let mut cs = cands(
            "b1 2026-11-01T00:00:00Z, b3 2026-11-03T00:00:00Z, \
            b5 2026-11-05T00:00:00Z, b2 2026-11-02T00:00:00Z, \
            b4 2026-11-04T00:00:00+02:00",
        );
        let now = "2026-12-01T00:00:00Z";
        let d = plan_at(r#"{"keep_last":2}"#, &cs, now);
        assert_eq!(all(&d), "b5 b4 b3 b2 b1");
        assert_eq!(kept(&d), "b5 b4");
        assert_eq!(d[0].reasons, ["last 1/2"]);
        assert!(d[2].reasons.is_empty());
        cs[2].protected = true; // b5, the newest
        cs[0].protected = true; // b1, the oldest
        let d = plan_at(r#"{"keep_last":1}"#, &cs, now);
        assert_eq!(kept(&d), "b5 b4 b1");
        assert_eq!(d[0].reasons, ["protected"]);
        assert_eq!(d[1].reasons, ["last 1/1"]);
        let cs = cands(
            "a 2026-11-01T00:00:00Z, c 2026-11-01T00:00:00Z, \
            b 2026-11-01T00:00:00Z",
        );
        let d = plan_at(r#"{"keep_last":1}"#, &cs, now);
        assert_eq!(all(&d), "c b a");
        assert_eq!(kept(&d), "c");
    }

    #[test]
    fn keep_daily_newest_per_day() {
        let mut list = Vec::new();
        for day in 1..=5 {
            for hour in [1, 9, 17] {
                list.push(format!("d{day}h{hour:02} 2026-11-0{day}T{hour:02}:00:00Z"));
            }
        }
        let cs = cands(&list.join(","));
        let now = "2026-12-01T00:00:00Z";
        let d = plan_at(r#"{"keep_daily":3}"#, &cs, now);
        assert_eq!(kept(&d), "d5h17 d4h17 d3h17");
        assert_eq!(d[0].reasons, ["daily 2026-11-05"]);
        // PBS: the day whose backups `last` kept is used up and then does not
        // count toward keep_daily.
        let d = plan_at(r#"{"keep_last":2,"keep_daily":2}"#, &cs, now);
        assert_eq!(kept(&d), "d5h17 d5h09 d4h17 d3h17");
    }

    #[test]
    fn keep_weekly_monthly_yearly() {
        let cs = cands(
            "w53a 2026-12-30T10:00:00Z, w53b 2026-12-31T10:00:00Z, \
            w53c 2027-01-01T10:00:00Z, w52 2026-12-24T10:00:00Z, \
            w51 2026-12-15T10:00:00Z, nov 2026-11-15T10:00:00Z, \
            y25 2025-06-01T10:00:00Z, y24 2024-06-01T10:00:00Z",
        );
        let (wk, day) = (
            |at| Period::Week.key(0, t(at)),
            |at| Period::Day.key(0, t(at)),
        );
        assert_eq!(wk("2026-12-31T00:00:00Z"), "weekly 2026-W53");
        assert_eq!(wk("2027-01-01T00:00:00Z"), "weekly 2026-W53");
        assert_eq!(wk("2027-01-04T00:00:00Z"), "weekly 2027-W01");
        // Periods are UTC: 2027-01-04 01:00+02 is 2027-01-03 23:00 UTC.
        assert_eq!(wk("2027-01-04T01:00:00+02:00"), "weekly 2026-W53");
        assert_eq!(day("2027-01-04T01:00:00+02:00"), "daily 2027-01-03");
        let now = "2027-01-02T00:00:00Z";
        let d = plan_at(r#"{"keep_weekly":2}"#, &cs, now);
        assert_eq!(kept(&d), "w53c w52");
        assert_eq!(d[0].reasons, ["weekly 2026-W53"]);
        let d = plan_at(r#"{"keep_monthly":3}"#, &cs, now);
        assert_eq!(kept(&d), "w53c w53b nov");
        let d = plan_at(r#"{"keep_yearly":3}"#, &cs, now);
        assert_eq!(kept(&d), "w53c w53b y25");
        assert_eq!(d[1].reasons, ["yearly 2026"]);
    }

    #[test]
    fn keep_days_and_combined() {
        let now = t("2026-12-31T23:00:00Z");
        let mut cs = vec![cand(String::new(), now); 40];
        for (h, c) in (0..40i64).zip(cs.iter_mut()) {
            (c.id, c.created) = (format!("{h:03}"), now - Duration::hours(h * 12));
        }
        let d = plan(&ret(r#"{"keep_days":3}"#), &cs, now);
        // created >= now - 72h: ages 0, 12, ..., 72h.
        assert_eq!(kept(&d), "000 001 002 003 004 005 006");
        assert_eq!(d[6].reasons, ["within 3 days"]);
        let r = r#"{"keep_last":1,"keep_days":1,"keep_daily":2,"keep_weekly":2,"keep_monthly":1}"#;
        let d = plan(&ret(r), &cs, now);
        // now = Thu 12-31 23:00 (W53). last: 000. daily: 12-30 (002), 12-29
        // (004). weekly: W53 used up; W52 = Sun 12-27 11:00 (008), W51 = Sun
        // 12-20 11:00 (022). monthly: December used up, November not present.
        assert_eq!(kept(&d), "000 001 002 004 008 022");
        assert_eq!(d[0].reasons, ["last 1/1", "within 1 days"]);
        assert_eq!(d[1].reasons, ["within 1 days"]);
    }

    #[test]
    fn empty_retention_keeps_all() {
        let cs = cands("x 2026-12-31T00:00:00Z, y 2020-01-01T00:00:00Z");
        for r in ["{}", r#"{"keep_last":0}"#] {
            assert!(ret(r).is_empty());
            let d = plan_at(r, &cs, "2027-01-01T00:00:00Z");
            assert_eq!(kept(&d), "x y");
            assert_eq!(d[1].reasons, ["no retention rules"]);
        }
        assert!(plan_at("{}", &[], "2027-01-01T00:00:00Z").is_empty());
        assert!(!ret(r#"{"keep_yearly":1}"#).is_empty());
    }

    #[test]
    fn serde_round_trip_and_unknown_field() {
        let json = r#"{"keep_last":3,"keep_weekly":4}"#;
        let r = ret(json);
        assert_eq!((r.keep_last, r.keep_weekly), (Some(3), Some(4)));
        assert_eq!(serde_json::to_string(&r).expect("serialize"), json);
        assert_eq!(ret("{}"), Retention::default());
        let err = serde_json::from_str::<Retention>(r#"{"keep_hourly":1}"#).expect_err("unknown");
        assert!(err.to_string().contains("keep_hourly"), "{err}");
    }
}
