//! The appliance's HTTP API as the command line calls it: one [`Remote`] (base URL,
//! bearer token, an HTTP agent with timeouts), JSON in and out, non-2xx answers as
//! [`Refused`] errors, and waiting on a task with progress and Ctrl-C cancel. Used by
//! remote mode (`remote`) and by `tasks`.
//!
//! An `https://` appliance is verified by `--fingerprint` (pinned leaf SHA-256), else
//! `--ca FILE`, else the public CAs (see `blockvault::tls::client`); a refusal names the
//! fingerprint presented and the one expected, and nothing (no token) was sent. An
//! `http://` URL is allowed only to a loopback address (an appliance run with
//! `--plain-http`): the token never crosses a network in clear.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use blockvault::tls::client::Trust;

use super::args::Cli;
use super::cancel_on_signals;
use super::exit::{Refused, usage};
use super::output::human;

/// A running appliance's API.
pub struct Remote {
    base: String,
    auth: String,
    agent: ureq::Agent,
}

/// One path segment, percent-encoded (resource names are often paths).
pub fn seg(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

/// How `cli` says the appliance's certificate is checked.
pub fn trust(cli: &Cli) -> Result<Trust> {
    Ok(match (&cli.fingerprint, &cli.ca) {
        (Some(_), Some(_)) => {
            return Err(usage(
                "--fingerprint and --ca exclude each other: pin the certificate or name its CA",
            ));
        }
        (Some(f), None) => Trust::Fingerprint(blockvault::tls::parse_fingerprint(f)?),
        (None, Some(ca)) => Trust::Ca(ca.clone()),
        (None, None) => Trust::PublicRoots,
    })
}

/// Whether the host of `url` (after the scheme) is a loopback address or `localhost`.
fn is_loopback(rest: &str) -> bool {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Remote {
    pub fn new(url: &str, token: Option<&str>, trust: &Trust) -> Result<Remote> {
        let Some(token) = token else {
            return Err(usage(
                "--server needs --token (or BLOCKVAULT_TOKEN); create one with `blockvault token create`",
            ));
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(usage(format!(
                "--server must be an http:// or https:// URL, not {url:?}"
            )));
        }
        if let Some(rest) = url.strip_prefix("http://")
            && !is_loopback(rest)
        {
            return Err(usage(format!(
                "refusing to send the token in clear to {url}: plain http:// is only for a \
                 loopback appliance (serve --plain-http); use https:// with --fingerprint \
                 (`blockvault tls fingerprint` on the appliance) or --ca FILE"
            )));
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build();
        Ok(Remote {
            base: format!("{}/api/v1", url.trim_end_matches('/')),
            auth: format!("Bearer {token}"),
            agent: blockvault::tls::client::agent(config, trust)?,
        })
    }

    /// `METHOD /api/v1PATH` with an optional JSON body; a non-2xx answer is an error
    /// that carries the appliance's own message.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let r = match (method, body) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("Authorization", &self.auth)
                .call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &self.auth)
                .call(),
            ("POST", Some(b)) => self
                .agent
                .post(&url)
                .header("Authorization", &self.auth)
                .send_json(b),
            ("POST", None) => self
                .agent
                .post(&url)
                .header("Authorization", &self.auth)
                .send_empty(),
            (m, _) => bail!("HTTP method {m} is not used by the command line"),
        };
        let mut resp = match r {
            Ok(resp) => resp,
            Err(e) => return Err(unreachable(&url, e)),
        };
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer of {method} {url}"))?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !(200..300).contains(&status) {
            // `{"error": {"kind", "message"}}` (an older appliance: `{"error": "..."}`).
            let e = &v["error"];
            let msg = e["message"]
                .as_str()
                .or_else(|| e.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| match status {
                    401 => "no or unknown token".into(),
                    403 => "the token's role may not do this".into(),
                    _ => v.to_string(),
                });
            return Err(Refused {
                what: format!("{method} {path}"),
                status,
                kind: e["kind"].as_str().map(str::to_string),
                msg,
            }
            .into());
        }
        Ok(v)
    }

    /// Follow task `id` to its end (progress on a terminal; Ctrl-C cancels it on the
    /// appliance); returns its result, or fails with the task's error.
    pub fn wait_task(&self, cli: &Cli, id: &str) -> Result<Value> {
        let stop = cancel_on_signals()?;
        let bar = (!cli.quiet && !cli.json && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(100);
            b.set_style(
                indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos:>3}% {prefix}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b
        });
        let mut asked_cancel = false;
        let t = loop {
            let t = self.call("GET", &format!("/tasks/{}", seg(id)), None)?;
            let state = t["state"].as_str().unwrap_or("").to_string();
            if let Some(b) = &bar {
                b.set_message(state.clone());
                b.set_position(t["progress_percent"].as_f64().unwrap_or(0.0) as u64);
                b.set_prefix(format!(
                    "{}/s",
                    human(t["bytes_per_second"].as_f64().unwrap_or(0.0) as u64)
                ));
            }
            if ["succeeded", "failed", "cancelled"].contains(&state.as_str()) {
                break t;
            }
            if stop.load(Ordering::Relaxed) && !asked_cancel {
                self.call("POST", &format!("/tasks/{}/cancel", seg(id)), None)?;
                asked_cancel = true;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        match t["state"].as_str() {
            Some("succeeded") => Ok(t["result"].clone()),
            Some(s) => {
                let msg = format!(
                    "task {id} {s}: {}",
                    t["error"].as_str().unwrap_or("no error recorded")
                );
                // The task's error kind gives the exit code a local run would have.
                match t["error_kind"]
                    .as_str()
                    .and_then(blockvault::ErrorKind::from_name)
                {
                    Some(k) => Err(blockvault::Error::new(k, msg).into()),
                    None => bail!(msg),
                }
            }
            None => bail!("task {id}: the appliance sent no state"),
        }
    }
}

/// A failed request as the person should read it: the certificate refusal as the
/// verifier worded it, a server that does not speak TLS named as such.
fn unreachable(url: &str, e: ureq::Error) -> anyhow::Error {
    if let Some(msg) = blockvault::tls::client::refusal(&e) {
        return NotTrusted(format!("the appliance at {url} was refused: {msg}")).into();
    }
    if blockvault::tls::client::not_tls(&e) {
        return NotTrusted(format!(
            "the server at {url} does not speak TLS ({e}): an appliance run with \
             --plain-http is reached with http:// on its loopback address"
        ))
        .into();
    }
    anyhow::Error::new(e).context(format!("reaching the appliance at {url}"))
}

/// The appliance could not be verified (or does not speak TLS): exit status 9, like an
/// unreachable appliance.
#[derive(Debug)]
pub struct NotTrusted(pub String);

impl std::fmt::Display for NotTrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotTrusted {}
