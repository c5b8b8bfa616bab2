//! The HTTPS admin API (`/api/v1`, JSON), on axum/tokio (TLS in `listen`, the certificate
//! in `crate::tls`). Handlers are thin: they check
//! input, call `app`, `service`, `scheduler` and `task`, and map errors to statuses;
//! they never reach into vault internals.
//!
//! Auth: every call needs `Authorization: Bearer TOKEN` (401 otherwise), except
//! `GET /health` without an `Authorization` header, which answers `{"status":"ok"}` and
//! nothing more (for probes; not audited; see [`ANONYMOUS`]). The route table
//! ([`ROUTES`]) gives each route the least role it needs (auditor reads; operator also
//! backs up, restores, serves instant access, protects, deletes backups, verifies vaults and cancels tasks; admin
//! also manages vaults, resources, policies and tokens, locks backups and runs GC): a weaker role gets 403. Every call with a
//! token or refused, goes to the audit log with the token's name. Deny by default: a
//! method or path the table does not list is refused (405/404) before any handler runs,
//! `HEAD` takes `GET`'s role, and each route's method is a `MethodFilter` constant (a
//! method the router does not know does not compile). Requests without a valid token
//! are limited per peer (`guard`: 429 past 60 a minute, audited once). Host paths,
//! sockets and NBD servers a request names are confined by `[paths]` (`confine`).
//! Every answer to a token carries `Cache-Control: no-store`. The same table (with each
//! route's request and answer types in `openapi::SHAPES`) generates the
//! OpenAPI document (`GET /api/v1/openapi.json`), so it cannot list a route the router
//! lacks or miss one it has (tested).
//!
//! Blocking boundary: the async side never touches SQLite, the file system or a vault.
//! Every handler that does runs its work through [`ApiState::run`]: one
//! `spawn_blocking` with an [`App`] lent by a small pool (each `App` owns one catalog
//! connection; SQLite WAL lets them read side by side), so no request waits on a global
//! lock and the runtime's threads keep answering. Long work is queued as tasks and
//! answered with `202 {"task": ID}`. Costly figures (vault usage, the bytes only one
//! backup holds) are served from the catalog's cache and refreshed by a background
//! thread ([`FigureRefresher`]) after backups, deletes, prunes and GC. The audit trail
//! is written by its own thread in batches (`audit.rs`); `/health` counts tasks from
//! the registry's memory.
//!
//! Measured on this machine (`appliance/bench-api.sh`, release build, wrk 2 threads ×
//! 32 connections, 10,000 ended tasks in history, 50 backups; 2 cores shared with other
//! builds, load average 6–15, so compare within a run), requests/s before → after:
//!
//! ```text
//!                                   before (Mutex<App>)   after
//! GET /health (token)                        18–26        19,900–25,100
//! GET /backups                              280–770         6,900–8,900
//! GET /health, two backups running            9–17        12,500–13,700
//! GET /backups, two backups running         240–280         4,300–9,000
//! ```
//!
//! Errors: every refusal, whoever makes it (a handler, an extractor's rejection of bad
//! JSON, a wrong content type, an unknown field or a bad path or query, the router's
//! 404/405, auth's 401/403, the body limit's 413, the rate limiter's 429, a lock's 409),
//! answers one JSON shape (handlers build it from [`ApiError`]; [`json_errors`] rewrites
//! any other error answer into it):
//!
//! ```text
//! {"error": {"kind": "not_found", "message": "no backup \"x\" (see GET /api/v1/backups)"}}
//! ```
//!
//! `kind` is one word of [`KINDS`]: the library's `ErrorKind` in snake case (`io`,
//! `invalid_format`, `unsupported`, `corrupt`, `not_found`, `conflict`, `config`,
//! `cancelled`, `full`, `unreachable`, `key_required`, `wrong_key`), or the HTTP layer's
//! `bad_request`, `unauthorized`, `forbidden`, `method_not_allowed`, `payload_too_large`,
//! `unsupported_media_type`, `rate_limited`, `internal`, `unavailable`. The CLI's
//! `--json` failures have the same shape (plus `exit_code`), and its remote mode exits
//! by the appliance's `kind` as a local run would.
//!
//! Lists: `?limit=&offset=` with `X-Total-Count` and `Link: rel="next"` headers (see
//! `handlers/page.rs`). Unknown names are refused everywhere: a query parameter the
//! route's `openapi::SHAPES` line does not name, before any handler runs (`contract`),
//! and a body field its type does not have (`deny_unknown_fields`), both `400
//! bad_request` naming it.
//!
//! Connections (cap, header/idle timeout, body limit, open-file limit) are the
//! listener's business: see [`listen`].
//!
//! Instant access (`/instant`, see `instant`): the service serves backups over NBD
//! itself, as managed exports that stop with it.
//!
//! Outside `/api/v1`: the web console's embedded assets at `/` (no token; see
//! `console`) and `GET /metrics` (Prometheus text, any valid token; see `metrics`).

mod audit;
mod auth;
pub mod confine;
mod console;
mod contract;
mod drill;
mod error;
pub use error::*;
mod files;
mod guard;
mod handlers;
mod instant;
pub mod listen;
mod locks;
mod maintenance;
mod metrics;
mod openapi;
mod replica;
mod replicate;
mod schema;
mod webhooks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;

use crate::alerts::Alerter;
use crate::app::{App, FigureRefresher};
use crate::catalog::{Pool, Role, TokenInfo};
use crate::error::{Error, ErrorKind};
use crate::task::Tasks;

pub use auth::{ANONYMOUS, Caller};
use auth::{auth, route_of};

/// Shared state of the handlers.
pub struct ApiState {
    pub data: PathBuf,
    /// `App`s (each with its own catalog connection) lent to blocking work; see
    /// [`ApiState::run`].
    pub apps: Pool<App>,
    pub tasks: Tasks,
    pub alerts: Alerter,
    pub capacity_warn_percent: u8,
    /// Recomputes vault figures in the background.
    pub figures: FigureRefresher,
    audit: audit::AuditLog,
    /// What host paths, sockets and NBD servers requests may name.
    pub confine: confine::Confinement,
    /// Failed logins per peer (429 over the limit).
    failed: guard::FailedLogins,
    /// Each backup's list view as JSON text, keyed by id, with the state it was
    /// rendered for (protected flag, last drill): a committed manifest never changes, so
    /// `GET /backups` parses none it has seen unless a protect or a drill changed its view.
    views: std::sync::Mutex<
        std::collections::HashMap<String, (crate::catalog::BackupState, Arc<str>)>,
    >,
    /// Instant-access exports served by the service (`instant`).
    exports: instant::Exports,
    /// Configured webhook targets, shown without secrets (`webhooks`).
    pub webhooks: Vec<crate::config::Webhook>,
}

pub type Shared = Arc<ApiState>;

/// `App`s in the pool: enough for both cores and a few requests waiting on disk.
const APP_POOL: usize = 8;

impl ApiState {
    /// State over the data dir `data` (opening its first catalog connections now, so
    /// that a broken catalog stops the start).
    pub fn new(
        data: PathBuf,
        tasks: Tasks,
        alerts: Alerter,
        capacity_warn_percent: u8,
    ) -> crate::Result<ApiState> {
        let apps = {
            let d = data.clone();
            Pool::with(APP_POOL, move || App::open(&d))
        };
        apps.give(App::open(&data)?);
        Ok(ApiState {
            failed: Default::default(),
            confine: confine::Confinement::default(),
            audit: audit::AuditLog::start(crate::catalog::Catalog::open(&data)?)?,
            figures: FigureRefresher::start(data.clone()),
            data,
            apps,
            tasks,
            alerts,
            capacity_warn_percent,
            views: Default::default(),
            exports: Default::default(),
            webhooks: Vec::new(),
        })
    }

    /// The list view of backup `state.id` as JSON text, from the cache when it was
    /// rendered for the same `state`, else rendered now (and cached).
    pub fn backup_view_text(
        &self,
        app: &App,
        state: &crate::catalog::BackupState,
    ) -> crate::Result<Arc<str>> {
        let id = state.id.as_str();
        let cached = self
            .views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .filter(|(s, _)| s == state)
            .map(|(_, v)| Arc::clone(v));
        if let Some(v) = cached {
            return Ok(v);
        }
        let e = app.catalog().find_backup(id)?;
        let text: Arc<str> = app.backup_view(&e.vault, &e.manifest).to_string().into();
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        if views.len() >= 100_000 {
            views.clear();
        }
        views.insert(id.to_owned(), (state.clone(), Arc::clone(&text)));
        Ok(text)
    }

    /// The blocking boundary: run `f` on a blocking thread with a pooled [`App`].
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&ApiState, &App) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let st = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let app = st.apps.get()?;
            f(&st, &app)
        })
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the request's worker failed: {e}"),
            )
        })?
    }

    /// Wait until every audit record of calls answered so far is written.
    pub fn flush_audit(&self) {
        if !self.audit.flush(std::time::Duration::from_secs(10)) {
            tracing::error!("audit log: the writer did not catch up within 10 s");
        }
    }
}

/// One route: method, path (axum syntax), least role, summary.
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    pub role: Role,
    pub summary: &'static str,
}

macro_rules! routes {
    ($( $method:ident $path:literal $role:ident $summary:literal => $handler:path ;)*) => {
        /// Every route of the API.
        pub const ROUTES: &[RouteSpec] = &[
            $( RouteSpec { method: stringify!($method), path: $path, role: Role::$role, summary: $summary }, )*
        ];
        fn add_routes(mut r: Router<Shared>) -> Router<Shared> {
            // The method is a `MethodFilter` constant: a method the router does not know
            // fails to compile instead of becoming GET.
            $( r = r.route(concat!("/api/v1", $path), axum::routing::on(axum::routing::MethodFilter::$method, $handler)); )*
            r
        }
    };
}

routes! {
    GET "/health" Auditor "Service health" => handlers::health;
    GET "/openapi.json" Auditor "This document" => openapi::document;
    GET "/whoami" Auditor "The caller's token name and role" => console::whoami;
    GET "/schedules/next" Auditor "Next fire times of a cron expression (?cron=&count=)" => console::next_runs;
    GET "/vaults" Auditor "List vaults with usage" => handlers::list_vaults;
    POST "/vaults" Admin "Create a vault" => handlers::create_vault;
    GET "/vaults/{name}" Auditor "A vault with usage" => handlers::get_vault;
    PATCH "/vaults/{name}" Admin "Change a vault's capacity limit" => handlers::patch_vault;
    DELETE "/vaults/{name}" Admin "Forget a vault (its files stay)" => handlers::delete_vault;
    POST "/vaults/{name}/verify" Operator "Verify a vault or a sample of its backups (task)" => maintenance::verify_vault;
    POST "/vaults/{name}/gc" Admin "Collect garbage in a vault (task)" => maintenance::gc_vault;
    GET "/resources" Auditor "List resources" => handlers::list_resources;
    POST "/resources" Admin "Create a resource" => handlers::create_resource;
    GET "/resources/{name}" Auditor "A resource" => handlers::get_resource;
    PATCH "/resources/{name}" Admin "Change a resource" => handlers::patch_resource;
    DELETE "/resources/{name}" Admin "Delete a resource" => handlers::delete_resource;
    POST "/backups" Operator "Back up a resource (task)" => handlers::create_backup;
    GET "/backups" Auditor "List backups (?vault=&resource=)" => handlers::list_backups;
    GET "/backups/{id}" Auditor "A backup with its sizes" => handlers::get_backup;
    DELETE "/backups/{id}" Operator "Delete a backup" => handlers::delete_backup;
    POST "/backups/{id}/protect" Operator "Protect (or unprotect) a backup" => locks::protect_backup;
    POST "/backups/{id}/lock" Admin "Lock a backup until a date (extend only)" => locks::lock_backup;
    POST "/backups/{id}/drill" Operator "Boot a backup in a throwaway VM (recovery drill task)" => drill::drill_backup;
    GET "/backups/{id}/drill/screenshot" Auditor "The PNG screenshot of a backup's last drill" => drill::screenshot;
    GET "/backups/{id}/files" Operator "Partitions and a directory of a backup's file system (?disk=&partition=&path=)" => files::list;
    GET "/backups/{id}/files/content" Operator "A file's bytes out of a backup (?disk=&partition=&path=)" => files::content;
    POST "/instant" Operator "Serve a backup's disk read-only over NBD (instant access)" => instant::start;
    GET "/instant" Auditor "Running instant-access exports with their URI, certificate and command line" => instant::list;
    DELETE "/instant/{id}" Operator "Stop an instant-access export (its port is closed on return)" => instant::stop;
    POST "/restores" Operator "Restore a backup (task)" => handlers::create_restore;
    POST "/replications" Operator "Copy backups from one vault to another (task)" => replicate::create_replication;
    GET "/vaults/{name}/replica/info" Replication "Mirror vault: identity, chunk size, key check" => replica::info;
    POST "/vaults/{name}/replica/missing" Replication "Mirror vault: which of these digests it lacks" => replica::missing;
    PUT "/vaults/{name}/replica/blobs" Replication "Mirror vault: land a batch of verified blobs (binary)" => replica::put_blobs;
    POST "/vaults/{name}/replica/manifest/present" Replication "Mirror vault: whether it holds this manifest" => replica::has_manifest;
    PUT "/vaults/{name}/replica/manifest" Replication "Mirror vault: publish a manifest whose blobs all landed" => replica::put_manifest;
    PUT "/vaults/{name}/replica/manifest/sealed" Replication "Encrypted mirror vault: publish a manifest sealed by its source" => replica::put_sealed_manifest;
    PUT "/vaults/{name}/replica/encryption" Replication "Mirror vault: take an encrypted source's key material (wrappings, never the key) while empty" => replica::put_encryption;
    GET "/policies" Auditor "List policies" => handlers::list_policies;
    POST "/policies" Admin "Create a policy" => handlers::create_policy;
    GET "/policies/{name}" Auditor "A policy" => handlers::get_policy;
    PATCH "/policies/{name}" Admin "Change a policy" => handlers::patch_policy;
    DELETE "/policies/{name}" Admin "Delete a policy" => handlers::delete_policy;
    POST "/policies/{name}/preview" Auditor "What retention would delete now" => handlers::preview_policy;
    POST "/policies/{name}/run" Operator "Run a policy now" => handlers::run_policy;
    GET "/tasks" Auditor "List tasks (?state=)" => handlers::list_tasks;
    GET "/tasks/{id}" Auditor "A task with progress and log" => handlers::get_task;
    POST "/tasks/{id}/cancel" Operator "Cancel a task" => handlers::cancel_task;
    GET "/audit" Auditor "Who did what, when" => handlers::audit;
    GET "/alerts" Auditor "Raised alerts" => handlers::alerts;
    GET "/alerts/deliveries" Auditor "Webhook deliveries: state, attempts, next try, last error (no body, no secret)" => webhooks::deliveries;
    GET "/webhooks" Auditor "Configured webhook targets (host, events, signed; never the secret)" => webhooks::list;
    GET "/tokens" Admin "List tokens" => handlers::list_tokens;
    POST "/tokens" Admin "Create a token (secret shown once)" => handlers::create_token;
    DELETE "/tokens/{name}" Admin "Delete a token" => handlers::delete_token;
}

/// A path outside `/api/v1` that nothing serves (those inside are refused by [`auth`]).
async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no route {}", uri.path()))
}

/// The router over `state`.
pub fn router(state: Shared) -> Router {
    add_routes(Router::new())
        // Prometheus text format, for any valid token (see `metrics`).
        .route("/metrics", axum::routing::get(metrics::metrics))
        // Query parameters a route's SHAPES line does not name are refused (`contract`).
        .layer(axum::middleware::from_fn(contract::known_query))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            auth,
        ))
        // The console's assets need no token: they hold no data (see `console`).
        .route("/", axum::routing::get(console::asset))
        .route("/index.html", axum::routing::get(console::asset))
        .route("/app.js", axum::routing::get(console::asset))
        .route("/app.css", axum::routing::get(console::asset))
        .fallback(no_route)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// Serve the API on `listener` within `limits` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Shared,
    limits: listen::Limits,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listen::serve(listener, router(state), limits, tls, shutdown).await
}

/// The address a listener is bound to, for the startup line.
pub fn local_addr(l: &tokio::net::TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}

/// `<data>/serve.lock`, held exclusively for the life of a `serve`: a second appliance
/// on the same data dir would mark the first one's running tasks cancelled and run its
/// policies twice, so it is refused before it touches anything.
fn lock_data_dir(data: &std::path::Path) -> crate::Result<std::fs::File> {
    std::fs::create_dir_all(data)
        .map_err(|e| Error::io(format!("creating {}", data.display()), e))?;
    let path = data.join("serve.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "another blockvault serve already runs on the data dir {} (it holds {}); \
                 stop it first, or give this one another --data",
                data.display(),
                path.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(Error::io(format!("locking {}", path.display()), e))
        }
    }
}

/// Run the appliance: API + scheduler + task runner, until SIGTERM or SIGINT. Running
/// tasks are then cancelled (and recorded so) within the configured grace time.
/// `ready` is called with the bound address and the certificate's SHA-256 fingerprint
/// (None: plain HTTP) once the API accepts connections.
pub fn run_appliance(
    config: crate::config::Config,
    ready: impl FnOnce(SocketAddr, Option<&str>),
) -> crate::Result<()> {
    config.check_tls().map_err(Error::config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking work waits for one of APP_POOL catalog handles anyway; more threads
        // than this would only wait (and cost memory) under a flood of requests.
        .max_blocking_threads(64)
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    let _serving = lock_data_dir(&config.data)?;
    let cert = if config.plain_http {
        tracing::warn!(
            listen = %config.listen,
            "serving plain HTTP (loopback only), as asked by plain_http"
        );
        None
    } else {
        let own = config.tls_cert.as_deref().zip(config.tls_key.as_deref());
        let c = crate::tls::server_cert(&config.data, config.listen, own)?;
        tracing::info!(
            cert = %c.cert.display(),
            made = c.made,
            "TLS certificate SHA-256 fingerprint {}",
            c.fingerprint
        );
        Some(c)
    };
    crate::service::configure(&config);
    replica::configure(&config.mirror_vaults);
    crate::app::set_configured_key_files(config.key_files.clone());
    // Connections are capped well below the open-file limit: a flood of idle clients
    // cannot take the descriptors the scheduler and the tasks need.
    let limits = listen::Limits::new(
        config.max_connections,
        std::time::Duration::from_secs(config.header_timeout_seconds),
    )
    .capped(listen::raise_fd_limit());
    let app = App::open(&config.data)?;
    for p in app.sweep_dead_restores()? {
        tracing::warn!(path = %p.display(), "removed the partial output of a killed restore");
    }
    drop(app);
    let retention = crate::task::TaskRetention {
        max_age_days: config.task_keep_days,
        keep: config.task_keep_max,
        ..Default::default()
    };
    let tasks = Tasks::start(&config.data, config.max_parallel_tasks, retention)?;
    let confine = confine::Confinement::new(&config.paths, &config.data)?;
    let mut state = ApiState::new(
        config.data.clone(),
        tasks.clone(),
        Alerter::start(
            &config.data,
            config.webhooks.clone(),
            crate::alerts::AlertLimits {
                queue: config.alert_queue,
                workers: config.alert_workers,
                retry: config
                    .alert_retry_seconds
                    .iter()
                    .map(|s| std::time::Duration::from_secs(*s))
                    .collect(),
                outbox: config.alerting.outbox_max,
                allow_private: config.alerting.allow_private,
            },
        )?,
        config.capacity_warn_percent,
    )?;
    state.confine = confine;
    state.webhooks = config.webhooks.clone();
    state.exports = instant::Exports::new(instant::Access::from_config(&config)?);
    state.audit.set_retention(audit::AuditRetention {
        keep_days: config.audit_keep_days,
        keep_max: config.audit_keep_max,
        ..Default::default()
    });
    let state = Arc::new(state);
    let hook_state = Arc::clone(&state);
    tasks.on_end(Arc::new(move |t| {
        // What a task changed in a vault shows in its figures soon (off this path).
        // A failed task changed nothing that counts (a failed backup removes its packs),
        // so a burst of failures costs no walks.
        if t.state == crate::task::TaskState::Succeeded
            && !matches!(t.kind.as_str(), "restore" | "verify" | "drill")
        {
            hook_state.figures.request(None);
        }
        let st = Arc::clone(&hook_state);
        let t = t.clone();
        // Alerts read the catalog: off the worker's path, on the alerter's one bounded
        // check thread (never a thread per task).
        hook_state
            .alerts
            .check(move || handlers::alerts_for(&st, &t));
    }));
    tasks.on_end(maintenance::alert_hook(state.alerts.clone()));
    let mut scheduler = config.scheduler_enabled.then(|| {
        let stale = crate::scheduler::StaleCheck {
            alerter: state.alerts.clone(),
            grace_minutes: config.alerting.stale_grace_minutes,
        };
        crate::scheduler::Scheduler::start(&config.data, tasks.clone(), Some(stale))
    });
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::io(format!("listening on {}", config.listen), e))?;
        // The handlers are in place before the appliance says it is ready: a SIGTERM
        // right after the "listening" line is a clean stop, not a kill.
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| Error::io("installing the SIGTERM handler", e))?;
        let mut int = signal(SignalKind::interrupt())
            .map_err(|e| Error::io("installing the SIGINT handler", e))?;
        if let Some(a) = local_addr(&listener) {
            ready(a, cert.as_ref().map(|c| c.fingerprint.as_str()));
        }
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("stopping: cancelling running tasks");
        };
        let tls = cert.as_ref().map(|c| Arc::clone(&c.config));
        serve(listener, Arc::clone(&state), limits, tls, shutdown)
            .await
            .map_err(|e| Error::io("serving the API", e))
    });
    if let Some(s) = scheduler.as_mut() {
        s.stop();
    }
    state.exports.stop_all();
    tasks.shutdown(std::time::Duration::from_secs(
        config.shutdown_grace_seconds,
    ));
    result
}
