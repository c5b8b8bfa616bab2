//! The service's state in the catalog: API tokens (hashed) and roles, resources and
//! policies (JSON bodies keyed by name), tasks, the audit log and alerts, and the
//! protected flag of backups (a cache: the vault's lock journal is the truth).

use std::collections::HashSet;

use rusqlite::{OptionalExtension, params};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::Catalog;
use crate::error::{Error, Result};
use crate::manifest::now_rfc3339;

/// What a token may do: auditors read; operators also back up and restore; admins also
/// manage vaults, resources, policies and tokens. `Replication` stands apart: it may call
/// only the mirror-vault routes (`/vaults/{name}/replica/*`, which admins may call too)
/// and nothing else; it orders below `Auditor` so that no `role >= X` check lets it in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Replication,
    Auditor,
    Operator,
    Admin,
}

impl std::str::FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Role> {
        match s {
            "auditor" => Ok(Role::Auditor),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            "replication" => Ok(Role::Replication),
            o => Err(Error::config(format!(
                "unknown role {o:?} (admin, operator, auditor or replication)"
            ))),
        }
    }
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Auditor => "auditor",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Replication => "replication",
        }
    }

    /// Whether a token of this role may call a route that needs `need`: a replication
    /// token only the replication routes, those only it and admins, the others by rank.
    pub fn may(self, need: Role) -> bool {
        match (self, need) {
            (Role::Replication, n) => n == Role::Replication,
            (r, Role::Replication) => r == Role::Admin,
            (r, n) => r >= n,
        }
    }
}

/// A token as listed (never its secret).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created: String,
    /// After this instant (RFC 3339) the token is refused like an unknown one.
    pub expires: Option<String>,
    /// When it last authenticated a call (updated at most once a minute).
    pub last_used: Option<String>,
}

/// Has the RFC 3339 instant `at` passed? An instant that does not parse has.
fn passed(at: &str) -> bool {
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .map_or(true, |t| t <= time::OffsetDateTime::now_utc())
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditRecord {
    pub seq: i64,
    pub at: String,
    pub token: String,
    pub role: String,
    pub method: String,
    pub path: String,
    pub status: u16,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AlertRecord {
    pub seq: i64,
    pub at: String,
    pub kind: String,
    pub subject: String,
    pub message: String,
    /// Typed details: resource, vault, backup, task … (see `alerts`).
    pub details: serde_json::Value,
}

/// Hash of a token secret as stored.
fn token_hash(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::invalid("encoding JSON").with_source(e))
}

fn from_json<T: DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s)
        .map_err(|e| Error::invalid("catalog row is not valid JSON").with_source(e))
}

impl Catalog {
    /// Create a token; returns its info and the secret (shown once, stored hashed).
    pub fn create_token(&self, name: &str, role: Role) -> Result<(TokenInfo, String)> {
        self.create_token_until(name, role, None)
    }

    /// Create a token that expires at `expires` (RFC 3339, in the future), or never.
    /// The secret is 192 random bits; only its blake3 hash is stored, so a lookup by
    /// hash compares nothing an attacker could steer byte by byte.
    pub fn create_token_until(
        &self,
        name: &str,
        role: Role,
        expires: Option<&str>,
    ) -> Result<(TokenInfo, String)> {
        crate::name::Name::parse(name, "token")?;
        if let Some(e) = expires
            && passed(e)
        {
            return Err(Error::config(format!(
                "token {name}: expires {e:?} must be an RFC 3339 instant in the future \
                 (e.g. 2030-01-31T00:00:00Z)"
            )));
        }
        let secret = format!("bv_{}", hex::encode(rand::random::<[u8; 24]>()));
        let info = TokenInfo {
            id: hex::encode(rand::random::<[u8; 6]>()),
            name: name.to_string(),
            role,
            created: now_rfc3339(),
            expires: expires.map(str::to_owned),
            last_used: None,
        };
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO tokens (id, name, role, hash, created, expires) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![info.id, info.name, role.as_str(), token_hash(&secret), info.created, info.expires],
        )?;
        if n == 0 {
            return Err(Error::conflict(format!(
                "a token named {name:?} already exists"
            )));
        }
        Ok((info, secret))
    }

    /// The token with this secret, if any and not expired; notes its use (at most once
    /// a minute, so that a busy client does not write on every call).
    pub fn authenticate(&self, secret: &str) -> Result<Option<TokenInfo>> {
        let Some(t) = self
            .token_rows("WHERE hash = ?1", params![token_hash(secret)])?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        if t.expires.as_deref().is_some_and(passed) {
            return Ok(None);
        }
        let now = time::OffsetDateTime::now_utc();
        let stale = t.last_used.as_deref().is_none_or(|u| {
            time::OffsetDateTime::parse(u, &time::format_description::well_known::Rfc3339)
                .map_or(true, |u| now - u >= time::Duration::minutes(1))
        });
        if stale {
            self.conn.execute(
                "UPDATE tokens SET last_used = ?1 WHERE id = ?2",
                params![now_rfc3339(), t.id],
            )?;
        }
        Ok(Some(t))
    }

    fn token_rows(&self, filter: &str, p: impl rusqlite::Params) -> Result<Vec<TokenInfo>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT id, name, role, created, expires, last_used FROM tokens {filter} ORDER BY name"
        ))?;
        type Row = (
            String,
            String,
            String,
            String,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = st
            .query_map(p, |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        rows.into_iter()
            .map(|(id, name, role, created, expires, last_used)| {
                Ok(TokenInfo {
                    id,
                    name,
                    role: role.parse()?,
                    created,
                    expires,
                    last_used,
                })
            })
            .collect()
    }

    pub fn tokens(&self) -> Result<Vec<TokenInfo>> {
        self.token_rows("", [])
    }

    pub fn delete_token(&self, name: &str) -> Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM tokens WHERE name = ?1", params![name])?
            > 0)
    }

    /// Store a named JSON object in `table` (resources, policies); `create` refuses an
    /// existing name, otherwise it must exist.
    pub fn put_named<T: Serialize>(
        &self,
        table: Table,
        name: &str,
        body: &T,
        create: bool,
    ) -> Result<()> {
        let t = table.as_str();
        let json = to_json(body)?;
        let n = if create {
            self.conn.execute(
                &format!("INSERT OR IGNORE INTO {t} (name, body, created) VALUES (?1, ?2, ?3)"),
                params![name, json, now_rfc3339()],
            )?
        } else {
            self.conn.execute(
                &format!("UPDATE {t} SET body = ?2 WHERE name = ?1"),
                params![name, json],
            )?
        };
        match (n, create) {
            (0, true) => Err(Error::conflict(format!(
                "{} {name:?} already exists",
                table.noun()
            ))),
            (0, false) => Err(Error::not_found(format!(
                "no {} named {name:?}",
                table.noun()
            ))),
            _ => Ok(()),
        }
    }

    pub fn get_named<T: DeserializeOwned>(&self, table: Table, name: &str) -> Result<T> {
        let body: Option<String> = self
            .conn
            .query_row(
                &format!("SELECT body FROM {} WHERE name = ?1", table.as_str()),
                params![name],
                |r| r.get(0),
            )
            .optional()?;
        match body {
            Some(b) => from_json(&b),
            None => Err(Error::not_found(format!(
                "no {} named {name:?}",
                table.noun()
            ))),
        }
    }

    pub fn list_named<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT body FROM {} ORDER BY name",
            table.as_str()
        ))?;
        let rows: Vec<String> = st
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        rows.iter().map(|b| from_json(b)).collect()
    }

    pub fn delete_named(&self, table: Table, name: &str) -> Result<()> {
        let n = self.conn.execute(
            &format!("DELETE FROM {} WHERE name = ?1", table.as_str()),
            params![name],
        )?;
        if n == 0 {
            return Err(Error::not_found(format!(
                "no {} named {name:?}",
                table.noun()
            )));
        }
        Ok(())
    }

    /// When a policy last ran (RFC 3339), for missed-run detection after a restart.
    pub fn policy_last_run(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT last_run FROM policies WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
    }

    pub fn set_policy_last_run(&self, name: &str, at: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE policies SET last_run = ?2 WHERE name = ?1",
            params![name, at],
        )?;
        Ok(())
    }

    /// Insert or update a task record (JSON body with its state).
    pub fn put_task<T: Serialize>(
        &self,
        id: &str,
        state: &str,
        created: &str,
        body: &T,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO tasks (id, body, state, created) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET body = ?2, state = ?3",
            params![id, to_json(body)?, state, created],
        )?;
        Ok(())
    }

    /// Write several task records in one transaction (the task registry's writer
    /// batches them): `(id, state, created, JSON body)`.
    pub fn put_tasks(&mut self, batch: &[(String, String, String, String)]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO tasks (id, body, state, created) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET body = ?2, state = ?3",
            )?;
            for (id, state, created, body) in batch {
                st.execute(params![id, body, state, created])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Tasks, newest first, at most 1,000, optionally in one state (filtered in SQL, so
    /// a running task is found however many newer tasks exist).
    pub fn tasks<T: DeserializeOwned>(&self, state: Option<&str>) -> Result<Vec<T>> {
        self.tasks_limit(state, 1000)
    }

    /// Tasks, newest first, at most `limit`, optionally in one state.
    pub fn tasks_limit<T: DeserializeOwned>(
        &self,
        state: Option<&str>,
        limit: usize,
    ) -> Result<Vec<T>> {
        let rows: Vec<String> = match state {
            Some(s) => self
                .conn
                .prepare_cached(
                    "SELECT body FROM tasks WHERE state = ?1 ORDER BY created DESC, id DESC LIMIT ?2",
                )?
                .query_map(params![s, limit as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?,
            None => self
                .conn
                .prepare_cached("SELECT body FROM tasks ORDER BY created DESC, id DESC LIMIT ?1")?
                .query_map(params![limit as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?,
        };
        rows.iter().map(|b| from_json(b)).collect()
    }

    /// How many task records are in `state`.
    pub fn count_tasks(&self, state: &str) -> Result<u64> {
        self.count_tasks_except(state, &[])
    }

    /// How many task records are in `state`, leaving out the tasks `except` (those a
    /// task registry holds newer states of in memory).
    pub fn count_tasks_except(&self, state: &str, except: &[String]) -> Result<u64> {
        let except = serde_json::to_string(except).unwrap_or_else(|_| "[]".into());
        Ok(self
            .conn
            .prepare_cached(
                "SELECT COUNT(*) FROM tasks WHERE state = ?1
                 AND id NOT IN (SELECT value FROM json_each(?2))",
            )?
            .query_row(params![state, except], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Trim the history of ended tasks (succeeded, failed, cancelled): drop those created
    /// before `created_before` (RFC 3339, UTC) and all but the newest `keep`. Queued and
    /// running tasks are never trimmed. Returns how many records went.
    pub fn trim_tasks(&self, created_before: &str, keep: usize) -> Result<usize> {
        const ENDED: &str = "state IN ('succeeded', 'failed', 'cancelled')";
        let old = self.conn.execute(
            &format!("DELETE FROM tasks WHERE {ENDED} AND created < ?1"),
            params![created_before],
        )?;
        let over = self.conn.execute(
            &format!(
                "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE {ENDED}
                 ORDER BY created DESC, id DESC LIMIT -1 OFFSET ?1)"
            ),
            params![keep as i64],
        )?;
        Ok(old + over)
    }

    pub fn task<T: DeserializeOwned>(&self, id: &str) -> Result<T> {
        let body: Option<String> = self
            .conn
            .query_row("SELECT body FROM tasks WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .optional()?;
        match body {
            Some(b) => from_json(&b),
            None => Err(Error::not_found(format!("no task {id:?}"))),
        }
    }

    pub fn audit(
        &self,
        token: &str,
        role: &str,
        method: &str,
        path: &str,
        status: u16,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO audit (at, token, role, method, path, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![now_rfc3339(), token, role, method, path, status],
        )?;
        Ok(())
    }

    /// Append several audit records in one transaction: `(at, token, role, method,
    /// path, status)`.
    pub fn audit_many(&self, rows: &[(String, String, String, String, String, u16)]) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO audit (at, token, role, method, path, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (at, token, role, method, path, status) in rows {
                st.execute(params![at, token, role, method, path, status])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Trim the audit log: drop records written before `before` (RFC 3339, UTC) and
    /// all but the newest `keep`. Returns how many records went.
    pub fn trim_audit(&self, before: &str, keep: usize) -> Result<usize> {
        let old = self
            .conn
            .execute("DELETE FROM audit WHERE at < ?1", params![before])?;
        let over = self.conn.execute(
            "DELETE FROM audit WHERE seq <= (SELECT seq FROM audit ORDER BY seq DESC LIMIT 1 OFFSET ?1)",
            params![keep as i64],
        )?;
        Ok(old + over)
    }

    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditRecord>> {
        let mut st = self.conn.prepare(
            "SELECT seq, at, token, role, method, path, status FROM audit ORDER BY seq DESC LIMIT ?1",
        )?;
        let rows = st.query_map(params![limit as i64], |r| {
            Ok(AuditRecord {
                seq: r.get(0)?,
                at: r.get(1)?,
                token: r.get(2)?,
                role: r.get(3)?,
                method: r.get(4)?,
                path: r.get(5)?,
                status: r.get::<_, i64>(6)? as u16,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn add_alert(
        &self,
        kind: &str,
        subject: &str,
        message: &str,
        details: &serde_json::Value,
    ) -> Result<AlertRecord> {
        let at = now_rfc3339();
        self.conn.execute(
            "INSERT INTO alerts (at, kind, subject, message, details) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![at, kind, subject, message, details.to_string()],
        )?;
        Ok(AlertRecord {
            seq: self.conn.last_insert_rowid(),
            at,
            kind: kind.into(),
            subject: subject.into(),
            message: message.into(),
            details: details.clone(),
        })
    }

    pub fn alerts(&self, limit: usize) -> Result<Vec<AlertRecord>> {
        let mut st = self.conn.prepare(
            "SELECT seq, at, kind, subject, message, details FROM alerts ORDER BY seq DESC LIMIT ?1",
        )?;
        let rows = st.query_map(params![limit as i64], |r| {
            Ok(AlertRecord {
                seq: r.get(0)?,
                at: r.get(1)?,
                kind: r.get(2)?,
                subject: r.get(3)?,
                message: r.get(4)?,
                details: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn set_protected(&self, backup_id: &str, protected: bool) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE backups SET protected = ?2 WHERE id = ?1",
            params![backup_id, protected as i64],
        )?;
        if n == 0 {
            return Err(Error::not_found(format!("no backup {backup_id:?}")));
        }
        Ok(())
    }

    pub fn is_protected(&self, backup_id: &str) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT protected FROM backups WHERE id = ?1",
                params![backup_id],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .unwrap_or(0)
            != 0)
    }

    pub(super) fn protected_ids(&self, vault: &str) -> Result<HashSet<String>> {
        let mut st = self
            .conn
            .prepare("SELECT id FROM backups WHERE vault = ?1 AND protected != 0")?;
        let rows = st.query_map(params![vault], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// Tables holding named JSON objects.
#[derive(Debug, Clone, Copy)]
pub enum Table {
    Resources,
    Policies,
}

impl Table {
    fn as_str(&self) -> &'static str {
        match self {
            Table::Resources => "resources",
            Table::Policies => "policies",
        }
    }
    fn noun(&self) -> &'static str {
        match self {
            Table::Resources => "resource",
            Table::Policies => "policy",
        }
    }
}
