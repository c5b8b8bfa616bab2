//! The appliance service: auth and roles on every endpoint, policies and retention on a
//! schedule, restarts, cancel, capacity and alerts, audit — over real HTTP.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::{Env, fixtures, random_bytes, write_raw};

fn names_of(backups: &Value, prefix: &str) -> usize {
    backups
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["name"].as_str().unwrap_or("").starts_with(prefix))
        .count()
}

#[test]
fn every_endpoint_needs_a_token_and_the_right_role_and_is_audited() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let op = token(&env, "operator", "ops");
    let aud = token(&env, "auditor", "watcher");
    let srv = Appliance::start(&env, &[]);
    let disk = fixtures().join("disk.qcow2");
    let d = disk.to_str().unwrap();
    // Real objects for every path parameter; DELETE routes get throwaway ones.
    srv.ok(
        "POST",
        "/vaults",
        &admin,
        Some(json!({"name": "tmpv"})),
        201,
    );
    for r in ["r1", "tmpr"] {
        srv.ok(
            "POST",
            "/resources",
            &admin,
            Some(json!({"name": r, "kind": "disk", "sources": [d], "vault": "v"})),
            201,
        );
    }
    for p in ["p1", "tmpp"] {
        srv.ok("POST", "/policies", &admin, Some(json!({"name": p, "schedule": "0 3 * * *", "retention": {"keep_last": 3}, "resources": ["r1"], "enabled": false})), 201);
    }
    // A schedule that can never fire is refused when saved, and nothing is stored.
    let refused = srv.ok("POST", "/policies", &admin, Some(json!({"name": "feb31", "schedule": "0 0 31 2 *", "retention": {"keep_last": 3}, "resources": ["r1"]})), 400);
    assert!(refused.to_string().contains("never fires"), "{refused}");
    srv.ok("GET", "/policies/feb31", &admin, None, 404);
    let mut backups = Vec::new();
    let mut task = String::new();
    for _ in 0..3 {
        let t = srv.ok(
            "POST",
            "/backups",
            &op,
            Some(json!({"resource": "r1"})),
            202,
        );
        task = t["task"].as_str().unwrap().to_string();
        let done = srv.wait_task(&op, &task, Duration::from_secs(30));
        assert_eq!(done["state"], "succeeded", "{done}");
        backups.push(done["result"]["backup"].as_str().unwrap().to_string());
    }
    srv.ok(
        "POST",
        "/tokens",
        &admin,
        Some(json!({"name": "tmpt", "role": "auditor"})),
        201,
    );

    let doc = srv.ok("GET", "/openapi.json", &aud, None, 200);
    let paths = doc["paths"].as_object().unwrap();
    // The contract of the issue, every route listed.
    for (m, p) in [
        ("get", "/vaults"),
        ("post", "/vaults"),
        ("get", "/vaults/{name}"),
        ("patch", "/vaults/{name}"),
        ("delete", "/vaults/{name}"),
        ("get", "/resources"),
        ("post", "/resources"),
        ("get", "/resources/{name}"),
        ("patch", "/resources/{name}"),
        ("delete", "/resources/{name}"),
        ("post", "/backups"),
        ("get", "/backups"),
        ("get", "/backups/{id}"),
        ("delete", "/backups/{id}"),
        ("post", "/backups/{id}/protect"),
        ("post", "/restores"),
        ("get", "/policies"),
        ("post", "/policies"),
        ("get", "/policies/{name}"),
        ("patch", "/policies/{name}"),
        ("delete", "/policies/{name}"),
        ("post", "/policies/{name}/preview"),
        ("get", "/tasks"),
        ("get", "/tasks/{id}"),
        ("post", "/tasks/{id}/cancel"),
        ("get", "/audit"),
        ("get", "/health"),
    ] {
        assert!(
            paths
                .get(&format!("/api/v1{p}"))
                .and_then(|o| o.get(m))
                .is_some(),
            "{m} {p} missing from OpenAPI"
        );
    }

    let restored = env.path("restored.raw");
    let mut routes: Vec<(String, String, String)> = Vec::new();
    // `/metrics` (outside /api/v1) is listed too; only the API routes are called here.
    for (p, ops) in paths.iter().filter(|(p, _)| p.starts_with("/api/v1/")) {
        for (m, op) in ops.as_object().unwrap() {
            routes.push((
                m.to_uppercase(),
                p["/api/v1".len()..].to_string(),
                op["x-blockvault-role"].as_str().unwrap().to_string(),
            ));
        }
    }
    // Destructive calls last.
    routes.sort_by_key(|(m, _, _)| m == "DELETE");
    let mut seen = BTreeSet::new();
    for (method, pattern, role) in &routes {
        let del = method == "DELETE";
        let path = pattern
            .replace(
                "/vaults/{name}",
                if del { "/vaults/tmpv" } else { "/vaults/v" },
            )
            .replace(
                "/resources/{name}",
                if del {
                    "/resources/tmpr"
                } else {
                    "/resources/r1"
                },
            )
            .replace(
                "/policies/{name}",
                if del {
                    "/policies/tmpp"
                } else {
                    "/policies/p1"
                },
            )
            .replace("/tokens/{name}", "/tokens/tmpt")
            .replace(
                "/backups/{id}",
                &format!("/backups/{}", if del { &backups[2] } else { &backups[0] }),
            )
            .replace("/tasks/{id}", &format!("/tasks/{task}"))
            // The first instant-access export (started by the POST, before any DELETE).
            .replace("/instant/{id}", "/instant/ia-1")
            .replace("/schedules/next", "/schedules/next?cron=0%204%20*%20*%20*");
        let body = match (method.as_str(), pattern.as_str()) {
            ("POST", "/vaults") => Some(json!({"name": "v2"})),
            ("POST", "/resources") => {
                Some(json!({"name": "r2", "kind": "disk", "sources": [d], "vault": "v"}))
            }
            ("POST", "/policies") => Some(
                json!({"name": "p2", "schedule": "0 4 * * *", "resources": ["r1"], "enabled": false}),
            ),
            ("POST", "/backups") => Some(json!({"resource": "r1"})),
            ("POST", "/instant") => Some(json!({"backup": backups[0]})),
            ("POST", "/restores") => Some(json!({"backup": backups[1], "to": restored})),
            ("POST", "/replications") => Some(json!({"from": "v", "to": "tmpv"})),
            ("POST", "/tokens") => Some(json!({"name": "t2", "role": "auditor"})),
            ("POST", "/backups/{id}/lock") => Some(json!({"until": "2099-01-01"})),
            ("PATCH", "/vaults/{name}") => Some(json!({"capacity": null})),
            ("PATCH", "/resources/{name}") => Some(json!({"sources": [d]})),
            ("PATCH", "/policies/{name}") => Some(json!({"enabled": false})),
            ("POST", _) => Some(json!({})),
            _ => None,
        };
        let (s, v) = srv.call(method, &path, None, body.clone());
        if (method.as_str(), pattern.as_str()) == ("GET", "/health") {
            // The one route that answers without a token: the status and nothing else.
            assert_eq!(s, 200, "GET /health without a token: {v}");
            assert_eq!(
                v,
                json!({"status": "ok"}),
                "anonymous health says only the status"
            );
            let (s, full) = srv.call(method, &path, Some(&aud), None);
            assert_eq!(s, 200);
            assert!(
                full.get("tasks_running").is_some(),
                "full health with a token: {full}"
            );
            let (s, _) = srv.call(method, &path, Some("not-a-token"), None);
            assert_eq!(s, 401, "GET /health with an unknown token");
        } else {
            assert_eq!(s, 401, "{method} {path} without a token");
        }
        let weaker = match role.as_str() {
            "admin" => Some(&op),
            "operator" | "replication" => Some(&aud),
            _ => None,
        };
        if let Some(w) = weaker {
            let (s, v) = srv.call(method, &path, Some(w), body.clone());
            assert_eq!(s, 403, "{method} {path} with a weaker role: {v}");
        }
        if role == "replication" {
            // Mirror-vault routes: an admin passes the role check and then meets "vault v
            // is not in [server] mirror_vaults"; tests/it/mirror.rs pushes to a real one.
            let (s, v) = srv.call(method, &path, Some(&op), body.clone());
            assert_eq!(s, 403, "{method} {path} as operator: {v}");
            seen.insert(format!("{method} {pattern}"));
            continue;
        }
        let right = match role.as_str() {
            "admin" => &admin,
            "operator" => &op,
            _ => &aud,
        };
        let (s, v) = srv.call(method, &path, Some(right), body);
        // The fixture disk holds no file system: `files` answers 400 once the role passed.
        let no_fs = pattern.starts_with("/backups/{id}/files") && s == 400;
        // No drill ran here: no screenshot to serve once the role passed.
        let no_drill = pattern.ends_with("/drill/screenshot") && s == 404;
        assert!(
            [200, 201, 202].contains(&s) || no_fs || no_drill,
            "{method} {path} as {role}: {s} {v}"
        );
        seen.insert(format!("{method} {pattern}"));
    }
    assert!(seen.len() >= 30, "{} routes exercised", seen.len());

    // The audit log names the tokens and holds the refusals too.
    let audit = srv.ok("GET", "/audit", &aud, None, 200);
    let rows = audit.as_array().unwrap();
    for (who, status) in [
        ("root", 201),
        ("ops", 202),
        ("watcher", 200),
        ("-", 401),
        ("watcher", 403),
    ] {
        assert!(
            rows.iter()
                .any(|r| r["token"] == who && r["status"] == status),
            "no audit row for {who} with {status}"
        );
    }
    assert!(
        rows.iter().any(|r| r["token"] == "ops"
            && r["method"] == "POST"
            && r["path"] == "/api/v1/backups")
    );
    assert!(srv.stop());
}

fn disk_resource(srv: &Appliance, admin: &str, name: &str, source: &str, vault: &str) {
    srv.ok(
        "POST",
        "/resources",
        admin,
        Some(json!({"name": name, "kind": "disk", "sources": [source], "vault": vault})),
        201,
    );
}

/// Tasks of `by` (newest first).
fn tasks_by(srv: &Appliance, tok: &str, by: &str) -> Vec<Value> {
    srv.ok("GET", "/tasks", tok, None, 200)
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["by"] == by)
        .cloned()
        .collect()
}

fn idle(srv: &Appliance, tok: &str) {
    let t0 = Instant::now();
    while ["running", "queued"].iter().any(|s| {
        !srv.ok("GET", &format!("/tasks?state={s}"), tok, None, 200)
            .as_array()
            .unwrap()
            .is_empty()
    }) {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_policy_every_3_seconds_keeps_the_last_2_auto_backups_and_survives_a_restart() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let srv = Appliance::start(&env, &[]);
    let disk = fixtures().join("disk.qcow2");
    disk_resource(&srv, &admin, "web", disk.to_str().unwrap(), "v");
    let t = srv.ok(
        "POST",
        "/backups",
        &admin,
        Some(json!({"resource": "web"})),
        202,
    );
    srv.wait_task(&admin, t["task"].as_str().unwrap(), Duration::from_secs(30));
    srv.ok(
        "POST",
        "/policies",
        &admin,
        Some(json!({"name": "often", "schedule": "*/3 * * * * *", "retention": {"keep_last": 2}, "resources": ["web"], "enabled": true})),
        201,
    );
    let t0 = Instant::now();
    while tasks_by(&srv, &admin, "scheduler")
        .iter()
        .filter(|t| t["state"] == "succeeded")
        .count()
        < 4
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the scheduler did not run"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    idle(&srv, &admin);
    let backups = srv.ok("GET", "/backups?resource=web", &admin, None, 200);
    assert_eq!(names_of(&backups, "autobk_"), 2, "{backups}");
    assert_eq!(
        names_of(&backups, "manualbk_"),
        1,
        "one-off backups are not pruned"
    );
    // A preview shows what retention would delete now: nothing beyond the 2 kept.
    let pv = srv.ok("POST", "/policies/often/preview", &admin, None, 200);
    assert_eq!(pv["web"]["delete"].as_array().unwrap().len(), 0);

    // Down for more than two slots: at start the missed slot runs once, not twice.
    let patched = time::OffsetDateTime::now_utc();
    srv.ok(
        "PATCH",
        "/policies/often",
        &admin,
        Some(json!({"schedule": "*/5 * * * * *"})),
        200,
    );
    // The new schedule has run once (a scheduler task created after the change ended).
    wait_for("a run on the new schedule", || {
        tasks_by(&srv, &admin, "scheduler").iter().any(|t| {
            t_created(t) >= patched
                && ["succeeded", "failed", "cancelled"].contains(&t["state"].as_str().unwrap_or(""))
        })
    });
    idle(&srv, &admin);
    assert!(srv.stop(), "clean exit on SIGTERM");
    // Down until two slots have passed: here the clock itself is the condition.
    let s = time::OffsetDateTime::now_utc().unix_timestamp();
    let two_slots_missed = time::OffsetDateTime::from_unix_timestamp(s - s % 5 + 10).unwrap();
    wait_for("two missed slots", || {
        time::OffsetDateTime::now_utc() > two_slots_missed + time::Duration::milliseconds(200)
    });
    let started = time::OffsetDateTime::now_utc();
    let srv = Appliance::start(&env, &[]);
    let policies = srv.ok("GET", "/policies", &admin, None, 200);
    assert_eq!(
        policies[0]["name"], "often",
        "policies survive a restart (and tokens do)"
    );
    assert_eq!(
        names_of(
            &srv.ok("GET", "/backups?resource=web", &admin, None, 200),
            "autobk_"
        ),
        2
    );
    // The catch-up run: the first scheduler task after the restart.
    let mut first = None;
    wait_for("the missed slot to run", || {
        first = tasks_by(&srv, &admin, "scheduler")
            .iter()
            .map(t_created)
            .filter(|c| *c >= started)
            .min();
        first.is_some()
    });
    // Every run for the missed slots is queued at start, before the next regular slot
    // after the first of them; wait for that slot to pass, then count.
    let f = first.unwrap().unix_timestamp();
    let next_slot = time::OffsetDateTime::from_unix_timestamp(f - f % 5 + 5).unwrap();
    wait_for("the next regular slot", || {
        time::OffsetDateTime::now_utc() > next_slot + time::Duration::milliseconds(100)
    });
    let caught_up = tasks_by(&srv, &admin, "scheduler")
        .iter()
        .filter(|t| t_created(t) >= started && t_created(t) < next_slot)
        .count();
    assert_eq!(caught_up, 1, "one catch-up run for all missed slots");
    srv.ok(
        "PATCH",
        "/policies/often",
        &admin,
        Some(json!({"enabled": false})),
        200,
    );
    idle(&srv, &admin);
    assert!(srv.stop());
}

/// Poll `cond` until it holds; a generous deadline (a loaded 2-core CI machine), never
/// a guessed sleep.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "waited 60 s for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn t_created(t: &Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(
        t["created"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}

#[test]
fn cancelling_a_running_backup_stops_it_within_2_seconds_and_records_nothing() {
    let env = Env::bare();
    env.ok(&["vault", "create", "v", "--zstd-level", "19"]);
    let admin = token(&env, "admin", "root");
    // Large, sparse, random-and-text: zstd-19 makes it slow.
    let img = env.path("big.raw");
    for i in 0..64u64 {
        let text: Vec<u8> = random_bytes(1 << 20, i)
            .iter()
            .map(|b| b"abcdefgh "[(*b % 9) as usize])
            .collect();
        write_raw(&img, 8 << 30, i * (96 << 20), &text);
    }
    let srv = Appliance::start(&env, &[]);
    disk_resource(&srv, &admin, "big", img.to_str().unwrap(), "v");
    let t = srv.ok(
        "POST",
        "/backups",
        &admin,
        Some(json!({"resource": "big"})),
        202,
    );
    let id = t["task"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    loop {
        let t = srv.ok("GET", &format!("/tasks/{id}"), &admin, None, 200);
        if t["state"] == "running" && t["bytes_done"].as_u64().unwrap_or(0) > 0 {
            assert!(t["bytes_total"].as_u64().unwrap() > 0);
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{t}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let asked = Instant::now();
    srv.ok("POST", &format!("/tasks/{id}/cancel"), &admin, None, 200);
    let done = srv.wait_task(&admin, &id, Duration::from_secs(10));
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "stopped in {:?}",
        asked.elapsed()
    );
    assert_eq!(
        srv.ok("GET", "/backups", &admin, None, 200)
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert!(srv.stop());
    // Nothing GC would not clean: after GC the vault holds no packs.
    env.ok(&["gc", "--vault", "v"]);
    assert_eq!(crate::common::pack_files(&env.vault_dir()).len(), 0);
}

#[test]
fn gc_runs_beside_a_running_restore_and_cancelling_it_removes_the_partial_image() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let img = env.path("d.raw");
    // 192 MiB of random data: a streamOptimized VMDK deflates all of it, slowly.
    for i in 0..3u64 {
        write_raw(&img, 192 << 20, i << 26, &random_bytes(64 << 20, i));
    }
    let b = env.backup(&img, "d");
    let srv = Appliance::start(&env, &[]);
    let out = env.path("out");
    std::fs::create_dir(&out).unwrap();
    let to = out.join("d.vmdk");
    let t = srv.ok(
        "POST",
        "/restores",
        &admin,
        Some(json!({"backup": b["id"], "to": to, "format": "vmdk-stream"})),
        202,
    );
    let id = t["task"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    while srv.ok("GET", &format!("/tasks/{id}"), &admin, None, 200)["bytes_done"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the restore never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // GC runs beside the restore (which pins its backup) and frees nothing it reads.
    let packs = crate::common::pack_files(&env.vault_dir());
    let gc = env.json(&["gc", "--vault", "v", "--repack-below", "100"]);
    assert_eq!(gc["bytes_freed"], 0, "{gc}");
    assert_eq!(crate::common::pack_files(&env.vault_dir()), packs);
    srv.ok("POST", &format!("/tasks/{id}/cancel"), &admin, None, 200);
    let done = srv.wait_task(&admin, &id, Duration::from_secs(10));
    assert_eq!(done["state"], "cancelled", "{done}");
    let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert!(left.is_empty(), "a cancelled restore left {left:?}");
    assert!(srv.stop());
}

/// A tiny HTTP receiver for webhooks: records every POSTed JSON body.
fn webhook_receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = Arc::clone(&got);
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).is_ok()
                && let Ok(v) = serde_json::from_slice::<Value>(&body)
            {
                g.lock().unwrap().push(v);
            }
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (url, got)
}

#[test]
fn a_vault_limited_below_the_image_refuses_the_backup_and_alerts_the_webhook() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let (url, got) = webhook_receiver();
    let cfg = env.path("bv.toml");
    std::fs::write(
        &cfg,
        format!("[alerts]\ncapacity_warn_percent = 80\nallowed_hosts = [\"127.0.0.1\"]\n[[alerts.webhook]]\nurl = \"{url}\"\ntimeout_seconds = 5\n"),
    )
    .unwrap();
    let srv = Appliance::start(&env, &["--config", cfg.to_str().unwrap()]);
    let img = env.path("d.raw");
    write_raw(&img, 32 << 20, 0, &random_bytes(8 << 20, 4));
    srv.ok(
        "POST",
        "/vaults",
        &admin,
        Some(json!({"name": "small", "capacity": 1 << 20})),
        201,
    );
    disk_resource(&srv, &admin, "d", img.to_str().unwrap(), "small");
    let t = srv.ok(
        "POST",
        "/backups",
        &admin,
        Some(json!({"resource": "d"})),
        202,
    );
    let done = srv.wait_task(&admin, t["task"].as_str().unwrap(), Duration::from_secs(30));
    assert_eq!(done["state"], "failed");
    assert!(
        done["error"].as_str().unwrap().contains("capacity"),
        "{done}"
    );
    assert_eq!(
        srv.ok("GET", "/backups", &admin, None, 200)
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // Both alerts reach the webhook (each is sent on its own, in no set order).
    let t0 = Instant::now();
    while !["vault_full", "task_failed"]
        .iter()
        .all(|k| got.lock().unwrap().iter().any(|a| a["kind"] == *k))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no webhook: {:?}",
            got.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let alerts = srv.ok("GET", "/alerts", &admin, None, 200);
    assert!(
        alerts
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "vault_full")
    );
    // What the refused backup wrote was collected: the vault is back under its limit.
    let v = srv.ok("GET", "/vaults/small", &admin, None, 200);
    assert!(v["pack_bytes"].as_u64().unwrap() <= 1 << 20, "{v}");
    assert!(srv.stop());
}
