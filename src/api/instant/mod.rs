//! Instant access from the API: `serve-nbd` inside the service, as managed exports.
//!
//! `POST /instant {"backup", "disk"?}` (operator) binds a TCP port as `[instant]` says
//! ([`access`]: the first free port of the range on the configured address, or an
//! ephemeral port on 127.0.0.1 by default; all taken → 409) and serves that disk of the
//! backup read-only over NBD (NBD-TLS when configured) on its own thread
//! ([`crate::instant`]: on-demand chunk reads, every chunk verified, writes refused with
//! EPERM, the backup pinned against GC). Each export gets an unguessable name (128
//! random bits; the server serves no default export and lists none), so finding the
//! port does not give the backup out. The answer is `201 {"id", "uri", "host", "port",
//! "export", "tls", "command", "backup", "disk", ...}` (fields: [`access`]); `GET
//! /instant` (auditor) lists the exports the same way, but a caller below operator gets
//! no export name, URI path or command (the name opens the backup); `DELETE /instant/{id}` (operator)
//! stops one and answers once its port is closed. Every export stops when the service
//! stops ([`Exports::stop_all`], and on drop). At most [`MAX_EXPORTS`] run at once.
//!
//! An export whose server thread ended by itself (an I/O error on the listener) shows
//! `"state": "ended"` with its error until it is deleted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, Caller, Shared};
use crate::error::{Error, Result};

mod access;

pub use access::Access;

/// Exports running at once.
pub const MAX_EXPORTS: usize = 16;

/// One running export.
struct Export {
    view: Value,
    stop: Arc<AtomicBool>,
    /// The server thread; its result is the serve's outcome.
    thread: Option<JoinHandle<Result<()>>>,
}

impl Export {
    fn view(&self) -> Value {
        let mut v = self.view.clone();
        let ended = self.thread.as_ref().is_none_or(|t| t.is_finished());
        v["state"] = json!(if ended { "ended" } else { "running" });
        v
    }

    /// Stop the server and wait for its thread: its port is closed when this returns.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("instant access {}: {e}", self.view["id"]),
                Err(_) => {
                    tracing::error!("instant access {}: the server panicked", self.view["id"])
                }
            }
        }
    }
}

/// The service's running exports.
#[derive(Default)]
pub struct Exports {
    running: Mutex<BTreeMap<String, Export>>,
    next: AtomicU64,
    /// Where and how exports are served (`[instant]`).
    access: Access,
}

impl Exports {
    /// No export yet; new ones served as `access` says.
    pub fn new(access: Access) -> Exports {
        Exports {
            running: Default::default(),
            next: Default::default(),
            access,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Export>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start serving `disk` (default: the first) of backup `backup` of the catalog in
    /// `data`. Blocking: binds the port and opens the vault before answering.
    fn start(
        &self,
        app: &crate::app::App,
        data: PathBuf,
        backup: &str,
        disk: Option<&str>,
        by: &str,
    ) -> Result<Value> {
        if self.lock().len() >= MAX_EXPORTS {
            return Err(Error::conflict(format!(
                "{MAX_EXPORTS} instant-access exports are running already; stop one \
                 (DELETE /api/v1/instant/ID) first"
            )));
        }
        let entry = app.find_backup(backup)?;
        let d = match disk {
            None => entry.manifest.disks.first(),
            Some(n) => entry
                .manifest
                .disks
                .iter()
                .find(|d| d.name == n || d.disk_id == n),
        }
        .ok_or_else(|| {
            Error::not_found(format!(
                "backup {} has no disk {}",
                entry.manifest.id,
                disk.unwrap_or("(it has none)")
            ))
        })?;
        let listener = self.access.bind()?;
        let port = match &listener {
            crate::nbd::server::Listener::Tcp(l) => l.local_addr().map(|a| a.port()),
            crate::nbd::server::Listener::Unix(..) => Ok(0),
        }
        .map_err(|e| Error::io("reading the instant-access port", e))?;
        let secret = access::secret_name();
        let n = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        let id = format!("ia-{n}");
        let mut view = self.access.describe(port, &secret);
        let more = json!({
            "id": id,
            "backup": entry.manifest.id,
            "resource": entry.manifest.resource,
            "disk": d.name,
            "size": d.size,
            "started": crate::manifest::now_rfc3339(),
            "by": by,
        });
        if let (Some(v), Value::Object(m)) = (view.as_object_mut(), more) {
            v.extend(m);
        }
        let tls = self.access.tls_server();
        let stop = Arc::new(AtomicBool::new(false));
        let (backup_id, disk_name) = (entry.manifest.id.clone(), d.name.clone());
        let s = Arc::clone(&stop);
        // The vault is opened before answering, so a broken vault fails the request.
        let ready = Arc::new((Mutex::new(None::<Result<()>>), std::sync::Condvar::new()));
        let r = Arc::clone(&ready);
        let thread = std::thread::Builder::new()
            .name(format!("instant-{id}"))
            .spawn(move || {
                let tell = |res: Result<()>| {
                    let (m, c) = &*r;
                    *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(res);
                    c.notify_all();
                };
                let app = match crate::app::App::open(&data) {
                    Ok(a) => a,
                    Err(e) => {
                        tell(Err(e));
                        return Ok(());
                    }
                };
                tell(Ok(()));
                app.serve_nbd(
                    &backup_id,
                    Some(&disk_name),
                    &listener,
                    &s,
                    tls.as_ref(),
                    Some(&secret),
                )
            })
            .map_err(|e| Error::io("starting an instant-access thread", e))?;
        {
            let (m, c) = &*ready;
            let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
            while g.is_none() {
                g = c.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            if let Some(Err(e)) = g.take() {
                let _ = thread.join();
                return Err(e);
            }
        }
        let export = Export {
            view,
            stop,
            thread: Some(thread),
        };
        let v = export.view();
        tracing::info!(id = %id, uri = %v["uri"], "instant access started");
        self.lock().insert(id, export);
        Ok(v)
    }

    fn list(&self) -> Vec<Value> {
        self.lock().values().map(Export::view).collect()
    }

    /// Stop export `id`; returns its last view.
    fn stop(&self, id: &str) -> Result<Value> {
        let mut e = self.lock().remove(id).ok_or_else(|| {
            Error::not_found(format!(
                "no instant-access export {id} (GET /api/v1/instant lists them)"
            ))
        })?;
        e.stop();
        let mut v = e.view();
        v["state"] = json!("stopped");
        Ok(v)
    }

    /// Stop every export (service shutdown).
    pub fn stop_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        for (_, mut e) in all {
            e.stop();
        }
    }
}

impl Drop for Exports {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Body of `POST /instant`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Backup id or name (`latest` is not taken: name the backup).
    backup: String,
    /// Disk name or id (default: the backup's first disk).
    disk: Option<String>,
}

/// `POST /instant {"backup", "disk"?}` → `201` with the export's view.
pub async fn start(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<StartRequest>,
) -> std::result::Result<(StatusCode, Json<Value>), ApiError> {
    let v = st
        .run(move |st, app| {
            Ok(st.exports.start(
                app,
                st.data.clone(),
                &req.backup,
                req.disk.as_deref(),
                &caller.0.name,
            )?)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

/// `GET /instant` → the running exports. The export name is a read credential for the
/// backup: a caller below operator (who could not start an export) gets each view
/// without it ([`access::redact`]).
pub async fn list(State(st): State<Shared>, Extension(caller): Extension<Caller>) -> Json<Value> {
    let mut xs = st.exports.list();
    if caller.0.role < crate::catalog::Role::Operator {
        xs.iter_mut().for_each(access::redact);
    }
    Json(Value::Array(xs))
}

/// `DELETE /instant/{id}` → the stopped export's view, once its port is closed.
pub async fn stop(
    State(st): State<Shared>,
    Path(id): Path<String>,
) -> std::result::Result<Json<Value>, ApiError> {
    let v = st.run(move |st, _| Ok(st.exports.stop(&id)?)).await?;
    Ok(Json(v))
}
