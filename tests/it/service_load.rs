//! The service under a long task history and while vault files are out of reach: tasks
//! by state in SQL, health from memory, history trimmed by retention, costly figures
//! served from the catalog's cache, alerts chosen by error kind. Real `serve`, real
//! nbdkit (pattern plugin behind the delay filter: a disk that reads slowly).

use std::time::{Duration, Instant};

use blockvault::catalog::Catalog;
use blockvault::task::{TaskInfo, TaskState};
use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::{Env, Server, random_bytes, write_raw};

fn ended_task(id: &str, created: &str) -> TaskInfo {
    serde_json::from_value(json!({
        "id": id, "kind": "backup", "target": "history", "state": "succeeded",
        "by": "test", "created": created, "started": created, "finished": created,
        "progress_percent": 100.0, "bytes_done": 0, "bytes_total": 0,
        "bytes_per_second": 0.0, "eta_seconds": null, "log": [], "error": null,
        "result": null
    }))
    .unwrap()
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

/// A disk that reads slowly: a backup of it stays running for minutes.
fn slow_disk(env: &Env) -> Server {
    let sock = env.path("slow.sock");
    Server::start(
        "nbdkit",
        &[
            "-f",
            "-U",
            sock.to_str().unwrap(),
            "--filter=delay",
            "pattern",
            "4G",
            "rdelay=200ms",
        ],
        &sock,
    )
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(60), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_running_task_behind_1200_newer_ended_tasks_shows_in_health_and_state_running_and_retention_trims()
 {
    let env = Env::bare();
    env.ok(&["vault", "create", "v"]);
    let admin = token(&env, "admin", "root");
    let cfg = env.path("bv.toml");
    std::fs::write(&cfg, "[tasks]\nkeep_days = 30\nkeep_max = 1000\n").unwrap();
    let nbd = slow_disk(&env);
    let srv = Appliance::start(&env, &["--config", cfg.to_str().unwrap()]);
    srv.ok(
        "POST",
        "/resources",
        &admin,
        Some(json!({"name": "slow", "kind": "disk", "sources": [nbd.uri()], "vault": "v"})),
        201,
    );
    let t = srv.ok(
        "POST",
        "/backups",
        &admin,
        Some(json!({"resource": "slow"})),
        202,
    );
    let running = t["task"].as_str().unwrap().to_string();
    wait_for("the backup to run", || {
        srv.ok("GET", &format!("/tasks/{running}"), &admin, None, 200)["state"] == "running"
    });

    // 1,200 ended tasks newer than the running one, and 40 ended 40 days ago, written
    // through the catalog API while the appliance runs.
    let cat = Catalog::open(&env.data()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    for i in 0..1200 {
        let created = rfc3339(now + time::Duration::milliseconds(i + 1));
        let t = ended_task(&format!("new-{i:04}"), &created);
        cat.put_task(&t.id, "succeeded", &t.created, &t).unwrap();
    }
    for i in 0..40 {
        let created = rfc3339(now - time::Duration::days(40) + time::Duration::seconds(i));
        let t = ended_task(&format!("old-{i:02}"), &created);
        cat.put_task(&t.id, "succeeded", &t.created, &t).unwrap();
    }

    let listed = srv.ok("GET", "/tasks?state=running", &admin, None, 200);
    assert_eq!(ids(&listed), vec![running.clone()], "{listed}");
    assert_eq!(listed[0]["state"], "running");
    let health = srv.ok("GET", "/health", &admin, None, 200);
    assert_eq!(health["tasks_running"], 1, "{health}");
    assert_eq!(health["tasks_queued"], 0, "{health}");
    // The unfiltered list is the newest 1,000: the running task is older than all of them.
    let all = ids(&srv.ok("GET", "/tasks", &admin, None, 200));
    assert_eq!(all.len(), 1000);
    assert!(!all.contains(&running));
    assert_eq!(all[0], "new-1199");

    srv.ok(
        "POST",
        &format!("/tasks/{running}/cancel"),
        &admin,
        None,
        200,
    );
    let done = srv.wait_task(&admin, &running, Duration::from_secs(30));
    assert_eq!(done["state"], "cancelled", "{done}");
    assert_eq!(done["error_kind"], "cancelled", "{done}");
    assert!(srv.stop());

    // The next start trims the history: nothing older than 30 days, at most 1,000 ended.
    let srv = Appliance::start(&env, &["--config", cfg.to_str().unwrap()]);
    wait_for("retention to trim", || {
        cat.count_tasks("succeeded").unwrap() + cat.count_tasks("cancelled").unwrap() <= 1000
    });
    assert!(cat.task::<TaskInfo>("old-00").is_err());
    assert!(cat.task::<TaskInfo>("old-39").is_err());
    // The newest 1,000 stay; the cancelled backup, older than all of them, went too.
    assert_eq!(
        cat.task::<TaskInfo>("new-1199").unwrap().state,
        TaskState::Succeeded
    );
    assert!(cat.task::<TaskInfo>("new-0200").is_ok());
    assert!(cat.task::<TaskInfo>("new-0199").is_err());
    assert!(cat.task::<TaskInfo>(&running).is_err());
    let listed = srv.ok("GET", "/tasks?state=succeeded", &admin, None, 200);
    assert_eq!(ids(&listed).len(), 1000);
    assert!(srv.stop());
}

#[test]
fn backup_and_vault_figures_come_from_the_cache_without_reading_the_vault() {
    let env = Env::bare();
    env.ok(&["vault", "create", "v"]);
    let admin = token(&env, "admin", "root");
    let img = env.path("disk.raw");
    write_raw(&img, 64 << 20, 0, &random_bytes(1 << 20, 1));
    let srv = Appliance::start(&env, &[]);
    srv.ok(
        "POST",
        "/resources",
        &admin,
        Some(
            json!({"name": "d", "kind": "disk", "sources": [img.to_str().unwrap()], "vault": "v"}),
        ),
        201,
    );
    let mut backups = Vec::new();
    for seed in [2, 3] {
        // The second backup adds 512 KiB only it holds.
        write_raw(&img, 64 << 20, 8 << 20, &random_bytes(512 << 10, seed));
        let t = srv.ok(
            "POST",
            "/backups",
            &admin,
            Some(json!({"resource": "d"})),
            202,
        );
        let t = srv.wait_task(&admin, t["task"].as_str().unwrap(), Duration::from_secs(60));
        assert_eq!(t["state"], "succeeded", "{t}");
        backups.push(t["result"]["backup"].as_str().unwrap().to_string());
    }
    // The figures are refreshed in the background after the backup task.
    let mut fresh = Value::Null;
    wait_for("fresh figures", || {
        fresh = srv.ok(
            "GET",
            &format!("/backups/{}", backups[1]),
            &admin,
            None,
            200,
        );
        fresh["bytes_freed_stale"] == false
    });
    let freed = fresh["bytes_freed_if_deleted"].as_u64().unwrap();
    assert!(freed >= 512 << 10, "{fresh}");
    assert!(fresh["bytes_freed_computed_at"].is_string(), "{fresh}");
    let usage = srv.ok("GET", "/vaults/v", &admin, None, 200);
    assert!(usage["pack_bytes"].as_u64().unwrap() > 0, "{usage}");
    assert_eq!(usage["backups"], 2, "{usage}");

    // A restarted appliance has no refresh pending. With the vault's packs out of reach,
    // it still answers from the catalog: no index walk for a backup, no vault listing.
    assert!(srv.stop());
    let srv = Appliance::start(&env, &[]);
    let fresh = srv.ok(
        "GET",
        &format!("/backups/{}", backups[1]),
        &admin,
        None,
        200,
    );
    assert_eq!(fresh["bytes_freed_stale"], false, "{fresh}");
    assert_eq!(
        fresh["bytes_freed_if_deleted"].as_u64(),
        Some(freed),
        "{fresh}"
    );
    let usage = srv.ok("GET", "/vaults/v", &admin, None, 200);
    let packs = env.vault_dir().join("packs");
    let hidden = env.path("packs.hidden");
    std::fs::rename(&packs, &hidden).unwrap();
    let again = srv.ok(
        "GET",
        &format!("/backups/{}", backups[1]),
        &admin,
        None,
        200,
    );
    assert_eq!(
        again["bytes_freed_if_deleted"].as_u64(),
        Some(freed),
        "{again}"
    );
    assert_eq!(
        again["bytes_freed_computed_at"],
        fresh["bytes_freed_computed_at"]
    );
    let listed = srv.ok("GET", "/vaults", &admin, None, 200);
    assert_eq!(listed[0]["pack_bytes"], usage["pack_bytes"], "{listed}");
    std::fs::rename(&hidden, &packs).unwrap();

    // The listing's cached views follow the protected flag.
    let protected = |srv: &Appliance| -> Vec<bool> {
        srv.ok("GET", "/backups", &admin, None, 200)
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["protected"].as_bool().unwrap())
            .collect()
    };
    assert_eq!(protected(&srv), vec![false, false]);
    srv.ok(
        "POST",
        &format!("/backups/{}/protect", backups[0]),
        &admin,
        None,
        200,
    );
    assert_eq!(protected(&srv), vec![true, false]);
    srv.ok(
        "POST",
        &format!("/backups/{}/protect", backups[0]),
        &admin,
        Some(json!({"protected": false})),
        200,
    );
    assert_eq!(protected(&srv), vec![false, false]);

    // Deleting the first backup changes the set: the figure is stale, then refreshed.
    srv.ok(
        "DELETE",
        &format!("/backups/{}", backups[0]),
        &admin,
        None,
        200,
    );
    wait_for("refreshed figures after the delete", || {
        let v = srv.ok(
            "GET",
            &format!("/backups/{}", backups[1]),
            &admin,
            None,
            200,
        );
        v["bytes_freed_stale"] == false && v["bytes_freed_if_deleted"].as_u64().unwrap() > freed
    });
    assert!(srv.stop());
}

#[test]
fn alerts_follow_the_error_kind_not_the_message_text() {
    let env = Env::bare();
    env.ok(&["vault", "create", "v"]);
    let admin = token(&env, "admin", "root");
    let srv = Appliance::start(&env, &[]);
    // A source that does not exist, under a name that reads like a full vault.
    let missing = env.path("capacity-is-full.raw");
    srv.ok(
        "POST",
        "/resources",
        &admin,
        Some(json!({"name": "gone", "kind": "disk", "sources": [missing.to_str().unwrap()], "vault": "v"})),
        201,
    );
    let t = srv.ok(
        "POST",
        "/backups",
        &admin,
        Some(json!({"resource": "gone"})),
        202,
    );
    let t = srv.wait_task(&admin, t["task"].as_str().unwrap(), Duration::from_secs(30));
    assert_eq!(t["state"], "failed", "{t}");
    assert_eq!(t["error_kind"], "unreachable", "{t}");
    let mut alerts = Value::Null;
    wait_for("the alerts of the failed task", || {
        alerts = srv.ok("GET", "/alerts", &admin, None, 200);
        ["source_unreachable", "task_failed"]
            .iter()
            .all(|k| alerts.as_array().unwrap().iter().any(|a| a["kind"] == *k))
    });
    assert!(
        !alerts
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "vault_full"),
        "{alerts}"
    );
    assert!(srv.stop());
}
