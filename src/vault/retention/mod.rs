//! The lock journal: protection and retention locks recorded in the vault itself.
//!
//! A backup's protection and its retention lock travel with the vault: a second
//! appliance that attaches the vault reads them here, so it cannot delete what the first
//! one locked. The appliance's catalog only caches the protected flag; this journal is
//! the truth.
//!
//! ```text
//! <vault>/locks/retention.journal   one record per line, append-only, hash-chained
//! <vault>/locks/retention.head      {"seq":N,"hash":"<hash of record N>"}: the chain's end
//! <vault>/locks/retention.lock      flock held while a record is appended
//! ```
//!
//! On object storage the journal and its head are objects under the same keys, the
//! flock is in the appliance's state directory, and since a second appliance cannot see
//! it, an append (or a deletion checked against the journal) also holds a **journal
//! lease** object (`locks/leases/journal-….json`, see `lease`): one appliance at a time
//! reads, checks and rewrites the journal, so no record is lost to a concurrent append.
//!
//! A record is one line of JSON (fields in this order; `until`/`days` only where the
//! kind has them):
//!
//! ```text
//! {"v":1,"seq":3,"kind":"lock","backup":"<backup id>","until":"2027-01-01T00:00:00Z",
//!  "at":"2026-11-28T16:00:00Z","actor":"token ops","prev":"<hash of record 2>","hash":"<hash>"}
//!
//! kind        protect | unprotect | lock (until) | compliance (days; backup "")
//! seq         1, 2, 3 … without gaps
//! prev        hash of the previous record; 64 zeros for record 1
//! hash        blake3("blockvault retention journal v1\n" ‖ the record's JSON with "hash":"")
//! ```
//!
//! Rules:
//! - Records are only ever appended (read, check the whole chain, write the old bytes plus
//!   the new line atomically, then the head), under `retention.lock`. A journal whose
//!   chain does not check refuses appends and every deletion (`Corrupt`): locks are never
//!   guessed.
//! - A backup's lock is the latest `until` of its `lock` records, and at least
//!   `created + compliance days` in a compliance vault (`vault.toml`'s
//!   `compliance_days`, or a `compliance` record: the larger wins, so editing
//!   `vault.toml` does not shorten it). A lock can be extended, never shortened.
//! - Protection is the last `protect`/`unprotect` record of the backup.
//! - [`check`] (run by verify) reports a broken chain: a record that does not parse, a
//!   wrong hash or `prev`, a gap in `seq`, a head that names a record the journal does
//!   not have (truncated) or differs from the last one (rewritten).
//!
//! The journal makes locks tamper-evident, not tamper-proof: whoever can write the vault's
//! files directly can remove them (an object store's object lock is the answer to that);
//! what it guarantees is that no blockvault command, API token or second appliance deletes
//! a locked backup before its date.
//!
//! The clock: [`now`]. Debug builds (the integration tests) honour `BLOCKVAULT_NOW`
//! (RFC 3339) so that tests can step past a lock's date; release builds ignore it, so an
//! administrator cannot lift a lock by setting an environment variable.

use std::collections::HashMap;
use std::fs::File;

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::manifest::BackupManifest;

mod chain;

pub use chain::{HEAD_KEY, JOURNAL_KEY, Record, RecordKind};
use chain::{Head, RECORD_VERSION, read_records};

use super::Vault;
use super::store::ChunkStore;

/// The time locks are judged against. Debug builds honour `BLOCKVAULT_NOW` (RFC 3339),
/// for tests; release builds always use the system clock.
pub fn now() -> OffsetDateTime {
    clock(std::env::var("BLOCKVAULT_NOW").ok().as_deref())
}

/// The clock with `injected` (the value of `BLOCKVAULT_NOW`): honoured only by debug
/// builds; a release build always reads the system clock.
fn clock(injected: Option<&str>) -> OffsetDateTime {
    if cfg!(debug_assertions)
        && let Some(t) = injected.and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
    {
        return t;
    }
    OffsetDateTime::now_utc()
}

/// RFC 3339 text of `t` (UTC, whole seconds).
pub fn format_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// A lock date given by a user: RFC 3339 (`2027-01-31T12:00:00Z`) or a day
/// (`2027-01-31`, meaning its start, 00:00 UTC).
pub fn parse_until(s: &str) -> Result<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let day = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(s, &day)
        .map(|d| d.midnight().assume_utc())
        .map_err(|_| {
            Error::config(format!(
                "{s:?} is not a date: give YYYY-MM-DD (00:00 UTC) or RFC 3339 (2027-01-31T12:00:00Z)"
            ))
        })
}

/// A backup's protection and lock, as the journal and the vault's compliance mode say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockStatus {
    pub protected: bool,
    /// The date before which nothing deletes the backup (may lie in the past).
    #[serde(with = "time::serde::rfc3339::option")]
    pub until: Option<OffsetDateTime>,
    /// Where `until` comes from ("lock set by … at …", "compliance mode: N days").
    pub reason: Option<String>,
}

impl LockStatus {
    /// Locked at `now`?
    pub fn locked_at(&self, now: OffsetDateTime) -> bool {
        self.until.is_some_and(|u| u > now)
    }

    /// `Some(until)` while locked at [`now`].
    pub fn locked_until(&self) -> Option<OffsetDateTime> {
        self.until.filter(|u| *u > now())
    }
}

/// The journal, read and checked.
#[derive(Debug, Default, Clone)]
pub struct Journal {
    records: Vec<Record>,
    /// Each backup's state, folded once from `records`.
    folded: HashMap<String, Folded>,
    /// The largest compliance period recorded.
    compliance: Option<u32>,
}

/// A backup's state folded from its records.
#[derive(Debug, Default, Clone)]
struct Folded {
    protected: Option<bool>,
    until: Option<(OffsetDateTime, String)>,
}

impl Journal {
    /// Read the journal of the vault in `store` and check its chain (any fault: `Corrupt`,
    /// naming it). A vault without a journal has an empty one.
    pub fn load(store: &dyn ChunkStore) -> Result<Journal> {
        let problems_or = read_records(store)?;
        match problems_or {
            (records, problems) if problems.is_empty() => Ok(Journal::from_records(records)),
            (_, problems) => Err(Error::corrupt(format!(
                "the vault's lock journal ({JOURNAL_KEY}) is damaged: {}; nothing is deleted \
                 while locks cannot be read: restore the journal from a copy of the vault, \
                 then run `verify`",
                problems.join("; ")
            ))),
        }
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    fn from_records(records: Vec<Record>) -> Journal {
        let mut folded: HashMap<String, Folded> = HashMap::new();
        for r in &records {
            let f = folded.entry(r.backup.clone()).or_default();
            match r.kind {
                RecordKind::Protect => f.protected = Some(true),
                RecordKind::Unprotect => f.protected = Some(false),
                RecordKind::Lock => {
                    if let Some(u) = r.until.as_deref().and_then(|u| parse_until(u).ok())
                        && f.until.as_ref().is_none_or(|(cur, _)| u > *cur)
                    {
                        f.until = Some((u, format!("lock set by {} at {}", r.actor, r.at)));
                    }
                }
                RecordKind::Compliance => {}
            }
        }
        let compliance = records
            .iter()
            .filter(|r| r.kind == RecordKind::Compliance)
            .filter_map(|r| r.days)
            .max();
        Journal {
            records,
            folded,
            compliance,
        }
    }

    /// The largest compliance period recorded in the journal.
    pub fn compliance_days(&self) -> Option<u32> {
        self.compliance
    }

    /// `Some(flag)` when the journal has protected or unprotected `backup`.
    pub fn protected(&self, backup: &str) -> Option<bool> {
        self.folded.get(backup).and_then(|f| f.protected)
    }

    /// The protection and lock of `m`, in a vault with `compliance_days` in its vault.toml.
    pub fn status(&self, m: &BackupManifest, compliance_days: Option<u32>) -> LockStatus {
        let f = self.folded.get(&m.id).cloned().unwrap_or_default();
        let mut until = f.until;
        let days = compliance_days.max(self.compliance_days());
        if let Some(days) = days.filter(|d| *d > 0)
            && let Ok(created) = OffsetDateTime::parse(&m.created, &Rfc3339)
        {
            let c = created + Duration::days(days as i64);
            if until.as_ref().is_none_or(|(u, _)| c > *u) {
                until = Some((
                    c,
                    format!("compliance mode: every backup is kept {days} days"),
                ));
            }
        }
        LockStatus {
            protected: f.protected.unwrap_or(false),
            until: until.as_ref().map(|(u, _)| *u),
            reason: until.map(|(_, r)| r),
        }
    }

    /// Backups with a `lock` record whose date lies after `now`.
    pub fn locked_ids(&self, now: OffsetDateTime) -> Vec<(String, OffsetDateTime)> {
        let mut v: Vec<(String, OffsetDateTime)> = self
            .folded
            .iter()
            .filter_map(|(id, f)| f.until.as_ref().map(|(u, _)| (id.clone(), *u)))
            .filter(|(_, u)| *u > now)
            .collect();
        v.sort();
        v
    }
}

/// The faults of the vault's lock journal, for verify (empty: the chain checks, and
/// every backup locked until after now still has its manifest among `manifests`, when
/// given).
pub fn check(store: &dyn ChunkStore, manifests: Option<&[BackupManifest]>) -> Result<Vec<String>> {
    let (records, mut problems) = read_records(store)?;
    if let Some(ms) = manifests {
        let journal = Journal::from_records(records);
        for (id, until) in journal.locked_ids(now()) {
            if !ms.iter().any(|m| m.id == id) {
                problems.push(format!(
                    "backup {id} is locked until {} but its manifest is gone from the vault (deleted outside blockvault?)",
                    format_time(until)
                ));
            }
        }
    }
    Ok(problems)
}

/// What to append.
#[derive(Debug, Clone)]
pub struct NewRecord<'a> {
    pub kind: RecordKind,
    pub backup: &'a str,
    pub until: Option<OffsetDateTime>,
    pub days: Option<u32>,
    pub actor: &'a str,
}

/// Append a record under the journal's flock, after checking the whole chain. `decide`
/// sees the journal first and may refuse (e.g. a shorter lock) or skip (returns
/// `Ok(false)`: nothing to append).
fn append_with(
    vault: &Vault,
    new: &NewRecord<'_>,
    decide: impl FnOnce(&Journal) -> Result<bool>,
) -> Result<Option<Record>> {
    let lock = journal_lock(vault)?;
    let store = vault.store().as_ref();
    let journal = Journal::load(store)?;
    if !decide(&journal)? {
        return Ok(None);
    }
    let prev = journal
        .records
        .last()
        .map_or_else(|| "0".repeat(64), |r| r.hash.clone());
    let mut r = Record {
        v: RECORD_VERSION,
        seq: journal.records.len() as u64 + 1,
        kind: new.kind,
        backup: new.backup.to_string(),
        until: new.until.map(format_time),
        days: new.days,
        at: format_time(now()),
        actor: new.actor.to_string(),
        prev,
        hash: String::new(),
    };
    r.hash = r.compute_hash();
    let mut bytes = match store.get_file(JOURNAL_KEY) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let line = serde_json::to_vec(&r)
        .map_err(|e| Error::invalid("encoding a lock record").with_source(e))?;
    bytes.extend_from_slice(&line);
    bytes.push(b'\n');
    store.put_file(JOURNAL_KEY, &bytes)?;
    let head = serde_json::to_vec(&Head {
        seq: r.seq,
        hash: r.hash.clone(),
    })
    .map_err(|e| Error::invalid("encoding the lock journal's head").with_source(e))?;
    store.put_file(HEAD_KEY, &head)?;
    drop(lock);
    Ok(Some(r))
}

/// The journal's flock, and on a store other appliances reach (S3) also a journal
/// lease; released on drop.
struct JournalLock {
    _file: File,
    _lease: Option<super::lease::Lease>,
}

/// How long [`journal_lock`] keeps trying for the journal lease of a shared store.
const JOURNAL_LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Take the journal's lock (see [`JournalLock`]). Two appliances that race for the
/// lease may both be refused (see `lease`): each retries after a random pause, so one
/// gets it; after [`JOURNAL_LEASE_WAIT`] the `Conflict` is returned.
fn journal_lock(vault: &Vault) -> Result<JournalLock> {
    let lock_path = vault.root().join("locks").join("retention.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .ctx(|| format!("opening {}", lock_path.display()))?;
    file.lock()
        .ctx(|| format!("locking {}", lock_path.display()))?;
    if !vault.is_shared_store() {
        return Ok(JournalLock {
            _file: file,
            _lease: None,
        });
    }
    let started = std::time::Instant::now();
    loop {
        match super::lease::Lease::take(
            std::sync::Arc::clone(vault.store()),
            super::lease::LeaseKind::Journal,
        ) {
            Ok(lease) => {
                return Ok(JournalLock {
                    _file: file,
                    _lease: Some(lease),
                });
            }
            Err(e) if e.kind() == ErrorKind::Conflict && started.elapsed() < JOURNAL_LEASE_WAIT => {
                let pause = 100 + u64::from(rand::random::<u16>() % 900);
                std::thread::sleep(std::time::Duration::from_millis(pause));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Delete `m`'s manifest unless it is locked or protected (then `Conflict`, naming the
/// date, and nothing is deleted). The check and the delete happen under the journal's
/// flock, so a lock recorded meanwhile is not missed. `catalog_protected` is the
/// appliance's own flag (protections made before the journal existed).
pub fn delete_unless_held(
    vault: &Vault,
    m: &BackupManifest,
    catalog_protected: bool,
) -> Result<()> {
    let _lock = journal_lock(vault)?;
    let journal = Journal::load(vault.store().as_ref())?;
    refuse_if_held(
        &journal,
        vault.config().compliance_days,
        m,
        catalog_protected,
    )?;
    match vault.delete_manifest(m) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Record that `m` is protected (or no longer).
pub fn set_protected(vault: &Vault, m: &BackupManifest, protect: bool, actor: &str) -> Result<()> {
    let new = NewRecord {
        kind: if protect {
            RecordKind::Protect
        } else {
            RecordKind::Unprotect
        },
        backup: &m.id,
        until: None,
        days: None,
        actor,
    };
    append_with(vault, &new, |j| Ok(j.protected(&m.id) != Some(protect)))?;
    Ok(())
}

/// Lock `m` until `until`: extending is recorded, the same date is a no-op, an earlier
/// one than the lock it already has is refused (`Conflict`). Returns the new status.
pub fn lock(
    vault: &Vault,
    m: &BackupManifest,
    until: OffsetDateTime,
    actor: &str,
) -> Result<LockStatus> {
    let compliance = vault.config().compliance_days;
    if until <= now() {
        return Err(Error::config(format!(
            "{} lies in the past: a lock date must be in the future",
            format_time(until)
        )));
    }
    let new = NewRecord {
        kind: RecordKind::Lock,
        backup: &m.id,
        until: Some(until),
        days: None,
        actor,
    };
    append_with(vault, &new, |j| {
        let st = j.status(m, compliance);
        match st.until {
            Some(cur) if cur > until => Err(Error::conflict(format!(
                "backup {} ({}) is locked until {} ({}): a lock can be extended, never shortened",
                m.name,
                m.id,
                format_time(cur),
                st.reason.unwrap_or_default()
            ))),
            Some(cur) if cur == until => Ok(false),
            _ => Ok(true),
        }
    })?;
    status(vault, m)
}

/// Record a vault's compliance period (at creation).
pub fn record_compliance(vault: &Vault, days: u32, actor: &str) -> Result<()> {
    let new = NewRecord {
        kind: RecordKind::Compliance,
        backup: "",
        until: None,
        days: Some(days),
        actor,
    };
    append_with(vault, &new, |_| Ok(true))?;
    Ok(())
}

/// The protection and lock of `m` in `vault`.
pub fn status(vault: &Vault, m: &BackupManifest) -> Result<LockStatus> {
    Ok(Journal::load(vault.store().as_ref())?.status(m, vault.config().compliance_days))
}

/// `Ok` when nothing holds `m` back from deletion; else a `Conflict` naming the date (or
/// the protection).
pub fn refuse_if_held(
    journal: &Journal,
    compliance_days: Option<u32>,
    m: &BackupManifest,
    catalog_protected: bool,
) -> Result<()> {
    let st = journal.status(m, compliance_days);
    if let Some(until) = st.until.filter(|u| *u > now()) {
        return Err(Error::conflict(format!(
            "backup {} ({}) is locked until {} ({}); nothing was deleted: it can be deleted after that date",
            m.name,
            m.id,
            format_time(until),
            st.reason.unwrap_or_default()
        )));
    }
    let protected = journal.protected(&m.id).unwrap_or(catalog_protected);
    if protected {
        return Err(Error::conflict(format!(
            "backup {} ({}) is protected; nothing was deleted: unprotect it first",
            m.name, m.id
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_debug_builds_take_the_clock_from_blockvault_now() {
        let t = clock(Some("2100-01-01T00:00:00Z"));
        if cfg!(debug_assertions) {
            assert_eq!(format_time(t), "2100-01-01T00:00:00Z");
        } else {
            assert!(t < parse_until("2100-01-01").unwrap(), "release ignores it");
        }
        assert!(clock(Some("not a time")) < parse_until("2100-01-01").unwrap());
    }

    #[test]
    fn locks_take_the_latest_date_and_compliance_applies() {
        let j = Journal::from_records(chain::tests::chain());
        let m = |id: &str| BackupManifest {
            version: 1,
            id: id.into(),
            name: id.into(),
            resource: "disk".into(),
            resource_kind: crate::manifest::ResourceKind::Disk,
            created: "2026-01-01T00:00:00Z".into(),
            vault_id: String::new(),
            chunk_size: 65536,
            seconds: 0.0,
            disks: Vec::new(),
            capture: None,
            replica_of: None,
        };
        let st = j.status(&m("b1"), None);
        assert!(st.protected);
        assert_eq!(format_time(st.until.unwrap()), "2030-01-01T00:00:00Z");
        let st = j.status(&m("b3"), Some(10));
        assert_eq!(format_time(st.until.unwrap()), "2026-01-11T00:00:00Z");
        assert!(!st.protected);
    }

    #[test]
    fn until_accepts_a_day_or_rfc3339_and_nothing_else() {
        assert_eq!(
            format_time(parse_until("2027-01-31").unwrap()),
            "2027-01-31T00:00:00Z"
        );
        assert_eq!(
            format_time(parse_until("2027-01-31T12:00:00+02:00").unwrap()),
            "2027-01-31T10:00:00Z"
        );
        assert_eq!(
            parse_until("next tuesday").unwrap_err().kind(),
            ErrorKind::Config
        );
    }
}
