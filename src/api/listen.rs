//! The API's listener: the accept loop, the connection cap, the header/idle timeout, the
//! request-body limit and graceful shutdown. It owns nothing of the routes.
//!
//! An idle client costs the appliance a file descriptor and nothing else: a flood of
//! connections that never send a request must neither stop the API nor take the
//! descriptors the catalog, the vaults and the scheduler need. So:
//! - at most [`Limits::max_connections`] connections are held at once (HTTP/1.1 only:
//!   an HTTP/2 connection with no stream would escape the header timeout);
//! - over the cap, a new connection evicts the oldest held connection that has not sent a
//!   complete request header yet (it is closed: the client sees EOF). A real client sends
//!   its request within milliseconds, so a flood of idle connections cannot keep it out;
//!   if every held connection is busy with a request (or idle after one, see below), the
//!   new connection is closed at once instead of waiting;
//! - a connection that has not sent a complete request header within
//!   [`Limits::header_timeout`] of being accepted, or of its previous response (hyper's
//!   header-read timer also runs while a keep-alive connection idles), is closed;
//! - request bodies over [`Limits::body_limit`] are refused (413) by the JSON extractor;
//! - [`raise_fd_limit`] lifts the soft `RLIMIT_NOFILE` to the hard limit at start and
//!   [`Limits::capped`] keeps the cap [`FD_RESERVE`] descriptors below it, so the
//!   scheduler and the task runner can always open the catalog and the vaults.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, oneshot, watch};

/// Descriptors kept free of connections: catalog, vaults, packs, sources, logs.
pub const FD_RESERVE: u64 = 256;

/// Request bodies larger than this are refused (413): the API's bodies are small JSON.
pub const BODY_LIMIT: usize = 1 << 20;

/// What one listener allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_limit: usize,
}

impl Limits {
    pub fn new(max_connections: usize, header_timeout: Duration) -> Limits {
        Limits {
            max_connections: max_connections.max(1),
            header_timeout,
            body_limit: BODY_LIMIT,
        }
    }

    /// These limits with the cap lowered to leave [`FD_RESERVE`] of `fd_limit` free
    /// (logged when it is lowered).
    pub fn capped(mut self, fd_limit: u64) -> Limits {
        let room = usize::try_from(fd_limit.saturating_sub(FD_RESERVE))
            .unwrap_or(usize::MAX)
            .max(1);
        if self.max_connections > room {
            tracing::warn!(
                configured = self.max_connections,
                used = room,
                fd_limit,
                "[server] max_connections lowered to leave {FD_RESERVE} open files for the \
                 catalog and vaults; raise LimitNOFILE (ulimit -n) to allow more"
            );
            self.max_connections = room;
        }
        self
    }
}

/// Raise the soft open-file limit to the hard one; returns the limit now in force.
/// A failure is logged, not fatal: the cap is then fitted under the current limit.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!("raising the open-file limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!("reading the open-file limit: {e}");
            1024
        }
    }
}

/// Held connections that have not sent a complete request header yet, oldest first;
/// each can be told to close.
#[derive(Default)]
struct Waiting(Mutex<BTreeMap<u64, oneshot::Sender<()>>>);

impl Waiting {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, oneshot::Sender<()>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, id: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.map().insert(id, tx);
        rx
    }

    fn remove(&self, id: u64) {
        self.map().remove(&id);
    }

    /// Tell the oldest waiting connection to close; false if there is none.
    fn evict_oldest(&self) -> bool {
        let mut m = self.map();
        while let Some((_, tx)) = m.pop_first() {
            if tx.send(()).is_ok() {
                return true;
            }
        }
        false
    }

    fn evict_all(&self) {
        for (_, tx) in std::mem::take(&mut *self.map()) {
            let _ = tx.send(());
        }
    }
}

/// Serve `app` on `listener` within `limits` until `shutdown` completes; then stop
/// accepting, close connections that wait for a request, let requests in progress
/// finish (for at most the header timeout) and return.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app.layer(axum::extract::DefaultBodyLimit::max(limits.body_limit));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let waiting = Arc::new(Waiting::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let builder = Arc::new(builder);
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors (EMFILE/ENFILE) or a connection reset before it
                    // was accepted: back off a little instead of spinning on the error.
                    tracing::warn!("accepting an API connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(p) => p,
            Err(_) if waiting.evict_oldest() => {
                // The evicted connection's task drops its slot as soon as it runs.
                match tokio::time::timeout(
                    Duration::from_secs(1),
                    Arc::clone(&slots).acquire_owned(),
                )
                .await
                {
                    Ok(Ok(p)) => p,
                    _ => continue,
                }
            }
            Err(_) => {
                tracing::debug!("connection cap reached: closing a new connection");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = next_id;
        next_id += 1;
        let evict = waiting.insert(id);
        let (waiting, builder, app, stop) = (
            Arc::clone(&waiting),
            Arc::clone(&builder),
            app.clone(),
            stop_rx.clone(),
        );
        tokio::spawn(async move {
            connection(stream, id, &waiting, &builder, app, evict, stop).await;
            waiting.remove(id);
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    waiting.evict_all();
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.header_timeout, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("stopping with API requests still in progress");
    }
    Ok(())
}

/// One connection, until it ends, is evicted, or shuts down gracefully on `stop`.
async fn connection(
    stream: tokio::net::TcpStream,
    id: u64,
    waiting: &Arc<Waiting>,
    builder: &hyper::server::conn::http1::Builder,
    app: Router,
    mut evict: oneshot::Receiver<()>,
    mut stop: watch::Receiver<bool>,
) {
    let w = Arc::clone(waiting);
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        // A complete request header arrived: this connection is no longer idle.
        w.remove(id);
        let mut app = app.clone();
        async move { tower_service::Service::call(&mut app, req).await }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let (mut evictable, mut stopping) = (true, *stop.borrow());
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("API connection: {e}");
                }
                return;
            }
            r = &mut evict, if evictable => {
                if r.is_ok() {
                    return;
                }
                // The sender is gone: a request arrived, nothing will evict this one.
                evictable = false;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
