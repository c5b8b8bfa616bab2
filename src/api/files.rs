//! File-level restore over the API: a directory listing and a file's bytes, read from a
//! backup's chunks (see [`crate::files`]). Operator role: these hand out data.
//!
//! The file system reader is not `Send` (nor is the vault's lookup handle): each request
//! runs whole on one blocking thread. A file's bytes are streamed through a small
//! bounded channel with `Content-Length` set. The status is sent with the first 1 MiB:
//! a chunk failing verification before that is an error answer (500, the chunk named),
//! later it aborts the response (the client sees a short body, never wrong bytes); a
//! client that goes away stops the reading.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, Shared};
use crate::error::Error;
use crate::files::{EntryKind, normalize};

type R<T> = Result<T, ApiError>;

/// `?disk=&partition=&path=` of both routes; any other name is refused (400, naming it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesQuery {
    disk: Option<String>,
    partition: Option<String>,
    path: Option<String>,
}

fn partition(q: &FilesQuery) -> R<Option<u32>> {
    q.partition
        .as_ref()
        .map(|p| {
            p.parse::<u32>().map_err(|_| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("partition={p:?}: a partition number"),
                )
            })
        })
        .transpose()
}

/// `GET /backups/{id}/files?disk=&partition=&path=`: the partitions of the disk and,
/// with `path`, the entries of that directory (a non-directory lists itself).
pub async fn list(
    State(st): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<FilesQuery>,
) -> R<Json<Value>> {
    let part = partition(&q)?;
    st.run(move |_, app| {
        let s = app.open_files(&id, q.disk.as_deref())?;
        let mut v = json!({
            "backup": s.backup_id,
            "disk": s.disk_name,
            "scheme": s.disk.scheme,
            "partitions": s.disk.partitions,
        });
        let Some(path) = &q.path else {
            return Ok(Json(v));
        };
        let vol = s.disk.volume(part)?;
        let p = normalize(path)?;
        let top = vol.stat(&p)?;
        let entries = if top.kind == EntryKind::Dir {
            vol.list(&p)?
        } else {
            vec![top]
        };
        v["path"] = json!(path);
        v["entries"] = json!(entries);
        Ok(Json(v))
    })
    .await
}

/// `GET /backups/{id}/files/content?disk=&partition=&path=`: a regular file's bytes.
pub async fn content(
    State(st): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<FilesQuery>,
) -> R<Response> {
    let part = partition(&q)?;
    let Some(path) = q.path.clone() else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "path= names the file".into(),
        ));
    };
    let (head_tx, head_rx) = tokio::sync::oneshot::channel::<R<u64>>();
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let st2 = std::sync::Arc::clone(&st);
    tokio::task::spawn_blocking(move || {
        let opened = (|| -> R<_> {
            let app = st2.apps.get()?;
            let s = app.open_files(&id, q.disk.as_deref())?;
            drop(app);
            let vol = s.disk.volume(part)?;
            let p = normalize(&path)?;
            let e = vol.stat(&p)?;
            if e.kind != EntryKind::File {
                return Err(Error::config(format!("{path}: not a regular file")).into());
            }
            Ok((s, vol, p, e.size))
        })();
        let (_s, vol, p, size) = match opened {
            Ok(x) => x,
            Err(e) => {
                let _ = head_tx.send(Err(e));
                return;
            }
        };
        // The status goes out with the first bytes: a file whose first megabyte cannot
        // be read gets an error answer, a later failure cuts the body short.
        let mut head = Some(head_tx);
        let r = vol.read_file(&p, &mut |_, bytes| {
            if let Some(h) = head.take() {
                h.send(Ok(size))
                    .map_err(|_| Error::cancelled("the client went away"))?;
            }
            tx.blocking_send(Ok(Bytes::copy_from_slice(bytes)))
                .map_err(|_| Error::cancelled("the client went away"))
        });
        match (r, head.take()) {
            (Ok(()), Some(h)) => {
                let _ = h.send(Ok(size));
            }
            (Ok(()), None) => {}
            (Err(e), Some(h)) => {
                let _ = h.send(Err(e.into()));
            }
            (Err(e), None) => {
                tracing::warn!("streaming {path} of a backup: {e}");
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
        }
    });
    let size = head_rx.await.map_err(|_| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request's worker failed".into(),
        )
    })??;
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
