//! Webhook alerts against a real `serve`: stale-backup episodes raised once and cleared,
//! across a restart; the outbox resuming a pending retry after `kill -9` with the same
//! delivery id; the outbox cap with a dead receiver; the address check at delivery.
//! The receivers are real HTTP listeners on 127.0.0.1 in the test process.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::{Env, write_raw};

/// One request the receiver got: its headers (lower-case names) and JSON body.
type Got = Arc<Mutex<Vec<(HashMap<String, String>, Value)>>>;

/// An HTTP receiver that records every POST and answers `status` (changeable).
struct Receiver {
    url: String,
    port: u16,
    got: Got,
    status: Arc<AtomicU16>,
}

impl Receiver {
    fn start() -> Receiver {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let got: Got = Arc::default();
        let status = Arc::new(AtomicU16::new(200));
        let (g, st) = (Arc::clone(&got), Arc::clone(&status));
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut headers = HashMap::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                    }
                }
                let len = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                let _ = r.read_exact(&mut body);
                let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
                g.lock().unwrap().push((headers, v));
                let s = st.load(Ordering::SeqCst);
                let _ = conn.write_all(
                    format!("HTTP/1.1 {s} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        Receiver {
            url: format!("http://127.0.0.1:{port}/hook"),
            port,
            got,
            status,
        }
    }

    fn kinds(&self, kind: &str) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, v)| v["kind"] == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn ids(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(h, _)| h["x-blockvault-delivery"].clone())
            .collect()
    }
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn config(env: &Env, alerts: &str, hooks: &[&str]) -> String {
    let mut text = format!("[alerts]\n{alerts}\n");
    for url in hooks {
        text.push_str(&format!(
            "[[alerts.webhook]]\nurl = \"{url}\"\ntimeout_seconds = 5\n"
        ));
    }
    let cfg = env.path("bv.toml");
    std::fs::write(&cfg, text).unwrap();
    cfg.to_str().unwrap().to_owned()
}

/// A disk resource whose image is then removed: every backup of it fails.
fn gone_resource(srv: &Appliance, admin: &str, env: &Env) -> std::path::PathBuf {
    let img = env.path("gone.raw");
    write_raw(&img, 1 << 20, 0, &[1u8; 4096]);
    srv.ok(
        "POST",
        "/resources",
        admin,
        Some(json!({"name": "gone", "kind": "disk", "sources": [img.to_str().unwrap()], "vault": "v"})),
        201,
    );
    std::fs::remove_file(&img).unwrap();
    img
}

fn failing_backup(srv: &Appliance, admin: &str) {
    let t = srv.ok(
        "POST",
        "/backups",
        admin,
        Some(json!({"resource": "gone"})),
        202,
    );
    let done = srv.wait_task(admin, t["task"].as_str().unwrap(), Duration::from_secs(30));
    assert_eq!(done["state"], "failed", "{done}");
}

fn stale_checks(srv: &Appliance, admin: &str) -> u64 {
    let h = srv.ok("GET", "/health", admin, None, 200);
    h["alerts"]["stale_checks"].as_u64().unwrap()
}

fn raised(srv: &Appliance, admin: &str, kind: &str) -> usize {
    srv.ok("GET", "/alerts", admin, None, 200)
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == kind)
        .count()
}

#[test]
fn a_resource_without_a_good_backup_is_stale_once_across_a_restart_and_fresh_after_a_good_backup() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let rx = Receiver::start();
    // Period 2 s (a run every 2 s), grace 3 s: late 5 s after the check starts watching.
    let cfg = config(
        &env,
        "stale_grace_minutes = 0.05\nallowed_hosts = [\"127.0.0.1\"]",
        &[&rx.url],
    );
    let srv = Appliance::start(&env, &["--config", &cfg]);
    let img = gone_resource(&srv, &admin, &env);
    srv.ok(
        "POST",
        "/policies",
        &admin,
        Some(json!({"name": "often", "schedule": "*/2 * * * * *", "resources": ["gone"]})),
        201,
    );
    wait_until("backup_stale", Duration::from_secs(60), || {
        !rx.kinds("backup_stale").is_empty()
    });
    // Several more checks: the episode is not raised again.
    let n = stale_checks(&srv, &admin);
    wait_until("three more checks", Duration::from_secs(60), || {
        stale_checks(&srv, &admin) >= n + 3
    });
    assert_eq!(raised(&srv, &admin, "backup_stale"), 1);
    let v = &rx.kinds("backup_stale")[0];
    assert_eq!(v["subject"], "gone", "{v}");
    assert!(v["time"].is_string() && v["message"].is_string(), "{v}");
    assert_eq!(v["details"]["resource"], "gone", "{v}");
    assert_eq!(v["details"]["policy"], "often", "{v}");
    assert_eq!(v["details"]["period_seconds"], 2, "{v}");
    assert!(v["details"].get("backup").is_none(), "no backup yet: {v}");
    // A restart: the open episode is in the catalog, not raised again.
    assert!(srv.stop());
    let srv = Appliance::start(&env, &["--config", &cfg]);
    wait_until(
        "three checks after the restart",
        Duration::from_secs(60),
        || stale_checks(&srv, &admin) >= 3,
    );
    assert_eq!(raised(&srv, &admin, "backup_stale"), 1);
    assert_eq!(rx.kinds("backup_stale").len(), 1);
    assert!(rx.kinds("backup_fresh").is_empty());
    // The source comes back: the policy's next run makes a good backup, the episode ends.
    write_raw(&img, 1 << 20, 0, &[1u8; 4096]);
    wait_until("backup_fresh", Duration::from_secs(60), || {
        !rx.kinds("backup_fresh").is_empty()
    });
    let v = &rx.kinds("backup_fresh")[0];
    assert_eq!(v["details"]["policy"], "often", "{v}");
    let b = v["details"]["backup"].as_str().expect("the good backup");
    let backups = srv.ok("GET", "/backups", &admin, None, 200);
    assert!(
        backups.as_array().unwrap().iter().any(|x| x["id"] == b),
        "{backups}"
    );
    assert!(v["details"]["backup_time"].is_string(), "{v}");
    assert!(srv.stop());
}

#[test]
fn a_delivery_waiting_for_its_retry_survives_kill_9_and_arrives_with_the_same_id() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let rx = Receiver::start();
    rx.status.store(500, Ordering::SeqCst);
    let cfg = config(
        &env,
        "retry_seconds = [3, 3]\nallowed_hosts = [\"127.0.0.1\"]",
        &[&rx.url],
    );
    let srv = Appliance::start(&env, &["--config", &cfg]);
    gone_resource(&srv, &admin, &env);
    failing_backup(&srv, &admin);
    // Every delivery was tried once, answered 500, and waits for its retry.
    let mut pending = Vec::new();
    wait_until("first attempts recorded", Duration::from_secs(30), || {
        let d = srv.ok("GET", "/alerts/deliveries", &admin, None, 200);
        let d = d.as_array().unwrap().clone();
        let ready = !d.is_empty()
            && d.iter()
                .all(|x| x["state"] == "pending" && x["attempts"] == 1);
        if ready {
            pending = d;
        }
        ready
    });
    for d in &pending {
        assert_eq!(d["last_error"], "answered 500 Internal Server Error", "{d}");
        assert!(d["next_try"].is_string(), "{d}");
        assert_eq!(d["target"], format!("http://127.0.0.1:{}", rx.port));
    }
    let first: HashSet<String> = rx.ids().into_iter().collect();
    let want: HashSet<String> = pending
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(first, want);
    // kill -9, the receiver recovers, the appliance starts again.
    drop(srv);
    rx.status.store(200, Ordering::SeqCst);
    let srv = Appliance::start(&env, &["--config", &cfg]);
    wait_until(
        "the retries after the restart",
        Duration::from_secs(60),
        || {
            let d = srv.ok("GET", "/alerts/deliveries", &admin, None, 200);
            d.as_array()
                .unwrap()
                .iter()
                .all(|x| x["state"] == "delivered")
        },
    );
    let ids = rx.ids();
    for id in &want {
        assert_eq!(
            ids.iter().filter(|i| *i == id).count(),
            2,
            "delivery {id} arrives once more, with its id: {ids:?}"
        );
    }
    let d = srv.ok("GET", "/alerts/deliveries", &admin, None, 200);
    assert!(
        d.as_array().unwrap().iter().all(|x| x["attempts"] == 2),
        "{d}"
    );
    assert!(srv.stop());
}

#[test]
fn a_dead_receiver_cannot_grow_the_outbox_past_its_cap_and_the_drops_are_counted() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    // Nothing listens on this port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", dead.local_addr().unwrap());
    drop(dead);
    let cfg = config(
        &env,
        "outbox_max = 10\nretry_seconds = [600]\nallowed_hosts = [\"127.0.0.1\"]",
        &[&url],
    );
    let srv = Appliance::start(&env, &["--config", &cfg]);
    gone_resource(&srv, &admin, &env);
    for _ in 0..12 {
        failing_backup(&srv, &admin);
    }
    let raised = srv.ok("GET", "/alerts", &admin, None, 200);
    let n = raised.as_array().unwrap().len() as u64;
    assert!(n >= 12, "{raised}");
    let d = srv.ok("GET", "/alerts/deliveries", &admin, None, 200);
    assert_eq!(d.as_array().unwrap().len(), 10, "{d}");
    // Every alert raised beyond the 10 kept is counted as dropped. Counted again each
    // time: the last failed task's alerts may be raised just after its state shows.
    wait_until("the dropped count", Duration::from_secs(30), || {
        let h = srv.ok("GET", "/health", &admin, None, 200);
        let raised = srv.ok("GET", "/alerts", &admin, None, 200);
        let n = raised.as_array().unwrap().len() as u64;
        h["alerts"]["dropped"] == n - 10 && h["alerts"]["queued"] == 10
    });
    // Those kept wait for their retry after a refused connection (which of them are
    // kept, oldest pending dropped first, is the catalog's unit test).
    wait_until("first attempts", Duration::from_secs(30), || {
        let d = srv.ok("GET", "/alerts/deliveries", &admin, None, 200);
        d.as_array()
            .unwrap()
            .iter()
            .all(|x| x["attempts"] == 1 && x["state"] == "pending")
    });
    assert!(srv.stop());
}

#[test]
fn a_webhook_name_resolving_to_loopback_is_refused_at_delivery_and_a_literal_address_is_sent() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let (by_name, literal) = (Receiver::start(), Receiver::start());
    let name_url = format!("http://localhost:{}/hook", by_name.port);
    let cfg = config(
        &env,
        "allowed_hosts = [\"localhost\", \"127.0.0.1\"]",
        &[&name_url, &literal.url],
    );
    let srv = Appliance::start(&env, &["--config", &cfg]);
    gone_resource(&srv, &admin, &env);
    failing_backup(&srv, &admin);
    let target = format!("http://localhost:{}", by_name.port);
    wait_until("every delivery settled", Duration::from_secs(30), || {
        let d = srv.ok("GET", "/alerts/deliveries", &admin, None, 200);
        let d = d.as_array().unwrap();
        !d.is_empty() && d.iter().all(|x| x["state"] != "pending")
    });
    let d = srv.ok("GET", "/alerts/deliveries", &admin, None, 200);
    for x in d.as_array().unwrap() {
        if x["target"] == target {
            assert_eq!(x["state"], "refused", "{x}");
            let e = x["last_error"].as_str().unwrap();
            assert!(e.contains("loopback") && e.contains("allow_private"), "{e}");
        } else {
            assert_eq!(x["state"], "delivered", "{x}");
        }
    }
    assert!(by_name.got.lock().unwrap().is_empty(), "nothing was sent");
    assert!(!literal.kinds("task_failed").is_empty());
    let h = srv.ok("GET", "/health", &admin, None, 200);
    assert!(h["alerts"]["refused"].as_u64().unwrap() >= 1, "{h}");
    assert!(srv.stop());
    // With allow_private = true the name may resolve to loopback.
    let cfg = config(
        &env,
        "allow_private = true\nallowed_hosts = [\"localhost\"]",
        &[&name_url],
    );
    let srv = Appliance::start(&env, &["--config", &cfg]);
    failing_backup(&srv, &admin);
    wait_until("the delivery by name", Duration::from_secs(30), || {
        !by_name.kinds("task_failed").is_empty()
    });
    assert!(srv.stop());
}
