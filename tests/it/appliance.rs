//! A real `blockvault serve` on 127.0.0.1:0, driven over real HTTPS: its self-signed
//! certificate is pinned by the fingerprint `serve` prints (or plain HTTP on loopback
//! when a test passes `--plain-http`).

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::Env;

pub struct Appliance {
    child: Child,
    pub url: String,
    /// The certificate's SHA-256 fingerprint as `serve` printed it (None: plain HTTP).
    pub fingerprint: Option<String>,
    agent: ureq::Agent,
}

/// Fingerprints of the appliances started, by URL: a remote CLI run is given the one of
/// the URL it talks to.
static FINGERPRINTS: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

/// `BLOCKVAULT_FINGERPRINT` for a CLI run against `url` (none for plain HTTP).
pub fn trust_env(url: &str) -> Vec<(&'static str, String)> {
    let map = FINGERPRINTS.lock().unwrap_or_else(|e| e.into_inner());
    let base = url.split("/api/").next().unwrap_or(url);
    map.as_ref()
        .and_then(|m| m.get(base.trim_end_matches('/')))
        .map(|f| vec![("BLOCKVAULT_FINGERPRINT", f.clone())])
        .unwrap_or_default()
}

/// The URL and fingerprint in `serve`'s first line: "... listening on URL" and, for
/// HTTPS, " (certificate SHA-256 FP)".
pub fn parse_ready(line: &str) -> (String, Option<String>) {
    let rest = line
        .trim()
        .split("listening on ")
        .nth(1)
        .unwrap_or_else(|| panic!("not a ready line: {line}"));
    let mut words = rest.split_whitespace();
    let url = words.next().unwrap_or_default().to_string();
    let fp = rest
        .split("certificate SHA-256 ")
        .nth(1)
        .map(|f| f.trim_end_matches(')').to_string());
    (url, fp)
}

/// A ureq agent for tests that verifies the appliance by `fingerprint` (or plain HTTP).
pub fn agent_for(fingerprint: Option<&str>) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        // A refused request's body is not read, so the server closes that
        // connection: do not reuse connections.
        .max_idle_connections(0)
        .max_idle_connections_per_host(0)
        .build();
    let trust = match fingerprint {
        Some(f) => blockvault::tls::client::Trust::Fingerprint(
            blockvault::tls::parse_fingerprint(f).unwrap(),
        ),
        None => blockvault::tls::client::Trust::PublicRoots,
    };
    blockvault::tls::client::agent(config, &trust).unwrap()
}

impl Appliance {
    /// Start `blockvault serve` on the data dir of `env` (extra args: e.g. --config),
    /// with `[paths]` that let API callers name any host path, socket and NBD server
    /// (the tests of other features use files wherever their temp dirs are; the
    /// confinement itself is tested with [`Appliance::start_confined`]).
    pub fn start(env: &Env, extra: &[&str]) -> Appliance {
        Appliance::start_env(env, extra, &[])
    }

    /// [`Appliance::start`] with extra environment variables (e.g. `BLOCKVAULT_NOW`).
    pub fn start_env(env: &Env, extra: &[&str], vars: &[(&str, &str)]) -> Appliance {
        const OPEN: &str = "\n[paths]\nsources = [\"/\"]\nrestore_to = [\"/\"]\n\
            nbd_hosts = [\"*\"]\nqmp_sockets = [\"/\"]\nlibvirt_domains = [\"*\"]\n";
        let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let at = args.iter().position(|a| a == "--config");
        let mut text = at
            .and_then(|i| args.get(i + 1))
            .map(|c| std::fs::read_to_string(c).expect("reading the test's config"))
            .unwrap_or_default();
        if !text.contains("[paths]") {
            text.push_str(OPEN);
        }
        let cfg = env.path("serve-open-paths.toml");
        std::fs::write(&cfg, text).unwrap();
        let cfg = cfg.to_string_lossy().into_owned();
        match at {
            Some(i) => args[i + 1] = cfg,
            None => args.extend(["--config".to_string(), cfg]),
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Appliance::start_confined_env(env, &args, vars)
    }

    /// Start `blockvault serve` as `extra` says, with the `[paths]` of its config (the
    /// defaults without one).
    pub fn start_confined(env: &Env, extra: &[&str]) -> Appliance {
        Appliance::start_confined_env(env, extra, &[])
    }

    /// [`Appliance::start_confined`] with extra environment variables.
    pub fn start_confined_env(env: &Env, extra: &[&str], vars: &[(&str, &str)]) -> Appliance {
        let mut child = env
            .cmd()
            .envs(vars.iter().copied())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting blockvault serve");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let (url, fingerprint) = parse_ready(&line);
        if extra.contains(&"--plain-http") {
            assert!(url.starts_with("http://127.0.0.1:"), "{line}");
        } else {
            assert!(url.starts_with("https://127.0.0.1:"), "{line}");
            let f = fingerprint.clone().expect("serve prints its fingerprint");
            FINGERPRINTS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(HashMap::new)
                .insert(url.clone(), f);
        }
        Appliance {
            child,
            agent: agent_for(fingerprint.as_deref()),
            url,
            fingerprint,
        }
    }

    /// `METHOD /api/v1PATH` with `token` and `body`; returns (status, JSON body).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}/api/v1{path}", self.url);
        let auth = token.map(|t| format!("Bearer {t}"));
        macro_rules! with_auth {
            ($rb:expr) => {{
                let rb = $rb;
                match &auth {
                    Some(a) => rb.header("Authorization", a),
                    None => rb,
                }
            }};
        }
        let r = match (method, body) {
            ("GET", _) => with_auth!(self.agent.get(&url)).call(),
            ("DELETE", _) => with_auth!(self.agent.delete(&url)).call(),
            ("POST", Some(b)) => with_auth!(self.agent.post(&url)).send_json(&b),
            ("POST", None) => with_auth!(self.agent.post(&url)).send_empty(),
            ("PATCH", b) => with_auth!(self.agent.patch(&url)).send_json(b.unwrap_or(json!({}))),
            ("PUT", b) => with_auth!(self.agent.put(&url)).send_json(b.unwrap_or(json!({}))),
            (m, _) => panic!("method {m}"),
        };
        let mut resp = r.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let v = resp.body_mut().read_json::<Value>().unwrap_or(Value::Null);
        (status, v)
    }

    /// Any `method` on `/api/v1PATH` (HEAD, PUT, OPTIONS…) with `token` and a JSON
    /// `body`; returns the status, the headers and the body text.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, ureq::http::HeaderMap, String) {
        self.raw_typed(
            method,
            &format!("/api/v1{path}"),
            token,
            "application/json",
            body,
        )
    }

    /// Like `raw` with any `content_type`, on any `path` of the appliance (not only
    /// under `/api/v1`).
    pub fn raw_typed(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: &str,
    ) -> (u16, ureq::http::HeaderMap, String) {
        let mut rb = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url))
            .header("content-type", content_type);
        if let Some(t) = token {
            rb = rb.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = self
            .agent
            .run(rb.body(body.to_string()).unwrap())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let text = if method == "HEAD" {
            String::new()
        } else {
            resp.body_mut().read_to_string().unwrap_or_default()
        };
        (resp.status().as_u16(), resp.headers().clone(), text)
    }

    /// Like `call`, requiring `want` status.
    pub fn ok(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
        want: u16,
    ) -> Value {
        let (s, v) = self.call(method, path, Some(token), body);
        assert_eq!(s, want, "{method} {path}: {v}");
        v
    }

    /// Wait until task `id` ended; returns it.
    pub fn wait_task(&self, token: &str, id: &str, limit: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let t = self.ok("GET", &format!("/tasks/{id}"), token, None, 200);
            if ["succeeded", "failed", "cancelled"].contains(&t["state"].as_str().unwrap_or("")) {
                return t;
            }
            assert!(t0.elapsed() < limit, "task {id} still {}", t["state"]);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Back up `resource` now (POST /backups), wait for the task to succeed, and return
    /// the new backup's id.
    pub fn backup_now(&self, token: &str, resource: &str, limit: Duration) -> String {
        let t = self.ok(
            "POST",
            "/backups",
            token,
            Some(serde_json::json!({ "resource": resource })),
            202,
        );
        let t = self.wait_task(token, t["task"].as_str().unwrap(), limit);
        assert_eq!(t["state"], "succeeded", "{t}");
        t["result"]["backup"].as_str().unwrap().to_string()
    }

    /// The process id of the running `serve`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait; returns whether it exited cleanly.
    pub fn stop(mut self) -> bool {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap().success()
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Create a token with `role` offline; returns the secret (the last line of stdout).
pub fn token(env: &Env, role: &str, name: &str) -> String {
    let out = env.ok(&["token", "create", "--role", role, "--name", name]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn the_systemd_unit_runs_serve_as_its_own_user_restarts_and_is_hardened() {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance/blockvault.service"),
    )
    .unwrap();
    let has = |kv: &str| unit.lines().any(|l| l.trim() == kv);
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    assert!(
        exec.contains(" serve --config /etc/blockvault/blockvault.toml"),
        "{exec}"
    );
    for kv in [
        "User=blockvault",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "StateDirectory=blockvault",
        "KillSignal=SIGTERM",
        "CapabilityBoundingSet=",
        // Idle-connection floods: the connection cap stays far below this.
        "LimitNOFILE=65536",
    ] {
        assert!(has(kv), "the unit lacks {kv}");
    }
}

#[test]
fn a_second_serve_on_the_same_data_dir_refuses_to_start_and_the_first_keeps_answering() {
    let env = Env::new();
    let token = token(&env, "admin", "first");
    let first = Appliance::start(&env, &[]);
    let second = env
        .cmd()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .expect("running a second serve");
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(4), "{err}");
    assert!(err.contains("another blockvault serve"), "{err}");
    assert!(
        String::from_utf8_lossy(&second.stdout).is_empty(),
        "the second serve must not say it listens"
    );
    // The first appliance is untouched: it answers, with its token, as before.
    let health = first.ok("GET", "/health", &token, None, 200);
    assert_eq!(health["status"], "ok", "{health}");
    assert!(first.stop(), "the first serve stops cleanly");
    // Once it is gone, a new serve on the same data dir starts.
    let again = Appliance::start(&env, &[]);
    assert!(again.stop());
}
