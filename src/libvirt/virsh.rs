//! Running `virsh` against one libvirt connection, with a deadline per command, and
//! turning its failures into [`Error`]s that say what to do.
//!
//! Every command is `virsh -q -c URI COMMAND ARGS…`; stdout is returned, stderr (its
//! `error: …` lines) becomes the error context. Output is read by helper threads so a
//! large answer (a domain XML) cannot block the child on a full pipe.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};

/// One libvirt connection, reached through the `virsh` client.
#[derive(Debug, Clone)]
pub struct Virsh {
    uri: String,
    timeout: Duration,
}

impl Virsh {
    pub fn new(uri: &str, timeout: Duration) -> Virsh {
        Virsh {
            uri: uri.to_string(),
            timeout,
        }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Run `virsh COMMAND ARGS`; stdout on success.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let what = format!("virsh -c {} {}", self.uri, args.join(" "));
        let mut child = Command::new("virsh")
            .arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::new(
                        ErrorKind::Unsupported,
                        "virsh is not installed: libvirt sources need the libvirt client \
                         (Debian: apt-get install libvirt-clients)",
                    )
                } else {
                    Error::io(format!("starting {what}"), e)
                }
            })?;
        let reader = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = Vec::new();
                let _ = r.read_to_end(&mut s);
                String::from_utf8_lossy(&s).into_owned()
            })
        };
        let out = child.stdout.take().map(|s| reader(Box::new(s)));
        let err = child.stderr.take().map(|s| reader(Box::new(s)));
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!(
                            "{what}: no answer within {} s (is libvirtd busy or hung?)",
                            self.timeout.as_secs()
                        ),
                    ));
                }
                Err(e) => return Err(Error::io(format!("waiting for {what}"), e)),
            }
        };
        let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
        let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
        if status.success() {
            return Ok(stdout);
        }
        let msg: Vec<&str> = stderr
            .lines()
            .map(|l| l.trim_start_matches("error: ").trim())
            .filter(|l| !l.is_empty())
            .collect();
        let msg = if msg.is_empty() {
            format!("exit status {status}")
        } else {
            msg.join("; ")
        };
        Err(classify(&self.uri, &what, &msg))
    }
}

/// The kind and advice for a virsh failure message.
fn classify(uri: &str, what: &str, msg: &str) -> Error {
    let lower = msg.to_ascii_lowercase();
    if lower.contains("failed to connect") || lower.contains("failed to connect socket") {
        Error::new(
            ErrorKind::Io,
            format!(
                "{what}: {msg} (is libvirtd running, and is {uri} the right connection? \
                 name it with libvirt:DOMAIN?uri=…)"
            ),
        )
    } else if lower.contains("domain not found")
        || lower.contains("failed to get domain")
        || lower.contains("no domain with matching name")
    {
        Error::not_found(format!(
            "{what}: {msg} (virsh -c {uri} list --all shows the domains)"
        ))
    } else if lower.contains("checkpoint not found") || lower.contains("no domain checkpoint") {
        Error::not_found(format!("{what}: {msg}"))
    } else if lower.contains("already") && lower.contains("job") || lower.contains("active job") {
        Error::conflict(format!("{what}: {msg}"))
    } else {
        Error::new(ErrorKind::Io, format!("{what}: {msg}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified_with_advice() {
        let e = classify(
            "qemu:///system",
            "virsh dumpxml x",
            "failed to get domain 'x'",
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("list --all"), "{e}");
        let e = classify(
            "qemu:///system",
            "virsh list",
            "failed to connect to the hypervisor",
        );
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().contains("libvirtd running"), "{e}");
    }
}
