//! A small synchronous client for QMP (the QEMU Machine Protocol) and for the QEMU
//! guest agent (QGA), both JSON messages over a unix socket.
//!
//! QMP, as spoken by a QEMU VM or qemu-storage-daemon (`--chardev socket,... --monitor`):
//! ```text
//!  server: {"QMP": {"version": {...}, "capabilities": [...]}}        greeting
//!  client: {"execute": "qmp_capabilities", "id": 1}
//!  server: {"return": {}, "id": 1}
//!  client: {"execute": "query-block-exports", "id": 2}
//!  server: {"event": "JOB_STATUS_CHANGE", "data": {...}, "timestamp": {...}}   any time
//!  server: {"return": [...], "id": 2}      or {"error": {"class": "...", "desc": "..."}, "id": 2}
//! ```
//! Messages are one JSON object per line (QEMU ends them with `\r\n`). Events that arrive
//! while waiting for a reply are queued and can be waited for with [`Qmp::wait_event`].
//! The guest agent has no greeting and no ids: [`Qga`] resynchronises with `guest-sync`
//! (a random token echoed back) before each command, so a stale reply from an earlier
//! timed-out command is never taken for the answer to the current one.
//!
//! Why our own: the QMP crates on the registry are either async-only or generate the
//! whole QAPI schema; we need a dozen commands, synchronously, with timeouts and a cap
//! on message size (a hostile or confused peer must not make us allocate without bound).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::{Error, ErrorKind, Result};

/// Largest message accepted from the peer.
const MAX_MESSAGE: u64 = 16 << 20;

/// One JSON object per line over a unix socket, with a cap and a deadline.
struct JsonLines {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl JsonLines {
    fn connect(path: &Path, timeout: Duration) -> Result<JsonLines> {
        let stream = UnixStream::connect(path)
            .map_err(|e| Error::io(format!("connecting to {}", path.display()), e))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(|e| Error::io("setting a socket timeout", e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| Error::io("cloning a socket", e))?;
        Ok(JsonLines {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    fn send(&mut self, msg: &Value) -> Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(|e| Error::invalid(e.to_string()))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| Error::io(format!("writing to {}", self.path.display()), e))
    }

    /// The next message, waiting at most until `deadline`.
    fn recv(&mut self, deadline: Instant) -> Result<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out());
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| Error::io("setting a socket timeout", e))?;
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_MESSAGE)
            .read_until(b'\n', &mut line)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => self.timed_out(),
                _ => Error::io(format!("reading from {}", self.path.display()), e),
            })?;
        if n == 0 {
            return Err(Error::new(
                ErrorKind::Io,
                format!("{} closed the connection", self.path.display()),
            ));
        }
        if !line.ends_with(b"\n") {
            return Err(Error::invalid(format!(
                "{}: message longer than {MAX_MESSAGE} bytes or cut off",
                self.path.display()
            )));
        }
        serde_json::from_slice(&line).map_err(|e| {
            Error::invalid(format!("{}: a message is not JSON", self.path.display())).with_source(e)
        })
    }

    fn timed_out(&self) -> Error {
        Error::new(
            ErrorKind::Io,
            format!("{} did not answer in time", self.path.display()),
        )
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub event: String,
    #[serde(default)]
    pub data: Value,
}

/// A QMP connection (capabilities negotiated).
pub struct Qmp {
    conn: JsonLines,
    next_id: u64,
    events: VecDeque<Event>,
    timeout: Duration,
    /// QEMU's version as "major.minor.micro".
    pub version: String,
}

impl Qmp {
    /// Connect, read the greeting and leave capabilities negotiation mode. `timeout` bounds
    /// every later command too.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let mut conn = JsonLines::connect(path, timeout)?;
        let greeting = conn.recv(Instant::now() + timeout)?;
        let v = greeting
            .get("QMP")
            .and_then(|q| q.get("version"))
            .and_then(|v| v.get("qemu"))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{} is not a QMP socket (no QMP greeting)",
                    path.display()
                ))
            })?;
        let part = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let version = format!("{}.{}.{}", part("major"), part("minor"), part("micro"));
        let mut qmp = Qmp {
            conn,
            next_id: 1,
            events: VecDeque::new(),
            timeout,
            version,
        };
        qmp.execute_value("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Run `command` and deserialize its `return` value.
    pub fn execute<T: DeserializeOwned>(&mut self, command: &str, args: Value) -> Result<T> {
        let v = self.execute_value(command, args)?;
        serde_json::from_value(v).map_err(|e| {
            Error::invalid(format!("QMP {command}: unexpected reply shape")).with_source(e)
        })
    }

    /// Run `command` and return its `return` value as JSON.
    pub fn execute_value(&mut self, command: &str, args: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": command, "id": id});
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = args;
        }
        self.conn.send(&msg)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let reply = self.conn.recv(deadline).map_err(|e| {
                e.context_prefix(format!("QMP {command} on {}", self.conn.path.display()))
            })?;
            if reply.get("event").is_some() {
                if let Ok(ev) = serde_json::from_value::<Event>(reply) {
                    self.events.push_back(ev);
                }
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                continue; // a reply to an earlier command that timed out
            }
            if let Some(err) = reply.get("error") {
                let class = err.get("class").and_then(Value::as_str).unwrap_or("");
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("?");
                let kind = match class {
                    "DeviceNotFound" => ErrorKind::NotFound,
                    _ => ErrorKind::Conflict,
                };
                return Err(Error::new(kind, format!("QMP {command}: {desc}")));
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Wait (at most `timeout`) for an event that `want` accepts; events already queued
    /// count. Other events stay queued.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        want: impl Fn(&Event) -> bool,
    ) -> Result<Event> {
        if let Some(i) = self.events.iter().position(&want) {
            return Ok(self.events.remove(i).expect("index from position"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let msg = self.conn.recv(deadline)?;
            if msg.get("event").is_none() {
                continue;
            }
            let Ok(ev) = serde_json::from_value::<Event>(msg) else {
                continue;
            };
            if want(&ev) {
                return Ok(ev);
            }
            self.events.push_back(ev);
        }
    }

    /// Drop queued events (e.g. before starting a new phase).
    pub fn clear_events(&mut self) {
        self.events.clear();
    }
}

/// A QEMU guest agent connection (the host side of its virtio-serial channel).
pub struct Qga {
    conn: JsonLines,
}

impl Qga {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qga> {
        Ok(Qga {
            conn: JsonLines::connect(path, timeout)?,
        })
    }

    /// Resynchronise, then run `command`, waiting at most `timeout` for its reply.
    pub fn execute(&mut self, command: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let token: u32 = rand::random::<u32>() >> 1;
        self.conn
            .send(&json!({"execute": "guest-sync", "arguments": {"id": token}}))?;
        loop {
            let r = self.conn.recv(deadline)?;
            if r.get("return").and_then(Value::as_u64) == Some(u64::from(token)) {
                break;
            }
        }
        self.conn.send(&json!({"execute": command}))?;
        let r = self.conn.recv(deadline)?;
        if let Some(err) = r.get("error") {
            let desc = err.get("desc").and_then(Value::as_str).unwrap_or("?");
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("guest agent {command}: {desc}"),
            ));
        }
        Ok(r.get("return").cloned().unwrap_or(Value::Null))
    }
}
