//! Encrypted and compliance-mode vaults on S3 (Garage): the bucket holds no plaintext,
//! the key travels with the bucket and is needed to attach it, and a lock recorded by one
//! appliance binds a second one that attaches the bucket.

use crate::common::*;
use crate::garage::Garage;

const MARKER: &[u8] = b"BLOCKVAULT-S3-MARKER-5eed-77a1";

/// A 32 MiB sparse image: 4 MiB of the marker repeated, 1 MiB random, the rest holes.
fn marker_image(env: &Env) -> std::path::PathBuf {
    let img = env.path("marker.raw");
    let text: Vec<u8> = MARKER.iter().copied().cycle().take(4 << 20).collect();
    write_raw(&img, 32 << 20, 4 << 20, &text);
    write_raw(&img, 32 << 20, 20 << 20, &random_bytes(1 << 20, 23));
    img
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn an_encrypted_vault_on_garage_holds_no_plaintext_and_needs_its_key_to_be_attached() {
    use blockvault::vault::store::ChunkStore;
    let g = Garage::start();
    let env = Env::bare();
    let key = env.path("v.key");
    let k = key.to_str().unwrap();
    g.create_vault_with(&env, "v", "enc", &["--encrypt", "--keyfile", k]);
    let img = marker_image(&env);
    let b = env.json(&[
        "--keyfile",
        k,
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "m",
    ]);
    let id = s(&b, "id").to_string();
    // Every object in the bucket, downloaded and searched: no marker, not even a
    // fragment of it; the vault's own description says "encrypted".
    let store = g.store("enc");
    let mut keys = vec!["vault.toml".to_string()];
    for dir in ["packs", "backups", "locks"] {
        keys.extend(store.list_files(dir).unwrap());
    }
    assert!(keys.iter().any(|k| k.starts_with("packs/")), "{keys:?}");
    assert!(keys.iter().any(|k| k.starts_with("backups/")), "{keys:?}");
    for k in &keys {
        let bytes = store.get(k).unwrap();
        assert!(!contains(&bytes, MARKER), "plaintext marker in {k}");
        assert!(!contains(&bytes, &MARKER[..12]), "marker fragment in {k}");
        assert!(!contains(&bytes, b"marker.raw"), "the source path in {k}");
    }
    let toml = String::from_utf8(store.get("vault.toml").unwrap()).unwrap();
    assert!(toml.contains("aes-256-gcm"), "{toml}");

    // The first appliance restores byte-exact with the key, and not without it.
    let out = env.path("r.raw");
    let o = env.run(&["restore", &id, "--to", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(10), "{}", stderr(&o));
    assert!(!out.exists());
    env.ok(&[
        "--keyfile",
        k,
        "restore",
        &id,
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(images_equal(&img, &out));

    // A fresh appliance: attaching without the key is refused and leaves nothing behind;
    // with it, the catalog is rebuilt from the bucket and the backup restores.
    let second = Env::bare();
    let o = g.try_attach_vault(&second, "v", "enc", &[]);
    assert_eq!(o.status.code(), Some(10), "{}", stderr(&o));
    assert!(stderr(&o).contains("--keyfile"), "{}", stderr(&o));
    assert!(!second.data().join("vaults/v/s3.toml").exists());
    let wrong = second.path("wrong.key");
    std::fs::write(&wrong, hex_key(7)).unwrap();
    let o = g.try_attach_vault(&second, "v", "enc", &["--keyfile", wrong.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("wrong key"), "{}", stderr(&o));
    let o = g.try_attach_vault(&second, "v", "enc", &["--keyfile", k]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out2 = second.path("r2.raw");
    second.ok(&[
        "--keyfile",
        k,
        "restore",
        &id,
        "--to",
        out2.to_str().unwrap(),
    ]);
    assert!(images_equal(&img, &out2));
}

/// 32 bytes in hex from a seed: a key file that opens nothing.
fn hex_key(seed: u64) -> String {
    random_bytes(32, seed)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_lock_on_a_compliance_vault_on_garage_binds_a_second_appliance_and_verify_checks_the_journal() {
    use blockvault::vault::store::ChunkStore;
    let g = Garage::start();
    let env = Env::bare();
    g.create_vault_with(&env, "v", "comp", &["--compliance-days", "7"]);
    let img = env.path("d.raw");
    write_raw(&img, 8 << 20, 0, &random_bytes(2 << 20, 31));
    let b = env.backup(&img, "b");
    let id = s(&b, "id").to_string();
    env.ok(&["backups", "lock", &id, "--until", "2031-01-01"]);
    // The journal lives in the bucket, not on the appliance.
    let store = g.store("comp");
    let journal = store.get("locks/retention.journal").unwrap();
    assert_eq!(journal.iter().filter(|b| **b == b'\n').count(), 2); // compliance + lock
    env.ok(&["verify", "--vault", "v"]);

    // A second appliance attaches the bucket: it sees the lock and refuses deletion.
    let second = Env::bare();
    g.attach_vault(&second, "v", "comp");
    let show = second.json(&["backups", "show", &id]);
    assert_eq!(show["locked_until"], "2031-01-01T00:00:00Z", "{show}");
    let o = second.run(&["backups", "delete", &id]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("2031-01-01"), "{}", stderr(&o));
    // Extending from the second appliance appends to the same chain in the bucket.
    second.ok(&["backups", "lock", &id, "--until", "2032-01-01"]);
    let journal = store.get("locks/retention.journal").unwrap();
    assert_eq!(journal.iter().filter(|b| **b == b'\n').count(), 3);
    let show = env.json(&["backups", "show", &id]);
    assert_eq!(show["locked_until"], "2032-01-01T00:00:00Z", "{show}");
    // No journal lease is left behind.
    assert!(
        store
            .list_files("locks/leases")
            .unwrap()
            .iter()
            .all(|k| !k.contains("journal-")),
        "a journal lease was left"
    );
    let out = second.path("r.raw");
    second.restore(&id, &out, "raw");
    assert!(images_equal(&img, &out));

    // A rewritten journal object (the lock "shortened") is reported by verify and
    // deletes nothing.
    let text = String::from_utf8(journal).unwrap();
    store
        .put_file(
            "locks/retention.journal",
            text.replace("2032-01-01", "2022-01-01").as_bytes(),
        )
        .unwrap();
    let o = second.run(&["verify", "--vault", "v"]);
    assert_eq!(o.status.code(), Some(5), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("lock journal damaged"),
        "{}",
        stdout(&o)
    );
    let o = second.run(&["backups", "delete", &id]);
    assert!(!o.status.success());
    assert!(
        store
            .list_files("backups")
            .unwrap()
            .iter()
            .any(|k| k.contains(&id)),
        "the manifest was deleted"
    );
}

#[test]
fn an_encrypted_vault_replicates_to_garage_sealed_and_restores_from_there() {
    use blockvault::vault::store::ChunkStore;
    let g = Garage::start();
    let env = Env::bare();
    let key = env.path("v.key");
    let k = key.to_str().unwrap();
    env.ok(&["vault", "create", "v", "--encrypt", "--keyfile", k]);
    let img = marker_image(&env);
    let b = env.json(&[
        "--keyfile",
        k,
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "m",
    ]);
    g.create_vault_with(&env, "off", "rep", &["--keyfile", k, "--replica-of", "v"]);
    let info = env.json(&["vault", "info", "off"]);
    assert_eq!(info["encrypted"], true, "{info}");
    let r = env.json(&[
        "--keyfile",
        k,
        "replicate",
        s(&b, "id"),
        "--from",
        "v",
        "--to",
        "off",
    ]);
    assert_eq!(u(&r, "backups_sent"), 1, "{r}");
    let replica = s(&r["backups"][0], "replica_id").to_string();
    let store = g.store("rep");
    for k in store.list_files("packs").unwrap() {
        assert!(
            !contains(&store.get(&k).unwrap(), MARKER),
            "plaintext in {k}"
        );
    }
    // The source vault is gone; the replica in the bucket restores byte-exact.
    std::fs::remove_dir_all(env.data().join("vaults/v")).unwrap();
    let out = env.path("r.raw");
    env.ok(&[
        "--keyfile",
        k,
        "restore",
        &replica,
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(images_equal(&img, &out));
}

#[test]
fn files_and_a_drill_read_an_encrypted_vault_on_garage_with_its_key_only() {
    let g = Garage::start();
    let env = Env::bare();
    let key = env.path("v.key");
    let k = key.to_str().unwrap();
    g.create_vault_with(&env, "v", "rec", &["--encrypt", "--keyfile", k]);
    // A FAT volume for files, a boot-sector disk for the drill.
    let fat = env.path("vol.fat");
    crate::files_fat::make_fat(&env, &fat, 16, "16");
    let guest = env.path("guest.img");
    crate::drill::disk(
        &guest,
        &crate::drill::boot_sector("encrypted drill: DRILL-OK\r\n"),
        8 << 20,
    );
    let mut ids = Vec::new();
    for (img, id) in [(&fat, "vol"), (&guest, "guest")] {
        let b = env.json(&[
            "--keyfile",
            k,
            "backup",
            img.to_str().unwrap(),
            "--vault",
            "v",
            "--id",
            id,
        ]);
        ids.push(s(&b, "id").to_string());
    }
    let guest_backup = ids[1].clone();
    // Without the key: refused at once, nothing extracted.
    let out = env.path("out");
    let o = env.run(&[
        "files",
        "latest",
        "--disk",
        "vol",
        "get",
        "/",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(10), "{}", stderr(&o));
    assert!(!out.exists());
    let tmp = env.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let drill = |with_key: bool| {
        let mut c = env.cmd();
        c.env("TMPDIR", &tmp).arg("--json");
        if with_key {
            c.args(["--keyfile", k]);
        }
        let o = c
            .args([
                "drill",
                &guest_backup,
                "--check",
                "console:DRILL-OK",
                "--timeout",
                "120",
            ])
            .output()
            .unwrap();
        (o.status.code(), stdout(&o), stderr(&o))
    };
    let (code, _, err) = drill(false);
    assert_eq!(code, Some(10), "{err}");
    // With it: every file comes back equal, and the guest boots from the bucket.
    env.ok(&[
        "--keyfile",
        k,
        "files",
        "latest",
        "--disk",
        "vol",
        "get",
        "/",
        "--to",
        out.to_str().unwrap(),
    ]);
    crate::files_fat::check_tree(&out);
    let (code, json, err) = drill(true);
    assert_eq!(code, Some(0), "{json}{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["ok"], true, "{v:#}");
    assert!(
        std::fs::read_dir(&tmp).unwrap().next().is_none(),
        "the drill left files"
    );
}

#[test]
fn two_appliances_locking_at_once_lose_no_record_of_the_bucket_journal() {
    use blockvault::vault::store::ChunkStore;
    let g = Garage::start();
    let first = Env::bare();
    g.create_vault(&first, "v", "race");
    let img = first.path("web.raw");
    let names = ["a0", "a1", "b0", "b1"];
    for (i, n) in names.iter().enumerate() {
        write_raw(&img, 4 << 20, 0, &random_bytes(1 << 20, 90 + i as u64));
        first.ok(&[
            "backup",
            img.to_str().unwrap(),
            "--vault",
            "v",
            "--id",
            "web",
            "--name",
            n,
        ]);
    }
    let second = Env::bare();
    g.attach_vault(&second, "v", "race");
    // Each appliance extends the locks of its two backups three times, both at once:
    // without the journal lease, one appliance's read-modify-write drops the other's.
    std::thread::scope(|sc| {
        for (env, mine) in [(&first, ["a0", "a1"]), (&second, ["b0", "b1"])] {
            sc.spawn(move || {
                for y in ["2030", "2031", "2032"] {
                    for b in mine {
                        env.ok(&["backups", "lock", b, "--until", &format!("{y}-01-01")]);
                    }
                }
            });
        }
    });
    let journal = g.store("race").get("locks/retention.journal").unwrap();
    assert_eq!(journal.iter().filter(|b| **b == b'\n').count(), 12);
    first.ok(&["verify", "--vault", "v"]);
    for env in [&first, &second] {
        for n in names {
            let show = env.json(&["backups", "show", n]);
            assert_eq!(show["locked_until"], "2032-01-01T00:00:00Z", "{n}: {show}");
        }
    }
    assert!(
        g.objects("race", "locks/leases").is_empty(),
        "a journal lease was left behind"
    );
}
