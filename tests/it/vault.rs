//! The vault's own integrity: the lookup index is a cache that can be wrong without
//! losing anything, and rotten chunks heal with the next backup.

use std::path::Path;

use rusqlite::{Connection, params};

use crate::common::*;

const CHUNK: usize = 64 << 10;

fn lookup_db(env: &Env) -> Connection {
    Connection::open(env.vault_dir().join("cache").join("lookup.sqlite")).unwrap()
}

fn digest_of(data: &[u8]) -> Vec<u8> {
    blake3::hash(data).as_bytes().to_vec()
}

/// (pack, offset) of `digest` in the lookup index.
fn row(db: &Connection, digest: &[u8]) -> Option<(Vec<u8>, i64)> {
    db.query_row(
        "SELECT pack, offset FROM blobs WHERE digest = ?1",
        params![digest],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .ok()
}

fn restore_equal(env: &Env, id: &str, img: &Path) {
    let out = env.path(&format!("{id}.raw"));
    let _ = std::fs::remove_file(&out);
    env.restore(id, &out, "raw");
    assert!(
        images_equal(img, &out),
        "backup {id} does not restore byte-exact"
    );
}

/// Two backups of one disk whose second half changed in between: the first backup's
/// pack then holds chunks that only the second backup still needs.
fn two_generations(
    env: &Env,
) -> (
    std::path::PathBuf,
    Vec<u8>,
    serde_json::Value,
    serde_json::Value,
) {
    let img = env.path("d.raw");
    let data = random_bytes(4 << 20, 21);
    write_raw(&img, 8 << 20, 0, &data);
    let b1 = env.backup(&img, "d");
    write_raw(&img, 8 << 20, 2 << 20, &random_bytes(2 << 20, 22));
    let b2 = env.backup(&img, "d");
    assert_eq!(u(&b2, "chunks_new"), 32, "{b2}");
    (img, data, b1, b2)
}

#[test]
fn a_damaged_lookup_row_does_not_make_gc_delete_the_only_copy_of_a_live_chunk() {
    let env = Env::new();
    let (img, data, b1, b2) = two_generations(&env);
    // Damage three rows of chunks that backup 2 still needs, all stored by backup 1:
    // one points at a pack that does not exist, one at a wrong offset, one is gone.
    let db = lookup_db(&env);
    let (d0, d1, d2) = (
        digest_of(&data[..CHUNK]),
        digest_of(&data[CHUNK..2 * CHUNK]),
        digest_of(&data[2 * CHUNK..3 * CHUNK]),
    );
    let (pack, off1) = row(&db, &d1).expect("chunk 1 is indexed");
    assert_eq!(row(&db, &d0).unwrap().0, pack);
    assert_eq!(
        db.execute(
            "UPDATE blobs SET pack = ?1 WHERE digest = ?2",
            params![vec![0xeeu8; 16], d0]
        )
        .unwrap(),
        1
    );
    assert_eq!(
        db.execute(
            "UPDATE blobs SET offset = ?1 WHERE digest = ?2",
            params![off1 + 1, d1]
        )
        .unwrap(),
        1
    );
    assert_eq!(
        db.execute("DELETE FROM blobs WHERE digest = ?1", params![d2])
            .unwrap(),
        1
    );
    // And one of backup 2's own chunks, in a pack GC keeps whole: a wrong offset.
    let d32 = digest_of(&random_bytes(2 << 20, 22)[..CHUNK]);
    assert_eq!(
        db.execute(
            "UPDATE blobs SET offset = offset + 1 WHERE digest = ?1",
            params![d32]
        )
        .unwrap(),
        1
    );
    drop(db);

    env.ok(&["backups", "delete", s(&b1, "id")]);
    let gc = env.json(&["gc", "--vault", "v", "--repack-below", "100"]);
    assert!(u(&gc, "packs_rewritten") >= 1, "{gc}");
    assert!(gc["rotten"].as_array().unwrap().is_empty(), "{gc}");
    // The index was made to agree with the trailers again.
    assert!(
        gc["index_repaired"]["stale_rows"].as_u64().unwrap() >= 1,
        "{gc}"
    );
    restore_equal(&env, s(&b2, "id"), &img);
    let v = env.json(&["verify", "--vault", "v"]);
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["index_repaired"]["stale_rows"], 0, "{v}");
    assert_eq!(v["index_repaired"]["missing_rows"], 0, "{v}");
}

#[test]
fn verify_reports_a_wrong_lookup_row_and_heals_it() {
    let env = Env::new();
    let (img, data, b1, b2) = two_generations(&env);
    let d0 = digest_of(&data[..CHUNK]);
    let db = lookup_db(&env);
    let good = row(&db, &d0).unwrap();
    db.execute(
        "UPDATE blobs SET offset = offset + 12 WHERE digest = ?1",
        params![d0],
    )
    .unwrap();
    let wrong = row(&db, &d0).unwrap();
    let fake = vec![0xabu8; 32];
    db.execute(
        "INSERT INTO blobs (digest, pack, offset, length, kind) VALUES (?1, ?2, 8, 100, 0)",
        params![fake, good.0],
    )
    .unwrap();
    drop(db);

    // Verifying one backup does not take the wrong row for damage.
    let one = env.json(&["verify", "--vault", "v", s(&b2, "id")]);
    assert!(one["damage"].as_array().unwrap().is_empty(), "{one}");
    assert!(one["corrupt_blobs"].as_array().unwrap().is_empty(), "{one}");
    let db = lookup_db(&env);
    db.execute(
        "UPDATE blobs SET offset = ?1 WHERE digest = ?2",
        params![wrong.1, d0],
    )
    .unwrap();
    db.execute(
        "INSERT OR REPLACE INTO blobs (digest, pack, offset, length, kind) VALUES (?1, ?2, 8, 100, 0)",
        params![fake, good.0],
    )
    .unwrap();
    drop(db);
    let v = env.json(&["verify", "--vault", "v"]);
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["index_repaired"]["stale_rows"], 2, "{v}");
    assert_eq!(v["index_repaired"]["missing_rows"], 1, "{v}");
    let db = lookup_db(&env);
    assert_eq!(row(&db, &d0), Some(good.clone()));
    assert_eq!(row(&db, &fake), None, "a row no trailer backs must go");
    // A second verify finds nothing left to heal.
    let again = env.json(&["verify", "--vault", "v"]);
    assert_eq!(again["index_repaired"]["stale_rows"], 0, "{again}");

    // A restore beside a wrong row reads the trailers instead and repairs the row.
    db.execute(
        "UPDATE blobs SET offset = ?1 WHERE digest = ?2",
        params![wrong.1, d0],
    )
    .unwrap();
    restore_equal(&env, s(&b1, "id"), &{
        let old = env.path("old.raw");
        write_raw(&old, 8 << 20, 0, &data);
        old
    });
    assert_eq!(row(&db, &d0), Some(good));
    restore_equal(&env, s(&b2, "id"), &img);
}

/// Flip a byte inside the blob of chunk 0 (the first blob of `pack`).
fn rot_first_blob(pack: &Path) {
    let mut bytes = std::fs::read(pack).unwrap();
    bytes[8 + 12 + 1000] ^= 0x01;
    std::fs::write(pack, &bytes).unwrap();
}

fn only_pack(env: &Env) -> std::path::PathBuf {
    let packs = pack_files(&env.vault_dir());
    assert_eq!(packs.len(), 1);
    packs[0].clone()
}

fn verify_json(env: &Env) -> (Option<i32>, serde_json::Value) {
    let out = env
        .cmd()
        .args(["--json", "verify", "--vault", "v"])
        .output()
        .unwrap();
    (
        out.status.code(),
        serde_json::from_slice(&out.stdout).unwrap(),
    )
}

#[test]
fn after_verify_finds_a_rotten_chunk_the_next_backup_stores_it_again_and_heals_old_backups() {
    let env = Env::new();
    let img = env.path("d.raw");
    write_raw(&img, 8 << 20, 0, &random_bytes(2 << 20, 31));
    // One worker thread, so that chunk 0 is the first blob of the pack.
    let backup = |env: &Env| {
        env.json(&[
            "--threads",
            "1",
            "backup",
            img.to_str().unwrap(),
            "--vault",
            "v",
            "--id",
            "d",
        ])
    };
    let b1 = backup(&env);
    rot_first_blob(&only_pack(&env));

    let (code, report) = verify_json(&env);
    assert_eq!(code, Some(5), "{report}");
    let damage = report["damage"].as_array().unwrap();
    assert_eq!(damage.len(), 1, "{report}");
    assert_eq!(damage[0]["backup_id"], s(&b1, "id"));
    assert_eq!(damage[0]["offset"], 0);
    assert!(
        env.vault_dir().join("bad-blobs").exists(),
        "verify records the bad copy"
    );

    // The next backup of the same disk does not deduplicate against the bad copy.
    let b2 = backup(&env);
    assert_eq!(u(&b2, "chunks_new"), 1, "{b2}");
    assert!(u(&b2, "bytes_stored") > 0, "{b2}");

    // Every backup is clean again, and the old one restores byte-exact.
    let (code, report) = verify_json(&env);
    assert_eq!(code, Some(0), "{report}");
    assert!(report["damage"].as_array().unwrap().is_empty(), "{report}");
    assert_eq!(
        report["healed_copies"].as_array().unwrap().len(),
        1,
        "{report}"
    );
    restore_equal(&env, s(&b1, "id"), &img);
    restore_equal(&env, s(&b2, "id"), &img);

    // GC drops the bad copy now that a good one exists, and forgets it.
    let gc = env.json(&["gc", "--vault", "v", "--repack-below", "100"]);
    assert_eq!(u(&gc, "packs_rewritten"), 1, "{gc}");
    assert!(gc["rotten"].as_array().unwrap().is_empty(), "{gc}");
    assert!(!env.vault_dir().join("bad-blobs").exists(), "{gc}");
    let (code, report) = verify_json(&env);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report["healed_copies"].as_array().unwrap().is_empty(),
        "{report}"
    );
    restore_equal(&env, s(&b1, "id"), &img);
}

#[test]
fn gc_does_not_carry_a_rotten_blob_forward_and_names_its_backup() {
    let env = Env::new();
    let img = env.path("d.raw");
    write_raw(&img, 8 << 20, 0, &random_bytes(2 << 20, 41));
    let backup = |env: &Env| {
        env.json(&[
            "--threads",
            "1",
            "backup",
            img.to_str().unwrap(),
            "--vault",
            "v",
            "--id",
            "d",
        ])
    };
    // Backup 0 stores chunk 0 in a pack whose second half then dies with backup 0.
    let b0 = backup(&env);
    let pack = only_pack(&env);
    write_raw(&img, 8 << 20, 1 << 20, &random_bytes(1 << 20, 42));
    let b1 = backup(&env);
    env.ok(&["backups", "delete", s(&b0, "id")]);
    rot_first_blob(&pack);
    // Nobody verified: GC meets the rot while copying.
    let gc = env.json(&["gc", "--vault", "v", "--repack-below", "100"]);
    let rotten = gc["rotten"].as_array().unwrap();
    assert_eq!(rotten.len(), 1, "{gc}");
    let reached = rotten[0]["backups"].to_string();
    assert!(
        reached.contains(s(&b1, "name")) && reached.contains("offset 0"),
        "{gc}"
    );
    // The next backup stores that chunk again and the backup heals.
    let b2 = backup(&env);
    assert_eq!(u(&b2, "chunks_new"), 1, "{b2}");
    let (code, report) = verify_json(&env);
    assert_eq!(code, Some(0), "{report}");
    restore_equal(&env, s(&b1, "id"), &img);
}

/// `blockvault serve-nbd` in the background; killed when dropped.
struct Served {
    child: std::process::Child,
    uri: String,
}

impl Served {
    fn start(env: &Env, backup: &str) -> Served {
        use std::io::BufRead;
        let sock = env.path("serve.sock");
        let mut child = env
            .cmd()
            .args(["serve-nbd", backup, "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("nbd+unix://"), "{line}");
        Served {
            child,
            uri: line.trim().to_string(),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pin files (not the `.NAME.tmp-…` staging files of a pin being written).
fn pins(env: &Env) -> usize {
    std::fs::read_dir(env.vault_dir().join("locks").join("pins"))
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn gc_runs_beside_a_long_serve_nbd_and_keeps_the_served_backup_even_when_deleted() {
    let env = Env::new();
    let (img, data, b1, b2) = two_generations(&env);
    let old = env.path("old.raw");
    write_raw(&old, 8 << 20, 0, &data);
    let served = Served::start(&env, s(&b1, "id"));
    // serve-nbd prints its URI, then pins its backup.
    let start = std::time::Instant::now();
    while pins(&env) == 0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "serve-nbd did not pin its backup"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(pins(&env), 1);
    // The served backup is deleted and GC runs (repacking everything it can): both succeed.
    env.ok(&["backups", "delete", s(&b1, "id")]);
    let gc = env.json(&["gc", "--vault", "v", "--repack-below", "100"]);
    assert_eq!(u(&gc, "pinned_backups"), 1, "{gc}");
    assert_eq!(
        u(&gc, "bytes_freed"),
        0,
        "a pinned backup frees nothing: {gc}"
    );
    // The served disk still reads byte-exact.
    let copy = env.path("served.raw");
    sh(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &served.uri,
            copy.to_str().unwrap(),
        ],
    );
    assert!(images_equal(&old, &copy));
    drop(served);
    // Once the reader is gone (its pin names a dead pid), GC frees the deleted backup.
    let gc = env.json(&["gc", "--vault", "v", "--repack-below", "100"]);
    assert_eq!(u(&gc, "pinned_backups"), 0, "{gc}");
    assert!(u(&gc, "bytes_freed") > 0, "{gc}");
    assert_eq!(pins(&env), 0, "the stale pin is removed");
    assert_eq!(gc["index_repaired"]["stale_rows"], 0, "{gc}");
    assert_eq!(gc["index_repaired"]["missing_rows"], 0, "{gc}");
    restore_equal(&env, s(&b2, "id"), &img);
    let (code, report) = verify_json(&env);
    assert_eq!(code, Some(0), "{report}");
}

#[test]
fn gc_ignores_an_expired_pin() {
    let env = Env::new();
    let (img, _data, b1, b2) = two_generations(&env);
    let manifest = manifest_of(&env, s(&b1, "id"));
    let pin = serde_json::json!({
        "version": 1,
        "pid": std::process::id(),
        "host": "some-other-appliance",
        "lease_until": 1_000_000_000u64,
        "backups": [{"id": s(&b1, "id"), "name": s(&b1, "name"), "disks": manifest["disks"]}],
    });
    let dir = env.vault_dir().join("locks").join("pins");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("expired.pin"), pin.to_string()).unwrap();
    env.ok(&["backups", "delete", s(&b1, "id")]);
    let gc = env.json(&["gc", "--vault", "v", "--repack-below", "100"]);
    assert_eq!(u(&gc, "pinned_backups"), 0, "{gc}");
    assert!(u(&gc, "bytes_freed") > 0, "{gc}");
    assert_eq!(pins(&env), 0);
    restore_equal(&env, s(&b2, "id"), &img);
}

/// The manifest of backup `id`, read from the vault.
fn manifest_of(env: &Env, id: &str) -> serde_json::Value {
    for d in std::fs::read_dir(env.vault_dir().join("backups"))
        .unwrap()
        .flatten()
    {
        let p = d.path().join(format!("{id}.json"));
        if p.exists() {
            return serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        }
    }
    panic!("no manifest for {id}");
}
