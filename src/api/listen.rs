//! The API's listener: the accept loop, the connection cap, the header/idle timeout, the
//! request-body limit and graceful shutdown. It owns nothing of the routes.
//!
//! An idle client costs the appliance a file descriptor and nothing else: a flood of
//! connections that never send a request must neither stop the API nor take the
//! descriptors the catalog, the vaults and the scheduler need. So:
//! - at most [`Limits::max_connections`] connections are held at once (HTTP/1.1 only:
//!   an HTTP/2 connection with no stream would escape the header timeout);
//! - over the cap, a new connection evicts the held connection that has been idle longest
//!   (idle: not yet sent a complete request header, or answered and waiting for the next
//!   one); it is closed and its client sees EOF. A real client sends its request within
//!   milliseconds, so a flood of idle connections cannot keep it out; if every held
//!   connection is busy with a request, the new connection is closed at once instead of
//!   waiting;
//! - a connection that has not sent a complete request header within
//!   [`Limits::header_timeout`] of being accepted, or of its previous response (hyper's
//!   header-read timer also runs while a keep-alive connection idles), is closed;
//! - request bodies over [`Limits::body_limit`] are refused (413) by the JSON extractor;
//! - [`raise_fd_limit`] lifts the soft `RLIMIT_NOFILE` to the hard limit at start and
//!   [`Limits::capped`] keeps the cap [`FD_RESERVE`] descriptors below it, so the
//!   scheduler and the task runner can always open the catalog and the vaults.
//!
//! With a TLS config (the default for `serve`; see `crate::tls`) each accepted stream is
//! wrapped in rustls before hyper sees it. The handshake counts as waiting for a request:
//! it must end within the header timeout, and the connection is evictable meanwhile. A
//! client that sends plain HTTP to the TLS port (its first byte is not a TLS handshake
//! record, 0x16) gets a plain `400` whose JSON body says to use `https://`, then EOF; a
//! handshake that fails (a client that refused the certificate) reaches no handler, so
//! it leaves nothing in the audit log.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;

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

/// Held connections that are idle (no request in progress), longest idle first; each
/// can be told to close.
#[derive(Default)]
struct Waiting(Mutex<Idle>);

#[derive(Default)]
struct Idle {
    next: u64,
    /// Idle-since sequence → (connection, its eviction signal).
    by_age: BTreeMap<u64, (u64, Arc<Notify>)>,
    /// Connection → its key in `by_age`.
    of_conn: HashMap<u64, u64>,
}

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connection `conn` waits for a request.
    fn idle(&self, conn: u64, evict: &Arc<Notify>) {
        let mut m = self.lock();
        let seq = m.next;
        m.next += 1;
        if let Some(old) = m.of_conn.insert(conn, seq) {
            m.by_age.remove(&old);
        }
        m.by_age.insert(seq, (conn, Arc::clone(evict)));
    }

    /// Connection `conn` has a request in progress, or is gone.
    fn busy(&self, conn: u64) {
        let mut m = self.lock();
        if let Some(seq) = m.of_conn.remove(&conn) {
            m.by_age.remove(&seq);
        }
    }

    /// Tell the longest idle connection to close; false if none is idle.
    fn evict_oldest(&self) -> bool {
        let mut m = self.lock();
        match m.by_age.pop_first() {
            Some((_, (conn, evict))) => {
                m.of_conn.remove(&conn);
                evict.notify_one();
                true
            }
            None => false,
        }
    }

    fn evict_all(&self) {
        let mut m = self.lock();
        m.of_conn.clear();
        for (_, (_, evict)) in std::mem::take(&mut m.by_age) {
            evict.notify_one();
        }
    }
}

/// Serve `app` on `listener` within `limits` until `shutdown` completes; then stop
/// accepting, close connections that wait for a request, let requests in progress
/// finish (for at most the header timeout) and return.
/// `tls`: serve HTTPS with this config (None: plain HTTP).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<Arc<ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tls = tls.map(TlsAcceptor::from);
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
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((s, peer)) => (s, peer),
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
        let evict = Arc::new(Notify::new());
        waiting.idle(id, &evict);
        let (waiting, builder, app, mut stop, tls) = (
            Arc::clone(&waiting),
            Arc::clone(&builder),
            app.clone(),
            stop_rx.clone(),
            tls.clone(),
        );
        let timeout = limits.header_timeout;
        tokio::spawn(async move {
            match tls {
                None => connection(stream, peer, id, &waiting, &builder, app, evict, stop).await,
                Some(acceptor) => {
                    let tls = tokio::select! {
                        s = handshake(stream, &acceptor, timeout) => s,
                        _ = evict.notified() => None,
                        _ = stop.changed() => None,
                    };
                    if let Some(s) = tls {
                        connection(s, peer, id, &waiting, &builder, app, evict, stop).await;
                    }
                }
            }
            waiting.busy(id);
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

/// What a plain-HTTP client of the HTTPS port is told.
const USE_HTTPS: &str = "{\"error\":{\"kind\":\"bad_request\",\"message\":\"this port \
speaks HTTPS: use an https:// URL (with --fingerprint or --ca for the appliance's \
certificate)\"}}";

/// The TLS handshake on `stream` within `timeout`; None if it failed, timed out, or the
/// client spoke plain HTTP (answered with a 400 that says so).
async fn handshake(
    stream: tokio::net::TcpStream,
    acceptor: &TlsAcceptor,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let work = async {
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await.ok()? == 0 {
            return None;
        }
        if first[0] != 0x16 {
            let mut stream = stream;
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                 connection: close\r\ncontent-length: {}\r\n\r\n{USE_HTTPS}",
                USE_HTTPS.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
            tracing::debug!("a plain-HTTP client on the HTTPS port was told to use https");
            return None;
        }
        match acceptor.accept(stream).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!("API TLS handshake: {e}");
                None
            }
        }
    };
    tokio::time::timeout(timeout, work).await.ok().flatten()
}

/// One connection, until it ends, is evicted, or shuts down gracefully on `stop`. Each
/// request carries the peer's address (`ConnectInfo`), for the failed-login limit.
#[allow(clippy::too_many_arguments)]
async fn connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    peer: std::net::SocketAddr,
    id: u64,
    waiting: &Arc<Waiting>,
    builder: &hyper::server::conn::http1::Builder,
    app: Router,
    evict: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let (w, e) = (Arc::clone(waiting), Arc::clone(&evict));
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            // A complete request header arrived: busy until the handler has answered. The
            // answer is then written at once (small JSON), and the connection is the most
            // recently idle one, the last to be evicted.
            w.busy(id);
            let (w, e) = (Arc::clone(&w), Arc::clone(&e));
            let mut app = app.clone();
            async move {
                let r = tower_service::Service::call(&mut app, req).await;
                w.idle(id, &e);
                r
            }
        });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut stopping = *stop.borrow();
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
            _ = evict.notified() => return,
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
