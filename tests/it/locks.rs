//! Locked backups (issue 16, parts 2 and 3): protection and retention locks recorded in the
//! vault's lock journal; every deletion path refuses before the date, naming it; the
//! backup restores byte-exact afterwards; after the date (injected clock: `BLOCKVAULT_NOW`,
//! honoured by debug builds only) deletion works.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};

use crate::appliance::{Appliance, token};
use crate::common::{Env, fixtures, images_equal, pack_files, random_bytes, s, u, write_raw};

const MIB: u64 = 1 << 20;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Run with `BLOCKVAULT_NOW=now`.
fn run_at(env: &Env, now: &str, args: &[&str]) -> Output {
    env.cmd()
        .env("BLOCKVAULT_NOW", now)
        .args(args)
        .output()
        .expect("running blockvault")
}

/// Back up `img` as disk `web` named `name`; returns the backup id.
fn backup(env: &Env, vault: &str, img: &Path, name: &str) -> String {
    let v = env.json(&[
        "backup",
        img.to_str().unwrap(),
        "--vault",
        vault,
        "--id",
        "web",
        "--name",
        name,
    ]);
    s(&v, "id").to_string()
}

/// A refusal: exit 4 (conflict), the message names `date`, and the manifest is still there.
fn assert_refused(o: &Output, date: &str, manifest: &Path) {
    assert_eq!(o.status.code(), Some(4), "{}{}", stderr(o), stdout(o));
    assert!(
        stderr(o).contains(&format!("locked until {date}")),
        "the refusal names the date: {}",
        stderr(o)
    );
    assert!(stderr(o).contains("nothing was deleted"), "{}", stderr(o));
    assert!(manifest.exists(), "nothing was deleted");
}

fn manifest_of(vault: &Path, id: &str) -> std::path::PathBuf {
    vault.join("backups").join("web").join(format!("{id}.json"))
}

/// Two backups of a raw image; the second shares most chunks with the first (so the
/// first's pack holds blobs of both).
fn two_backups(env: &Env) -> (String, String, std::path::PathBuf) {
    let img = env.path("web.raw");
    write_raw(&img, 16 * MIB, 0, &random_bytes(4 * MIB as usize, 1));
    let b0 = backup(env, "v", &img, "b0");
    write_raw(&img, 16 * MIB, MIB, &random_bytes(MIB as usize, 2));
    let b1 = backup(env, "v", &img, "b1");
    let copy = env.path("web-at-b1.raw");
    std::fs::copy(&img, &copy).unwrap();
    (b0, b1, copy)
}

#[test]
fn a_locked_backup_survives_cli_delete_gc_repack_and_a_second_appliance_until_its_date() {
    let env = Env::new();
    let (b0, b1, at_b1) = two_backups(&env);
    let vault = env.vault_dir();

    // Lock b1; shortening is refused, extending is recorded.
    env.ok(&["backups", "lock", "b1", "--until", "2030-01-01"]);
    let o = env.run(&["backups", "lock", "b1", "--until", "2029-06-01"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("locked until 2030-01-01T00:00:00Z")
            && stderr(&o).contains("never shortened"),
        "{}",
        stderr(&o)
    );
    let v = env.json(&["backups", "lock", "b1", "--until", "2031-01-01"]);
    assert_eq!(v["locked_until"], "2031-01-01T00:00:00Z");
    let show = env.json(&["backups", "show", "b1"]);
    assert_eq!(show["locked_until"], "2031-01-01T00:00:00Z", "{show}");
    let date = "2031-01-01T00:00:00Z";

    // CLI delete refuses, naming the date.
    let o = env.run(&["backups", "delete", "b1"]);
    assert_refused(&o, date, &manifest_of(&vault, &b1));

    // GC with --repack-below 100 after b0 is deleted: b0's pack now holds dead blobs
    // next to b1's; it is not rewritten (a locked backup's blobs stay in place).
    env.ok(&["backups", "delete", "b0"]);
    assert!(!manifest_of(&vault, &b0).exists());
    let packs_before = pack_files(&vault);
    let gc = env.json(&["gc", "--vault", "v", "--repack-below", "100"]);
    assert_eq!(u(&gc, "locked_backups"), 1, "{gc}");
    assert!(u(&gc, "packs_kept_locked") >= 1, "{gc}");
    assert_eq!(u(&gc, "packs_rewritten"), 0, "{gc}");
    assert_eq!(
        pack_files(&vault),
        packs_before,
        "no pack was rewritten or deleted"
    );

    // A second appliance attaching the vault sees the lock and refuses too.
    let env2 = Env::bare();
    env2.ok(&["vault", "attach", "v", vault.to_str().unwrap()]);
    let show = env2.json(&["backups", "show", "b1"]);
    assert_eq!(show["locked_until"], date, "{show}");
    let o = env2.run(&["backups", "delete", "b1"]);
    assert_refused(&o, date, &manifest_of(&vault, &b1));

    // The backup restores byte-exact afterwards.
    let out = env2.path("restored.raw");
    env2.restore("b1", &out, "raw");
    assert!(images_equal(&out, &at_b1));

    // One second after the date deletion works, and GC may repack again.
    let after = "2031-01-01T00:00:01Z";
    let o = run_at(&env2, after, &["backups", "delete", "b1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!manifest_of(&vault, &b1).exists());
    let o = run_at(
        &env2,
        after,
        &["--json", "gc", "--vault", "v", "--repack-below", "100"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let gc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(u(&gc, "locked_backups"), 0, "{gc}");
    assert!(pack_files(&vault).is_empty(), "{gc}");
}

#[test]
fn protection_travels_with_the_vault_to_a_second_appliance() {
    let env = Env::new();
    let img = env.path("web.raw");
    write_raw(&img, 8 * MIB, 0, &random_bytes(MIB as usize, 3));
    let id = backup(&env, "v", &img, "kept");
    env.ok(&["backups", "protect", "kept"]);

    let env2 = Env::bare();
    env2.ok(&["vault", "attach", "v", env.vault_dir().to_str().unwrap()]);
    assert_eq!(env2.json(&["backups", "show", "kept"])["protected"], true);
    let o = env2.run(&["backups", "delete", "kept"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("is protected"), "{}", stderr(&o));
    assert!(manifest_of(&env.vault_dir(), &id).exists());

    // Unprotected on the second appliance: the first one sees it too and may delete.
    env2.ok(&["backups", "protect", "kept", "--off"]);
    env.ok(&["backups", "delete", "kept"]);
    assert!(!manifest_of(&env.vault_dir(), &id).exists());
}

#[test]
fn a_compliance_vault_locks_every_backup_for_its_days_even_if_vault_toml_is_edited() {
    let env = Env::bare();
    env.ok(&["vault", "create", "c", "--compliance-days", "7"]);
    assert_eq!(env.json(&["vault", "info", "c"])["compliance_days"], 7);
    let img = env.path("web.raw");
    write_raw(&img, 8 * MIB, 0, &random_bytes(MIB as usize, 4));
    let id = backup(&env, "c", &img, "c1");
    let show = env.json(&["backups", "show", "c1"]);
    let created = time::OffsetDateTime::parse(
        s(&show, "created"),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let until = blockvault::vault::retention::format_time(created + time::Duration::days(7));
    assert_eq!(show["locked_until"], until.as_str(), "{show}");
    let vault = env.data().join("vaults").join("c");

    let o = env.run(&["backups", "delete", "c1"]);
    assert_refused(&o, &until, &manifest_of(&vault, &id));
    // Removing the setting from vault.toml does not lift it: the journal recorded it.
    let toml = vault.join("vault.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("compliance_days = 7"), "{text}");
    std::fs::write(&toml, text.replace("compliance_days = 7\n", "")).unwrap();
    let o = env.run(&["backups", "delete", "c1"]);
    assert_refused(&o, &until, &manifest_of(&vault, &id));

    // After the period: deletion works.
    let after = blockvault::vault::retention::format_time(created + time::Duration::days(8));
    let o = run_at(&env, &after, &["backups", "delete", "c1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!manifest_of(&vault, &id).exists());
}

#[test]
fn a_tampered_lock_journal_is_reported_by_verify_and_deletes_nothing() {
    let env = Env::new();
    let img = env.path("web.raw");
    write_raw(&img, 8 * MIB, 0, &random_bytes(MIB as usize, 5));
    let id = backup(&env, "v", &img, "b");
    env.ok(&["backups", "lock", "b", "--until", "2030-01-01"]);
    env.ok(&["backups", "lock", "b", "--until", "2031-01-01"]);
    env.ok(&["verify", "--vault", "v"]);
    let journal = env.vault_dir().join("locks").join("retention.journal");
    let good = std::fs::read_to_string(&journal).unwrap();
    assert_eq!(good.lines().count(), 2, "{good}");

    // An edited record: the lock "shortened" to a past date.
    std::fs::write(&journal, good.replace("2031-01-01", "2021-01-01")).unwrap();
    let o = env.run(&["verify", "--vault", "v"]);
    assert_eq!(o.status.code(), Some(5), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("lock journal damaged: record 2 (line 2) was altered"),
        "{}",
        stdout(&o)
    );
    let o = env.run(&["backups", "delete", "b"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("lock journal"), "{}", stderr(&o));
    assert!(manifest_of(&env.vault_dir(), &id).exists());

    // A truncated journal: the last record dropped.
    let first = good.lines().next().unwrap();
    std::fs::write(&journal, format!("{first}\n")).unwrap();
    let o = env.run(&["verify", "--vault", "v"]);
    assert_eq!(o.status.code(), Some(5), "{}", stdout(&o));
    assert!(stdout(&o).contains("truncated"), "{}", stdout(&o));
    let o = env.run(&["gc", "--vault", "v", "--repack-below", "100"]);
    assert_eq!(o.status.code(), Some(5), "GC refuses too: {}", stderr(&o));

    // Put back, it checks again.
    std::fs::write(&journal, &good).unwrap();
    env.ok(&["verify", "--vault", "v"]);

    // A locked backup's manifest removed behind blockvault's back: verify names it and GC
    // frees nothing of it.
    let manifest = manifest_of(&env.vault_dir(), &id);
    let saved = std::fs::read(&manifest).unwrap();
    std::fs::remove_file(&manifest).unwrap();
    let packs = pack_files(&env.vault_dir());
    let o = env.run(&["verify", "--vault", "v"]);
    assert_eq!(o.status.code(), Some(5), "{}", stdout(&o));
    assert!(
        stdout(&o).contains(&format!(
            "backup {id} is locked until 2031-01-01T00:00:00Z but its manifest is gone"
        )),
        "{}",
        stdout(&o)
    );
    let o = env.run(&["gc", "--vault", "v"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("GC stopped"), "{}", stderr(&o));
    assert_eq!(pack_files(&env.vault_dir()), packs);
    std::fs::write(&manifest, saved).unwrap();
    env.ok(&["verify", "--vault", "v"]);
}

/// Run policy `name` now and wait for its task; returns the task.
fn run_policy(srv: &Appliance, tok: &str, name: &str) -> Value {
    let ids = srv.ok("POST", &format!("/policies/{name}/run"), tok, None, 202);
    let id = ids["tasks"][0]
        .as_str()
        .or_else(|| ids["task"].as_str())
        .unwrap_or_else(|| panic!("no task id in {ids}"))
        .to_string();
    srv.wait_task(tok, &id, Duration::from_secs(120))
}

fn auto_backups(srv: &Appliance, tok: &str) -> Vec<Value> {
    srv.ok("GET", "/backups?resource=web", tok, None, 200)
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["name"].as_str().unwrap().starts_with("autobk_"))
        .cloned()
        .collect()
}

#[test]
fn lock_days_policy_backups_survive_api_delete_and_prune_until_the_date() {
    let env = Env::new();
    let admin = token(&env, "admin", "root");
    let disk = fixtures().join("disk.qcow2");
    let srv = Appliance::start(&env, &[]);
    srv.ok(
        "POST",
        "/resources",
        &admin,
        Some(json!({"name": "web", "kind": "disk", "sources": [disk], "vault": "v"})),
        201,
    );
    srv.ok(
        "POST",
        "/policies",
        &admin,
        Some(
            json!({"name": "locked", "schedule": "0 0 1 1 *", "retention": {"keep_last": 1},
                    "lock_days": 30, "resources": ["web"], "enabled": false}),
        ),
        201,
    );
    // A compliance vault over the API: its period shows in the vault's view.
    srv.ok(
        "POST",
        "/vaults",
        &admin,
        Some(json!({"name": "worm", "compliance_days": 3})),
        201,
    );
    let worm = srv.ok("GET", "/vaults/worm", &admin, None, 200);
    assert_eq!(worm["compliance_days"], 3, "{worm}");
    let t1 = run_policy(&srv, &admin, "locked");
    assert_eq!(t1["state"], "succeeded", "{t1}");
    let t2 = run_policy(&srv, &admin, "locked");
    assert_eq!(
        t2["state"], "succeeded",
        "a locked backup never fails the prune: {t2}"
    );
    let log = t2["log"].to_string();
    assert!(log.contains("locked until"), "the task log says why: {log}");
    assert!(log.contains("retention skipped"), "{log}");
    let autos = auto_backups(&srv, &admin);
    assert_eq!(
        autos.len(),
        2,
        "keep_last 1, but both are locked: {autos:?}"
    );

    // The API refuses an admin token's delete with 409 naming the date.
    let first = s(&autos[0], "id").to_string();
    let detail = srv.ok("GET", &format!("/backups/{first}"), &admin, None, 200);
    let until = s(&detail, "locked_until").to_string();
    let (st, body) = srv.call("DELETE", &format!("/backups/{first}"), Some(&admin), None);
    assert_eq!(st, 409, "{body}");
    assert!(
        body.to_string().contains(&format!("locked until {until}")),
        "{body}"
    );
    // Shortening over the API: 409 too; extending works.
    let (st, body) = srv.call(
        "POST",
        &format!("/backups/{first}/lock"),
        Some(&admin),
        Some(json!({"until": "2000-01-01"})),
    );
    assert!(st == 400 || st == 409, "{st} {body}");
    assert!(manifest_of(&env.vault_dir(), &first).exists());
    // The CLI with --server extends it over the API; a remote delete is refused with 4.
    let remote = |args: &[&str]| {
        env.cmd()
            .envs(crate::appliance::trust_env(&srv.url))
            .args(["--server", &srv.url, "--token", &admin])
            .args(args)
            .output()
            .unwrap()
    };
    let o = remote(&["backups", "lock", &first, "--until", "2099-01-01"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = remote(&["backups", "delete", &first]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("locked until 2099-01-01T00:00:00Z"),
        "{}",
        stderr(&o)
    );
    let detail = srv.ok("GET", &format!("/backups/{first}"), &admin, None, 200);
    assert_eq!(detail["locked_until"], "2099-01-01T00:00:00Z", "{detail}");

    // It restores byte-exact.
    let out = env.path("first.qcow2");
    env.restore(&first, &out, "qcow2");
    assert!(images_equal(&out, &disk));
    assert!(srv.stop());

    // 31 days later (injected clock): retention prunes the two older backups.
    let later = time::OffsetDateTime::now_utc() + time::Duration::days(31);
    let later = blockvault::vault::retention::format_time(later);
    let srv = Appliance::start_env(&env, &[], &[("BLOCKVAULT_NOW", &later)]);
    let t3 = run_policy(&srv, &admin, "locked");
    assert_eq!(t3["state"], "succeeded", "{t3}");
    // The second backup's 30 days are over: pruned. The first one was extended to 2099:
    // kept, and the log says so.
    let autos = auto_backups(&srv, &admin);
    assert_eq!(autos.len(), 2, "{autos:?}");
    assert!(manifest_of(&env.vault_dir(), &first).exists());
    assert!(
        t3["log"].to_string().contains(&format!(
            "retention skipped {first}: locked until 2099-01-01T00:00:00Z"
        )),
        "{t3}"
    );
    assert!(srv.stop());
    // After 2099 it goes too.
    let o = run_at(&env, "2099-01-01T00:00:01Z", &["backups", "delete", &first]);
    assert!(o.status.success(), "{}", stderr(&o));
}
