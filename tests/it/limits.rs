//! The service under abuse, against a real `blockvault serve`: an idle-connection flood
//! is cut by the connection cap and the header timeout while the API and the tasks keep
//! working; a silent webhook receiver and 1,000 failing tasks keep threads and memory
//! bounded, and what overflows is dropped and counted.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::appliance::{Appliance, token};
use crate::common::{Env, random_bytes, write_raw};

/// Open descriptors of process `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A `KEY:   N kB`-style figure of /proc/PID/status.
fn status_figure(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Wait until the server closes `s` (EOF or reset), at most `limit`; returns when, and
/// how many bytes it sent before.
fn wait_closed(s: &mut TcpStream, limit: Duration) -> (Instant, usize) {
    let deadline = Instant::now() + limit;
    let mut got = 0;
    let mut b = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut b) {
            Ok(0) => return (Instant::now(), got),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (Instant::now(), got);
            }
            Err(e) => {
                panic!("the server did not close an idle connection within {limit:?}: {e}")
            }
        }
    }
}

#[test]
fn an_idle_connection_flood_is_cut_by_the_cap_and_the_header_timeout_while_the_api_and_tasks_keep_working()
 {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let img = env.path("d.raw");
    write_raw(&img, 16 << 20, 1 << 20, &random_bytes(2 << 20, 7));
    let cfg = env.path("bv.toml");
    std::fs::write(
        &cfg,
        "[server]\nmax_connections = 50\nheader_timeout_seconds = 2\n",
    )
    .unwrap();
    // Plain HTTP on loopback: the flood sends raw HTTP requests (the TLS handshake's own
    // header timeout is proven in tests/it/tls.rs).
    let srv = Appliance::start(&env, &["--config", cfg.to_str().unwrap(), "--plain-http"]);
    let pid = srv.pid();
    srv.ok(
        "POST",
        "/resources",
        &admin,
        Some(
            json!({"name": "d", "kind": "disk", "sources": [img.to_str().unwrap()], "vault": "v"}),
        ),
        201,
    );
    // The appliance may hold 300 descriptors in all: a flood of 1,000 would take every
    // one of them if connections were not capped.
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=300:300"])
        .output()
        .expect("running prlimit");
    assert!(out.status.success(), "{out:?}");
    let addr = srv.url.strip_prefix("http://").unwrap().to_string();
    let base = fd_count(pid);

    // Under the cap, idle connections are closed by the 2 s header timeout, not sooner.
    let t0 = Instant::now();
    let mut few: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    for s in &mut few {
        let (at, sent) = wait_closed(s, Duration::from_secs(15));
        assert_eq!(
            sent, 0,
            "the server sent bytes to a connection that asked nothing"
        );
        let closed = at.duration_since(t0);
        assert!(
            closed >= Duration::from_millis(1500) && closed < Duration::from_secs(10),
            "an idle connection was closed after {closed:?}, not after the 2 s header timeout"
        );
    }

    // 1,000 connections: 500 never send a byte, then 500 send one request each and
    // idle on keep-alive without reading the answer.
    let mut flood: Vec<TcpStream> = (0..1000)
        .map(|i| {
            let mut s = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
            if i >= 500 {
                s.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                    .unwrap();
            }
            s
        })
        .collect();
    // An authenticated request is answered at once, well before any timeout frees a slot.
    let asked = Instant::now();
    let health = srv.ok("GET", "/health", &admin, None, 200);
    assert_eq!(health["status"], "ok");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "/health took {:?} during the flood",
        asked.elapsed()
    );
    // The appliance holds at most the cap of them.
    let held = fd_count(pid).saturating_sub(base);
    assert!(
        held <= 50 + 10,
        "{held} descriptors more than before the flood"
    );
    // A backup task opens the catalog, the source and the vault meanwhile.
    let t = srv.ok(
        "POST",
        "/backups",
        &admin,
        Some(json!({"resource": "d"})),
        202,
    );
    let done = srv.wait_task(&admin, t["task"].as_str().unwrap(), Duration::from_secs(30));
    assert_eq!(done["state"], "succeeded", "{done}");
    let backups = srv.ok("GET", "/backups", &admin, None, 200);
    assert_eq!(backups.as_array().unwrap().len(), 1, "{backups}");
    // Every idle connection is closed by the server: evicted over the cap, or by the
    // header timeout.
    for (i, s) in flood.iter_mut().enumerate() {
        let (_, sent) = wait_closed(s, Duration::from_secs(15));
        assert!(
            i >= 500 || sent == 0,
            "connection {i} asked nothing and got {sent} bytes"
        );
    }
    drop(flood);
    // Nothing stays open on the server's side.
    let t0 = Instant::now();
    while fd_count(pid) > base + 5 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} descriptors open after the flood, {base} before",
            fd_count(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(srv.stop(), "the appliance stops cleanly after the flood");
}

#[test]
fn a_silent_webhook_and_1000_failing_tasks_keep_threads_and_memory_bounded_and_count_the_dropped_alerts()
 {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    // A receiver that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", silent.local_addr().unwrap());
    let cfg = env.path("bv.toml");
    std::fs::write(
        &cfg,
        format!(
            "[alerts]\nqueue = 100\noutbox_max = 100\nworkers = 2\nallowed_hosts = [\"127.0.0.1\"]\n[[alerts.webhook]]\nurl = \"{url}\"\ntimeout_seconds = 60\n"
        ),
    )
    .unwrap();
    let srv = Appliance::start(&env, &["--config", cfg.to_str().unwrap()]);
    let pid = srv.pid();
    // A resource whose source is gone: every backup of it fails at once.
    let img = env.path("gone.raw");
    write_raw(&img, 1 << 20, 0, &[1u8; 4096]);
    srv.ok(
        "POST",
        "/resources",
        &admin,
        Some(json!({"name": "gone", "kind": "disk", "sources": [img.to_str().unwrap()], "vault": "v"})),
        201,
    );
    std::fs::remove_file(&img).unwrap();
    let (mut threads, mut rss_kib) = (0, 0);
    let mut sample = || {
        threads = threads.max(status_figure(pid, "Threads:"));
        rss_kib = rss_kib.max(status_figure(pid, "VmRSS:"));
    };
    let started = Instant::now();
    for i in 0..1000 {
        srv.ok(
            "POST",
            "/backups",
            &admin,
            Some(json!({"resource": "gone"})),
            202,
        );
        if i % 20 == 0 {
            sample();
        }
    }
    let submitted = started.elapsed();
    // Wait until every task ended and was checked for alerts.
    loop {
        sample();
        let h = srv.ok("GET", "/health", &admin, None, 200);
        if h["tasks_running"] == 0 && h["tasks_queued"] == 0 && h["alerts"]["checked"] == 1000 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "{h}");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "1000 backups submitted in {submitted:?}, all failed and checked in {:?}",
        started.elapsed()
    );
    sample();
    assert!(threads < 64, "{threads} threads");
    assert!(rss_kib < 200 << 10, "VmRSS {rss_kib} KiB");
    // The overflow was dropped and counted, and the counter is shown.
    let h = srv.ok("GET", "/health", &admin, None, 200);
    let a = &h["alerts"];
    assert!(a["dropped"].as_u64().unwrap() > 0, "{h}");
    assert!(a["queued"].as_u64().unwrap() <= 100, "{h}");
    assert_eq!(a["delivered"], 0, "{h}");
    assert_eq!(a["unchecked"], 0, "{h}");
    // Each failed task raised its alerts in the catalog (the newest 1,000 are listed).
    let alerts = srv.ok("GET", "/alerts", &admin, None, 200);
    assert!(
        alerts
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == "task_failed")
            .count()
            >= 500,
        "{alerts}"
    );
    let resp = crate::appliance::agent_for(srv.fingerprint.as_deref())
        .get(format!("{}/api/v1/alerts", srv.url))
        .header("Authorization", format!("Bearer {admin}"))
        .call()
        .unwrap();
    let header: u64 = resp
        .headers()
        .get("blockvault-alerts-dropped")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("the dropped count in GET /alerts");
    assert!(header > 0);
    eprintln!(
        "1000 failing tasks, silent webhook: max {threads} threads, max VmRSS {rss_kib} KiB, {h}"
    );
    drop(silent);
    assert!(srv.stop());
}
