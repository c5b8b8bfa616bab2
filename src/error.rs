//! The one error type of the library.
//!
//! Policy (after rustic_core's `error.rs`):
//! - Library code returns [`Error`]; `anyhow` lives only in `main.rs`.
//! - An error carries a [`ErrorKind`] (what class of failure, so callers and the CLI can
//!   decide what to do), a human context that says *what* failed and *where* (path, disk
//!   offset, chunk digest), and the underlying source error when there is one.
//! - Input from outside (images, NBD servers, vault files) never panics: parsers return
//!   `InvalidFormat` or `Corrupt` with the offending offset.
//! - The message is written for the administrator: it names the object and, where there is
//!   one, the thing to do next.

use std::fmt;

/// Class of a failure.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// An operating-system I/O error (open, read, write, fsync, rename).
    Io,
    /// Input is not in the format it claims to be (image, manifest, pack, blob).
    InvalidFormat,
    /// Valid input that uses a feature we do not implement.
    Unsupported,
    /// Stored data failed an integrity check (digest or checksum mismatch).
    Corrupt,
    /// A named object (vault, backup, chunk, pack) does not exist.
    NotFound,
    /// The operation conflicts with the current state (name taken, vault locked).
    Conflict,
    /// Bad configuration or arguments.
    Config,
    /// The operation was cancelled.
    Cancelled,
    /// A capacity limit would be exceeded.
    Full,
    /// A source (image file, NBD server, QMP socket) could not be reached.
    Unreachable,
    /// The vault is encrypted and no key was given (`--keyfile` / `--passphrase-env`).
    KeyRequired,
    /// The key given does not open any of the vault's key wrappings.
    WrongKey,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::InvalidFormat => "invalid format",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Corrupt => "corrupt data",
            ErrorKind::NotFound => "not found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Config => "configuration error",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Full => "capacity exceeded",
            ErrorKind::Unreachable => "source unreachable",
            ErrorKind::KeyRequired => "key required",
            ErrorKind::WrongKey => "wrong key",
        };
        f.write_str(s)
    }
}

impl ErrorKind {
    /// A stable snake_case name for machines (a task's `error_kind` in the API).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::InvalidFormat => "invalid_format",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Config => "config",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Full => "full",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::KeyRequired => "key_required",
            ErrorKind::WrongKey => "wrong_key",
        }
    }

    /// The kind [`ErrorKind::as_str`] names.
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        [
            ErrorKind::Io,
            ErrorKind::InvalidFormat,
            ErrorKind::Unsupported,
            ErrorKind::Corrupt,
            ErrorKind::NotFound,
            ErrorKind::Conflict,
            ErrorKind::Config,
            ErrorKind::Cancelled,
            ErrorKind::Full,
            ErrorKind::Unreachable,
            ErrorKind::KeyRequired,
            ErrorKind::WrongKey,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }
}

type BoxedSource = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The library's error: kind + context + optional source.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<BoxedSource>,
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message saying what failed and where.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl Into<BoxedSource>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// An I/O error with context (usually the path).
    pub fn io(context: impl Into<String>, err: std::io::Error) -> Self {
        Error::new(ErrorKind::Io, context).with_source(err)
    }

    /// Shorthands for the common kinds.
    pub fn invalid(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidFormat, context)
    }
    pub fn corrupt(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, context)
    }
    pub fn not_found(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::NotFound, context)
    }
    pub fn unsupported(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, context)
    }
    pub fn config(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, context)
    }
    pub fn conflict(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Conflict, context)
    }
    pub fn cancelled(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Cancelled, context)
    }

    /// The class of this failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human context (without the source chain).
    pub fn context(&self) -> &str {
        &self.context
    }

    /// The same failure seen as another class (e.g. an I/O error while probing a
    /// source is the source being unreachable).
    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }

    /// Prefix more context ("while backing up disk X: ...").
    pub fn context_prefix(mut self, prefix: impl fmt::Display) -> Self {
        self.context = format!("{prefix}: {}", self.context);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.context)?;
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

impl From<rusqlite::Error> for Error {
    fn from(err: rusqlite::Error) -> Self {
        Error::new(ErrorKind::Io, "catalog database error").with_source(err)
    }
}

/// Add context to I/O results: `file.read(..).ctx(|| format!("reading {path}"))`.
pub trait IoContext<T> {
    fn ctx<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_includes_context_and_source() {
        let e = Error::io(
            "reading /x",
            std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        );
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.to_string(), "reading /x: gone");
        let e = e.context_prefix("backup of d1");
        assert_eq!(e.to_string(), "backup of d1: reading /x: gone");
    }

    #[test]
    fn kind_names_round_trip() {
        for k in [
            ErrorKind::Io,
            ErrorKind::NotFound,
            ErrorKind::Full,
            ErrorKind::Corrupt,
        ] {
            assert_eq!(ErrorKind::from_name(k.as_str()), Some(k));
        }
        assert_eq!(ErrorKind::from_name("nope"), None);
    }
}
