//! Recovery drills on the data dir: a backup booted in a throwaway VM (see
//! [`crate::drill`]), the result recorded in the catalog (`verified_boot`) and its
//! console log and screenshot kept under `<data>/drills/<backup-id>/<time>/`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::App;
use crate::drill::{DrillOptions, VerifiedBoot, run_drill};
use crate::error::{Error, Result};

impl App {
    /// Where drills keep their console logs and screenshots.
    pub fn drills_dir(&self) -> PathBuf {
        self.data.join("drills")
    }

    /// Drill backup `spec` (id, prefix, name, or `latest` of `disk`): boot every disk,
    /// wait for the check, record the result on the backup. A guest that fails is
    /// recorded and returned with `ok: false`.
    pub fn drill(
        &self,
        spec: &str,
        disk: Option<&str>,
        opts: &DrillOptions,
        cancel: &AtomicBool,
        progress: &dyn Fn(&str),
    ) -> Result<VerifiedBoot> {
        let entry = self.resolve_backup(spec, disk)?;
        let vault = Arc::new(self.open_vault(&entry.vault)?);
        let m = &entry.manifest;
        let r = run_drill(vault, m, &self.drills_dir(), opts, cancel, progress)?;
        let body = serde_json::to_value(&r)
            .map_err(|e| Error::invalid("encoding the drill record").with_source(e))?;
        self.catalog
            .add_drill(&m.id, &entry.vault, &m.resource, &r.at, r.ok, &body)?;
        Ok(r)
    }
}
