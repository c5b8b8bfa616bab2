//! Exit status and the shape of a failure: every error the command line reports is
//! classified once here, from the library's [`ErrorKind`] (or the appliance's HTTP
//! status in remote mode), into a stable exit code and a `kind` word for `--json`.
//! The table is the one `--help` prints (see [`super::args::AFTER_HELP`]) and the README.

use blockvault::ErrorKind;
use serde_json::json;

/// A usage error raised by the command line itself (a bad combination of flags):
/// exit code 2, like clap's own.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// `Err(usage("…"))`: a usage error as an `anyhow::Error`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    Usage(msg.into()).into()
}

/// One class of failure: its exit code and the word `--json` names it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub code: i32,
    pub kind: &'static str,
}

const fn class(code: i32, kind: &'static str) -> Class {
    Class { code, kind }
}

pub const FAILED: Class = class(1, "failed");
pub const USAGE: Class = class(2, "usage");
pub const NOT_FOUND: Class = class(3, "not_found");
pub const CONFLICT: Class = class(4, "conflict");
pub const CORRUPT: Class = class(5, "corrupt");
pub const INVALID: Class = class(6, "invalid_input");
pub const IO: Class = class(7, "io");
pub const FULL: Class = class(8, "full");
pub const DENIED: Class = class(9, "denied");
pub const KEY_REQUIRED: Class = class(10, "key_required");
pub const WRONG_KEY: Class = class(11, "wrong_key");
pub const CANCELLED: Class = class(130, "cancelled");

fn of_kind(k: ErrorKind) -> Class {
    match k {
        ErrorKind::Config => USAGE,
        ErrorKind::NotFound => NOT_FOUND,
        ErrorKind::Conflict => CONFLICT,
        ErrorKind::Corrupt => CORRUPT,
        ErrorKind::InvalidFormat | ErrorKind::Unsupported => INVALID,
        ErrorKind::Io | ErrorKind::Unreachable => IO,
        ErrorKind::Full => FULL,
        ErrorKind::Cancelled => CANCELLED,
        ErrorKind::KeyRequired => KEY_REQUIRED,
        ErrorKind::WrongKey => WRONG_KEY,
    }
}

fn of_status(status: u16) -> Class {
    match status {
        400 | 422 => USAGE,
        401 | 403 => DENIED,
        404 => NOT_FOUND,
        409 => CONFLICT,
        507 => FULL,
        _ => FAILED,
    }
}

/// The class of an appliance's error `kind` (see `blockvault::api::KINDS`): the exit
/// code a local run of the same command would have given; None for a kind that only
/// its status classifies.
fn of_api_kind(kind: &str) -> Option<Class> {
    Some(match kind {
        "config" | "bad_request" => USAGE,
        "not_found" => NOT_FOUND,
        "conflict" => CONFLICT,
        "corrupt" => CORRUPT,
        "invalid_format" | "unsupported" => INVALID,
        "io" | "unreachable" => IO,
        "full" => FULL,
        "cancelled" => CANCELLED,
        "key_required" => KEY_REQUIRED,
        "wrong_key" => WRONG_KEY,
        "unauthorized" | "forbidden" => DENIED,
        _ => return None,
    })
}

/// The class of an error: the first cause in its chain that has one.
pub fn classify(e: &anyhow::Error) -> Class {
    for cause in e.chain() {
        if let Some(b) = cause.downcast_ref::<blockvault::Error>() {
            // A file that is not there is "not found", whoever tried to open it.
            if b.kind() == ErrorKind::Io
                && let Some(io) =
                    std::error::Error::source(b).and_then(|s| s.downcast_ref::<std::io::Error>())
                && io.kind() == std::io::ErrorKind::NotFound
            {
                return NOT_FOUND;
            }
            return of_kind(b.kind());
        }
        if let Some(r) = cause.downcast_ref::<Refused>() {
            return r
                .kind
                .as_deref()
                .and_then(of_api_kind)
                .unwrap_or(of_status(r.status));
        }
        if cause.is::<Usage>() {
            return USAGE;
        }
        if cause.is::<ureq::Error>() || cause.is::<super::client::NotTrusted>() {
            return DENIED;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::NotFound => NOT_FOUND,
                _ => IO,
            };
        }
    }
    FAILED
}

/// The error and its causes, each once: the library's errors already print their
/// source after their own context, so a cause the text already ends with is skipped.
pub fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.ends_with(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

/// `{"error": {"kind", "message", "exit_code"}}`: a failure under `--json`.
pub fn json_error(class: Class, message: &str) -> serde_json::Value {
    json!({"error": {"kind": class.kind, "message": message, "exit_code": class.code}})
}

/// Report a failure (on stderr, and as JSON on stdout under `--json`) and exit.
pub fn fail(class: Class, message: &str, json: bool) -> ! {
    if json {
        super::output::write_out(format_args!("{}", json_error(class, message)));
    }
    super::output::write_err(format_args!("error: {message}"));
    std::process::exit(class.code)
}

/// A non-2xx answer: the status and the appliance's own message.
#[derive(Debug)]
pub struct Refused {
    pub what: String,
    pub status: u16,
    /// The appliance's error `kind`, when it gave one.
    pub kind: Option<String>,
    pub msg: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the appliance refused {} ({}): {}",
            self.what, self.status, self.msg
        )
    }
}

impl std::error::Error for Refused {}
