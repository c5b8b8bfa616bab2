//! Recovery drills run on backups (`verified_boot`): one row per drill, kept after the
//! backup's own row is replaced by a rescan (no foreign key), so a backup's and a
//! resource's last drill survive `vault rescan`. The body is the drill's JSON record
//! (`drill::VerifiedBoot`); the catalog does not interpret it.

use rusqlite::{OptionalExtension, params};
use serde_json::Value;

use super::Catalog;
use crate::error::{Error, Result};

impl Catalog {
    /// Record a drill of `backup_id` (of `resource`, in `vault`).
    pub fn add_drill(
        &self,
        backup_id: &str,
        vault: &str,
        resource: &str,
        at: &str,
        ok: bool,
        body: &Value,
    ) -> Result<()> {
        let json = serde_json::to_string(body)
            .map_err(|e| Error::invalid("encoding a drill record").with_source(e))?;
        self.conn.execute(
            "INSERT INTO drills (backup_id, vault, resource, at, ok, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![backup_id, vault, resource, at, ok as i64, json],
        )?;
        Ok(())
    }

    /// The last drill of a backup.
    pub fn last_drill(&self, backup_id: &str) -> Result<Option<Value>> {
        self.one_drill(
            "SELECT body FROM drills WHERE backup_id = ?1 ORDER BY seq DESC LIMIT 1",
            backup_id,
        )
    }

    /// The last drill of any backup of a resource (disk id or server name).
    pub fn last_drill_of_resource(&self, resource: &str) -> Result<Option<Value>> {
        self.one_drill(
            "SELECT body FROM drills WHERE resource = ?1 ORDER BY seq DESC LIMIT 1",
            resource,
        )
    }

    fn one_drill(&self, sql: &str, key: &str) -> Result<Option<Value>> {
        let body: Option<String> = self
            .conn
            .query_row(sql, params![key], |r| r.get(0))
            .optional()?;
        body.map(|b| {
            serde_json::from_str(&b)
                .map_err(|e| Error::corrupt("a drill record in the catalog").with_source(e))
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_last_drill_wins_per_backup_and_per_resource() {
        let d = tempfile::tempdir().unwrap();
        let c = Catalog::open(d.path()).unwrap();
        assert_eq!(c.last_drill("b1").unwrap(), None);
        c.add_drill("b1", "v", "srv", "t1", false, &json!({"ok": false}))
            .unwrap();
        c.add_drill("b1", "v", "srv", "t2", true, &json!({"ok": true}))
            .unwrap();
        c.add_drill("b2", "v", "other", "t3", false, &json!({"n": 3}))
            .unwrap();
        assert_eq!(c.last_drill("b1").unwrap(), Some(json!({"ok": true})));
        assert_eq!(
            c.last_drill_of_resource("srv").unwrap(),
            Some(json!({"ok": true}))
        );
        assert_eq!(
            c.last_drill_of_resource("other").unwrap(),
            Some(json!({"n": 3}))
        );
    }
}
