//! Everything the appliance does is a task it can schedule: verify and GC of a vault as
//! API tasks (and through the CLI's `--server`), verify and gc policies, alerts on
//! damage, local CLI backups recorded as tasks — against a real `blockvault serve`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::{Env, pack_files, random_bytes, s, u, write_raw};

pub const LIMIT: Duration = Duration::from_secs(60);

/// Back up a fresh 8 MiB raw disk holding 2 MiB of random data (seed `seed`) as disk
/// `id` with one worker thread; returns (backup id, the packs it wrote).
fn backup_new_disk(env: &Env, id: &str, seed: u64) -> (String, Vec<PathBuf>) {
    let before = pack_files(&env.vault_dir());
    let img = env.path(&format!("{id}.raw"));
    write_raw(&img, 8 << 20, 0, &random_bytes(2 << 20, seed));
    let b = env.json(&[
        "--threads",
        "1",
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        id,
    ]);
    let new: Vec<PathBuf> = pack_files(&env.vault_dir())
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert!(!new.is_empty(), "backup {id} wrote no pack");
    (s(&b, "id").to_string(), new)
}

fn size_of(paths: &[PathBuf]) -> u64 {
    paths.iter().map(|p| p.metadata().unwrap().len()).sum()
}

/// The alerts of `kind`, waiting up to LIMIT for at least one.
fn wait_alert(srv: &Appliance, tok: &str, kind: &str) -> Vec<Value> {
    let t0 = Instant::now();
    loop {
        let all = srv.ok("GET", "/alerts", tok, None, 200);
        let found: Vec<Value> = all
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == kind)
            .cloned()
            .collect();
        if !found.is_empty() {
            return found;
        }
        assert!(t0.elapsed() < LIMIT, "no {kind} alert: {all}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn task_of(v: &Value) -> String {
    s(v, "task").to_string()
}

/// `blockvault --server URL --token T --json ARGS` from a client without a data dir.
pub fn remote(url: &str, tok: &str, args: &[&str]) -> Output {
    let client = Env::bare();
    let out = client
        .cmd()
        .args(["--server", url, "--token", tok, "--json"])
        .envs(crate::appliance::trust_env(url))
        .args(args)
        .output()
        .expect("running blockvault");
    assert!(!client.data().exists(), "remote mode touched a data dir");
    out
}

fn flip_byte(pack: &Path, at: usize) {
    let mut bytes = std::fs::read(pack).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(pack, &bytes).unwrap();
}

#[test]
fn a_flipped_pack_byte_fails_the_verify_task_raises_vault_damaged_and_names_the_backup() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let op = token(&env, "operator", "ops");
    let aud = token(&env, "auditor", "watcher");
    let (a, a_packs) = backup_new_disk(&env, "a", 1);
    let (b, _) = backup_new_disk(&env, "b", 2);
    let srv = Appliance::start(&env, &[]);

    // A clean vault verifies, with progress over every pack byte.
    let t = srv.ok("POST", "/vaults/v/verify", &op, Some(json!({})), 202);
    let done = srv.wait_task(&op, &task_of(&t), LIMIT);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["kind"], "verify");
    assert_eq!(done["target"], "v");
    let all_packs = size_of(&pack_files(&env.vault_dir()));
    assert_eq!(u(&done, "bytes_done"), all_packs, "{done}");
    assert_eq!(u(&done, "bytes_total"), all_packs, "{done}");
    assert_eq!(done["result"]["verified_backups"], "all");
    assert_eq!(done["progress_percent"], 100.0);

    // Data chunks are written first: flip a byte inside the first blob of a's pack.
    flip_byte(&a_packs[0], 8 + 12 + 1000);
    let t = srv.ok("POST", "/vaults/v/verify", &op, None, 202);
    let done = srv.wait_task(&op, &task_of(&t), LIMIT);
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error_kind"], "corrupt", "{done}");
    let err = s(&done, "error");
    assert!(err.contains(&a) && !err.contains(&b), "{err}");
    let log = done["log"].to_string();
    assert!(
        log.contains("backup manualbk_") && log.contains("at offset 0"),
        "{log}"
    );
    let alerts = wait_alert(&srv, &aud, "vault_damaged");
    assert_eq!(alerts[0]["subject"], "v");
    assert!(s(&alerts[0], "message").contains(&a), "{}", alerts[0]);
    // Its details name the vault, the verify task and the damaged backup and place.
    let d = &alerts[0]["details"];
    assert_eq!(d["vault"], "v", "{d}");
    assert_eq!(d["task"], done["id"], "{d}");
    let damaged = d["damaged"].as_array().expect("damaged list");
    assert!(
        damaged
            .iter()
            .any(|x| x["backup"] == a.as_str() && x["offset"] == 0)
            && damaged.iter().all(|x| x["backup"] != b.as_str()),
        "{d}"
    );
    // Verifying only the intact backup reads only its packs and passes.
    let t = srv.ok(
        "POST",
        "/vaults/v/verify",
        &op,
        Some(json!({"backups": [b]})),
        202,
    );
    let done = srv.wait_task(&op, &task_of(&t), LIMIT);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["verified_backups"], json!([b]));
    // A sample of 50 % of two backups is one backup.
    let t = srv.ok(
        "POST",
        "/vaults/v/verify",
        &op,
        Some(json!({"sample": 50})),
        202,
    );
    let done = srv.wait_task(&op, &task_of(&t), LIMIT);
    let picked = if done["state"] == "succeeded" {
        done["result"]["verified_backups"].as_array().unwrap().len()
    } else {
        assert!(s(&done, "error").contains(&a), "{done}");
        1
    };
    assert_eq!(picked, 1, "{done}");

    // Bad requests and weaker roles are refused before anything is queued.
    let before = srv
        .ok("GET", "/tasks", &aud, None, 200)
        .as_array()
        .unwrap()
        .len();
    for (body, want) in [
        (json!({"sample": 0}), "1-100"),
        (json!({"sample": 10, "backups": [b]}), "not both"),
        (json!({"rate_mb_s": -1}), "rate_mb_s"),
        (json!({"backups": ["nope"]}), "nope"),
        (json!({"samples": 10}), "samples"),
    ] {
        let (st, v) = srv.call("POST", "/vaults/v/verify", Some(&op), Some(body.clone()));
        assert!([400, 404].contains(&st), "{body}: {st} {v}");
        assert!(v.to_string().contains(want), "{body}: {v}");
    }
    srv.ok("POST", "/vaults/nowhere/verify", &op, None, 404);
    srv.ok("POST", "/vaults/v/verify", &aud, None, 403);
    srv.ok("POST", "/vaults/v/gc", &op, None, 403);
    let after = srv
        .ok("GET", "/tasks", &aud, None, 200)
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, after, "a refused request queued a task");

    // The CLI's verify with --server runs the same task: exit 5, naming the backup.
    let out = remote(&srv.url, &op, &["verify", "--vault", "v"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&a), "{out:?}");
    let out = remote(&srv.url, &op, &["verify", "--vault", "v", &b]);
    assert!(out.status.success(), "{out:?}");

    // A verify policy on schedule finds it too, and its failure raises both alerts.
    let policy =
        json!({"name": "often", "kind": "verify", "schedule": "* * * * * *", "vaults": ["v"]});
    srv.ok("POST", "/policies", &admin, Some(policy), 201);
    let t0 = Instant::now();
    let failed = loop {
        let tasks = srv.ok("GET", "/tasks?state=failed", &aud, None, 200);
        let found = tasks
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["by"] == "scheduler")
            .cloned();
        if let Some(t) = found {
            break t;
        }
        assert!(t0.elapsed() < LIMIT, "no scheduled verify failed: {tasks}");
        std::thread::sleep(Duration::from_millis(100));
    };
    srv.ok(
        "PATCH",
        "/policies/often",
        &admin,
        Some(json!({"enabled": false})),
        200,
    );
    assert_eq!(
        (&failed["kind"], &failed["error_kind"]),
        (&json!("verify"), &json!("corrupt"))
    );
    assert!(s(&failed, "error").contains(&a), "{failed}");
    let failed_alerts = wait_alert(&srv, &aud, "task_failed");
    assert!(
        failed_alerts.iter().any(|x| x["subject"] == "verify v"),
        "{failed_alerts:?}"
    );
    // One vault_damaged alert per verify that found the damage, the scheduler's included.
    let t0 = Instant::now();
    loop {
        let failed = srv.ok("GET", "/tasks?state=failed", &aud, None, 200);
        let verifies = failed
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["kind"] == "verify")
            .count();
        let alerts = wait_alert(&srv, &aud, "vault_damaged").len();
        if alerts == verifies {
            break;
        }
        assert!(
            t0.elapsed() < LIMIT,
            "{alerts} vault_damaged alerts for {verifies} failed verifies"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(srv.stop());
}

#[test]
fn the_gc_task_reclaims_the_space_of_a_deleted_backup() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let op = token(&env, "operator", "ops");
    let (a, a_packs) = backup_new_disk(&env, "a", 3);
    let (b, b_packs) = backup_new_disk(&env, "b", 4);
    let srv = Appliance::start(&env, &[]);
    let before = srv.ok("GET", "/vaults/v", &op, None, 200);
    let b_size = size_of(&b_packs);
    srv.ok("DELETE", &format!("/backups/{b}"), &op, None, 200);

    let t = srv.ok(
        "POST",
        "/vaults/v/gc",
        &admin,
        Some(json!({"repack_below": 50})),
        202,
    );
    let done = srv.wait_task(&admin, &task_of(&t), LIMIT);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        (&done["kind"], &done["target"]),
        (&json!("gc"), &json!("v"))
    );
    let freed = u(&done["result"], "bytes_freed");
    // Progress: every pack byte there was before was swept.
    assert_eq!(u(&done, "bytes_done"), u(&before, "pack_bytes"), "{done}");
    assert_eq!(u(&done, "bytes_total"), u(&before, "pack_bytes"), "{done}");
    assert_eq!(freed, b_size, "{done}");
    assert!(b_packs.iter().all(|p| !p.exists()), "b's packs are gone");
    assert!(a_packs.iter().all(|p| p.exists()), "a's packs stay");
    // The vault's figures are refreshed by a background thread after the GC task ends:
    // wait for the refresh (a figure that never moves fails at the deadline).
    let t0 = std::time::Instant::now();
    let after = loop {
        let after = srv.ok("GET", "/vaults/v", &op, None, 200);
        if u(&before, "pack_bytes") - u(&after, "pack_bytes") == freed || t0.elapsed() > LIMIT {
            break after;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(u(&before, "pack_bytes") - u(&after, "pack_bytes"), freed);
    assert_eq!(
        u(&after, "pack_bytes"),
        size_of(&pack_files(&env.vault_dir()))
    );

    // Through the CLI: a second GC has nothing left to free; a stays restorable.
    let out = remote(&srv.url, &admin, &["gc", "--vault", "v"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u(&v, "bytes_freed"), 0, "{v}");
    let bad = srv.call(
        "POST",
        "/vaults/v/gc",
        Some(&admin),
        Some(json!({"repack_below": 101})),
    );
    assert_eq!(bad.0, 400, "{bad:?}");
    let t = srv.ok(
        "POST",
        "/vaults/v/verify",
        &op,
        Some(json!({"backups": [a]})),
        202,
    );
    assert_eq!(
        srv.wait_task(&op, &task_of(&t), LIMIT)["state"],
        "succeeded"
    );
    assert!(srv.stop());
}

#[test]
fn verify_reads_no_faster_than_its_rate_limit() {
    let env = Env::new();
    let op = token(&env, "operator", "ops");
    backup_new_disk(&env, "a", 5);
    let total = size_of(&pack_files(&env.vault_dir()));
    let srv = Appliance::start(&env, &[]);
    // About 1.5 s at this rate.
    let rate = total as f64 / 1.5 / 1e6;
    let t0 = Instant::now();
    let t = srv.ok(
        "POST",
        "/vaults/v/verify",
        &op,
        Some(json!({"rate_mb_s": rate})),
        202,
    );
    let done = srv.wait_task(&op, &task_of(&t), LIMIT);
    let took = t0.elapsed().as_secs_f64();
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(u(&done, "bytes_done"), total);
    assert!(
        took >= 1.4,
        "{total} bytes at {rate} MB/s took only {took:.2}s"
    );
    assert!(done["result"]["seconds"].as_f64().unwrap() >= 1.4, "{done}");

    // At a rate that would take a minute, a cancel still ends the task at once.
    let rate = total as f64 / 60.0 / 1e6;
    let t = srv.ok(
        "POST",
        "/vaults/v/verify",
        &op,
        Some(json!({"rate_mb_s": rate})),
        202,
    );
    let id = task_of(&t);
    let t0 = Instant::now();
    while srv.ok("GET", &format!("/tasks/{id}"), &op, None, 200)["state"] != "running" {
        assert!(t0.elapsed() < LIMIT, "the verify never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    srv.ok("POST", &format!("/tasks/{id}/cancel"), &op, None, 200);
    let done = srv.wait_task(&op, &id, LIMIT);
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        t0.elapsed()
    );
    assert!(srv.stop());
}

#[test]
fn verify_and_gc_policies_are_validated_and_run_as_tasks_now_and_on_schedule() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let op = token(&env, "operator", "ops");
    backup_new_disk(&env, "a", 6);
    let srv = Appliance::start(&env, &[]);
    let disk = env.path("a.raw");
    srv.ok(
        "POST",
        "/resources",
        &admin,
        Some(json!({"name": "r", "kind": "disk", "sources": [disk], "vault": "v"})),
        201,
    );
    for (body, want) in [
        (
            json!({"name": "x", "kind": "verify", "schedule": "0 4 * * SUN"}),
            "vaults",
        ),
        (
            json!({"name": "x", "kind": "verify", "schedule": "0 4 * * SUN", "vaults": ["v"], "resources": ["r"]}),
            "resources",
        ),
        (
            json!({"name": "x", "kind": "verify", "schedule": "0 4 * * SUN", "vaults": ["v"], "sample": 0}),
            "1-100",
        ),
        (
            json!({"name": "x", "kind": "verify", "schedule": "0 4 * * SUN", "vaults": ["v"], "repack_below": 5}),
            "repack_below",
        ),
        (
            json!({"name": "x", "kind": "gc", "schedule": "0 4 * * SUN", "vaults": ["v"], "sample": 5}),
            "sample",
        ),
        (
            json!({"name": "x", "kind": "gc", "schedule": "0 4 * * SUN", "vaults": ["v"], "retention": {"keep_last": 1}}),
            "retention",
        ),
        (
            json!({"name": "x", "schedule": "0 4 * * SUN", "resources": ["r"], "vaults": ["v"]}),
            "vaults",
        ),
        (
            json!({"name": "x", "schedule": "0 4 * * SUN", "resources": ["r"], "sample": 5}),
            "sample",
        ),
        (
            json!({"name": "x", "kind": "scrub", "schedule": "0 4 * * SUN"}),
            "scrub",
        ),
    ] {
        let (st, v) = srv.call("POST", "/policies", Some(&admin), Some(body.clone()));
        assert_eq!(st, 400, "{body}: {v}");
        assert!(v.to_string().contains(want), "{body}: {v}");
    }
    srv.ok("GET", "/policies/x", &admin, None, 404);

    // Verify weekly, a sample of 100 %: run now.
    let p = srv.ok("POST", "/policies", &admin, Some(json!({"name": "weekly-verify", "kind": "verify", "schedule": "0 4 * * SUN", "vaults": ["v"], "sample": 100, "rate_mb_s": 500})), 201);
    assert_eq!(p["kind"], "verify");
    let ran = srv.ok("POST", "/policies/weekly-verify/run", &op, None, 202);
    let ids = ran["tasks"].as_array().unwrap();
    assert_eq!(ids.len(), 1, "{ran}");
    let done = srv.wait_task(&op, ids[0].as_str().unwrap(), LIMIT);
    assert_eq!(
        (&done["kind"], &done["target"], &done["state"]),
        (&json!("verify"), &json!("v"), &json!("succeeded")),
        "{done}"
    );
    assert_eq!(done["by"], "ops");
    assert!(u(&done, "bytes_done") > 0, "{done}");

    // A gc policy every second: the scheduler queues GC tasks by itself.
    srv.ok("POST", "/policies", &admin, Some(json!({"name": "gc-often", "kind": "gc", "schedule": "* * * * * *", "vaults": ["v"], "repack_below": 10})), 201);
    let t0 = Instant::now();
    let gc = loop {
        let tasks = srv.ok("GET", "/tasks", &op, None, 200);
        let found = tasks
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["kind"] == "gc" && t["by"] == "scheduler" && t["state"] == "succeeded")
            .cloned();
        if let Some(t) = found {
            break t;
        }
        assert!(t0.elapsed() < LIMIT, "the scheduler ran no gc: {tasks}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(gc["target"], "v");
    assert!(gc["result"]["packs_after"].as_u64().unwrap() >= 1, "{gc}");
    srv.ok(
        "PATCH",
        "/policies/gc-often",
        &admin,
        Some(json!({"enabled": false})),
        200,
    );
    // A backup policy may turn GC after prune off; it is kept as given.
    let p = srv.ok("POST", "/policies", &admin, Some(json!({"name": "nightly", "schedule": "0 1 * * *", "resources": ["r"], "retention": {"keep_last": 1}, "gc_after_prune": false})), 201);
    assert_eq!(
        (&p["kind"], &p["gc_after_prune"]),
        (&json!("backup"), &json!(false))
    );
    // Run it twice: the second run prunes the first backup and, so told, leaves GC be.
    let run = |name: &str| {
        let ran = srv.ok("POST", &format!("/policies/{name}/run"), &op, None, 202);
        let id = ran["tasks"][0].as_str().unwrap().to_string();
        let done = srv.wait_task(&op, &id, LIMIT);
        assert_eq!(done["state"], "succeeded", "{done}");
        done
    };
    run("nightly");
    let second = run("nightly");
    assert_eq!(
        second["result"]["pruned"].as_array().unwrap().len(),
        1,
        "{second}"
    );
    let log = second["log"].to_string();
    assert!(
        log.contains("retention pruned") && !log.contains("gc freed"),
        "{log}"
    );
    // By default GC follows the prune.
    srv.ok(
        "PATCH",
        "/policies/nightly",
        &admin,
        Some(json!({"gc_after_prune": null})),
        200,
    );
    let third = run("nightly");
    assert!(third["log"].to_string().contains("gc freed"), "{third}");
    assert!(srv.stop());
}

#[test]
fn local_cli_backups_appear_in_the_task_list_as_ended_tasks() {
    let env = Env::new();
    let aud = token(&env, "auditor", "watcher");
    let srv = Appliance::start(&env, &[]);
    // Run beside the appliance, on its data dir, without --server.
    let (id, _) = backup_new_disk(&env, "web01", 7);
    let missing = env.path("gone.raw");
    let out = env.run(&[
        "backup",
        missing.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "gone",
    ]);
    assert_eq!(out.status.code(), Some(3), "not found: {out:?}");

    let tasks = srv.ok("GET", "/tasks", &aud, None, 200);
    let cli: Vec<&Value> = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["by"] == "cli")
        .collect();
    assert_eq!(cli.len(), 2, "{tasks}");
    let ok = cli
        .iter()
        .find(|t| t["target"] == "web01")
        .expect("web01's task");
    assert_eq!(
        (&ok["kind"], &ok["state"]),
        (&json!("backup"), &json!("succeeded")),
        "{ok}"
    );
    assert_eq!(ok["result"]["backup"], id.as_str());
    assert_eq!(ok["result"]["source"], "cli");
    assert!(ok["result"]["seconds"].as_f64().unwrap() > 0.0, "{ok}");
    // Only the 2 MiB of data were read (the rest of the 8 MiB disk is a hole).
    assert_eq!(u(ok, "bytes_done"), 2 << 20, "{ok}");
    assert!(
        ok["started"].is_string() && ok["finished"].is_string(),
        "{ok}"
    );
    let bad = cli
        .iter()
        .find(|t| t["target"] == "gone")
        .expect("gone's task");
    assert_eq!(
        (&bad["state"], &bad["error_kind"]),
        (&json!("failed"), &json!("not_found")),
        "{bad}"
    );
    assert!(s(bad, "error").contains("gone.raw"), "{bad}");
    assert!(bad["result"].is_null());
    // The running list is not polluted, and the offline listing agrees.
    let running = srv.ok("GET", "/tasks?state=running", &aud, None, 200);
    assert!(running.as_array().unwrap().is_empty(), "{running}");
    let local = env.json(&["tasks", "list", "--state", "succeeded"]);
    assert!(
        local
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["result"]["backup"] == id.as_str()),
        "{local}"
    );
    assert!(srv.stop());
}
