//! Encrypted vaults: a stolen vault reveals nothing, the key opens it, no key or a
//! wrong key is told apart from damage, and nothing is written without the key.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::*;

const MARKER: &[u8] = b"BLOCKVAULT-TEST-MARKER-c0ffee-6d1f";

/// A 64 MiB sparse image: 4 MiB of the marker repeated, 2 MiB random, the rest holes.
fn marker_image(env: &Env) -> PathBuf {
    let img = env.path("marker.raw");
    let text: Vec<u8> = MARKER.iter().copied().cycle().take(4 << 20).collect();
    write_raw(&img, 64 << 20, 8 << 20, &text);
    write_raw(&img, 64 << 20, 40 << 20, &random_bytes(2 << 20, 16));
    img
}

/// Every file under `dir` (recursively).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The files under `dir` that contain `needle` anywhere in their bytes.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| {
            std::fs::read(p)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
        })
        .collect()
}

/// An encrypted vault `v` whose key is the new key file `<tmp>/v.key`.
fn encrypted_env() -> (Env, PathBuf) {
    let env = Env::bare();
    let key = env.path("v.key");
    env.ok(&[
        "vault",
        "create",
        "v",
        "--encrypt",
        "--keyfile",
        key.to_str().unwrap(),
    ]);
    (env, key)
}

fn with_key(key: &Path, args: &[&str]) -> Vec<String> {
    let mut a = vec!["--keyfile".to_string(), key.to_str().unwrap().to_string()];
    a.extend(args.iter().map(|s| s.to_string()));
    a
}

fn run(env: &Env, args: &[String]) -> Output {
    env.cmd().args(args).output().unwrap()
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn backup_args(img: &Path, id: &str) -> Vec<String> {
    [
        "--json",
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        id,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Every digest in a vault's lookup index.
fn digests(vault: &Path) -> HashSet<Vec<u8>> {
    let db = rusqlite::Connection::open(vault.join("cache/lookup.sqlite")).unwrap();
    let mut st = db.prepare("SELECT digest FROM blobs").unwrap();
    st.query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Pack files and manifests: what a refused command must not add to.
fn vault_files(env: &Env) -> Vec<PathBuf> {
    let mut f: Vec<PathBuf> = files_under(&env.vault_dir())
        .into_iter()
        .filter(|p| !p.starts_with(env.vault_dir().join("cache")))
        .filter(|p| !p.starts_with(env.vault_dir().join("locks")))
        .collect();
    f.sort();
    f
}

#[test]
fn an_encrypted_vault_holds_no_plaintext_and_restores_byte_exact_with_its_key() {
    let (env, key) = encrypted_env();
    let img = marker_image(&env);
    // Control: a plaintext vault of the same image does contain the marker, so the scan
    // below would see it.
    env.ok(&[
        "vault",
        "create",
        "plain",
        "--path",
        env.path("plain").to_str().unwrap(),
    ]);
    env.ok(&[
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "plain",
        "--id",
        "d",
    ]);
    assert!(!files_containing(&env.path("plain"), MARKER).is_empty());

    let mut args = vec!["--keyfile".to_string(), key.to_str().unwrap().into()];
    args.extend(backup_args(&img, "d"));
    let b = json_of(&run(&env, &args));
    assert_eq!(
        u(&b, "bytes_read"),
        6 << 20,
        "only the allocated data is read"
    );
    // Zero chunks are still recognised and never stored: 6 MiB of data in a 64 MiB disk.
    assert!(u(&b, "bytes_stored") < 3 << 20, "{b}");

    let leaks = files_containing(&env.vault_dir(), MARKER);
    assert!(leaks.is_empty(), "plaintext marker found in {leaks:?}");
    // A shorter piece of it too (a compressed literal run would hold a fragment).
    let leaks = files_containing(&env.vault_dir(), &MARKER[..12]);
    assert!(leaks.is_empty(), "marker fragment found in {leaks:?}");
    let toml = std::fs::read_to_string(env.vault_dir().join("vault.toml")).unwrap();
    assert!(toml.contains("[encryption]") && toml.contains("aes-256-gcm"));
    let key_hex = std::fs::read_to_string(&key).unwrap();
    assert!(
        !toml.contains(key_hex.trim()),
        "the key file is not in vault.toml"
    );

    let out = env.path("r.raw");
    let id = s(&b, "id").to_string();
    env.ok(&[
        "--keyfile",
        key.to_str().unwrap(),
        "restore",
        &id,
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    let v = env.run(&["--keyfile", key.to_str().unwrap(), "verify", "--vault", "v"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

#[test]
fn without_the_key_or_with_a_wrong_passphrase_backup_and_restore_fail_at_once_and_write_nothing() {
    let env = Env::bare();
    let pass = "correct horse battery staple 7";
    let run_pass = |var_value: Option<&str>, args: &[&str]| {
        let mut c = env.cmd();
        if let Some(p) = var_value {
            c.env("BV_PASS", p).args(["--passphrase-env", "BV_PASS"]);
        }
        c.args(args).output().unwrap()
    };
    let created = run_pass(Some(pass), &["vault", "create", "v", "--encrypt"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let img = env.path("d.raw");
    write_raw(&img, 8 << 20, 0, &random_bytes(1 << 20, 3));
    let b = run_pass(
        Some(pass),
        &[
            "--json",
            "backup",
            img.to_str().unwrap(),
            "--vault",
            "v",
            "--id",
            "d",
        ],
    );
    let id = s(&json_of(&b), "id").to_string();
    let before = vault_files(&env);
    write_raw(&img, 8 << 20, 4 << 20, &random_bytes(1 << 20, 4));

    let backup = [
        "--json",
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "d",
    ];
    let no_key = run_pass(None, &backup);
    assert_eq!(no_key.status.code(), Some(10), "exit 10: key required");
    let err: serde_json::Value = serde_json::from_slice(&no_key.stdout).unwrap();
    assert_eq!(err["error"]["kind"], "key_required");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--passphrase-env"),
        "{err}"
    );
    let wrong = run_pass(Some("wrong horse"), &backup);
    assert_eq!(wrong.status.code(), Some(11), "exit 11: wrong key");
    let err: serde_json::Value = serde_json::from_slice(&wrong.stdout).unwrap();
    assert_eq!(err["error"]["kind"], "wrong_key");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("wrong passphrase"),
        "{err}"
    );
    for o in [&no_key, &wrong] {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!all.contains(pass) && !all.contains("wrong horse"), "{all}");
    }
    assert_eq!(vault_files(&env), before, "a refused backup wrote nothing");
    assert_eq!(env.backups().len(), 1);

    let out = env.path("r.raw");
    let restore = ["restore", &id, "--to", out.to_str().unwrap()];
    assert_eq!(run_pass(None, &restore).status.code(), Some(10));
    assert_eq!(
        run_pass(Some("wrong horse"), &restore).status.code(),
        Some(11)
    );
    assert!(!out.exists(), "a refused restore creates no file");
    assert_eq!(
        run_pass(None, &["verify", "--vault", "v"]).status.code(),
        Some(10)
    );
    assert_eq!(
        run_pass(None, &["gc", "--vault", "v"]).status.code(),
        Some(10)
    );
    assert_eq!(vault_files(&env), before);
    // The right passphrase still works.
    assert!(run_pass(Some(pass), &restore).status.success());
}

#[test]
fn a_flipped_bit_in_a_sealed_blob_is_named_corrupt_by_verify_and_restore_refuses() {
    let (env, key) = encrypted_env();
    let img = env.path("d.raw");
    write_raw(&img, 8 << 20, 0, &random_bytes(2 << 20, 9));
    let mut args = with_key(&key, &["--threads", "1"]);
    args.extend(backup_args(&img, "d"));
    let id = s(&json_of(&run(&env, &args)), "id").to_string();
    let packs = pack_files(&env.vault_dir());
    assert_eq!(packs.len(), 1);
    // Pack header (8) + blob header (12) + nonce (12): flip a bit of the ciphertext.
    let mut bytes = std::fs::read(&packs[0]).unwrap();
    bytes[8 + 12 + 12 + 1000] ^= 0x01;
    std::fs::write(&packs[0], &bytes).unwrap();

    let v = run(&env, &with_key(&key, &["--json", "verify", "--vault", "v"]));
    assert_eq!(v.status.code(), Some(5), "exit 5: corrupt data");
    let report: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    let bad = report["corrupt_blobs"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{report}");
    let text = bad[0].to_string();
    assert!(text.contains("fails authentication"), "{text}");
    assert_eq!(report["damage"][0]["backup_id"], id.as_str());

    let out = env.path("r.raw");
    let r = run(
        &env,
        &with_key(&key, &["restore", &id, "--to", out.to_str().unwrap()]),
    );
    assert_eq!(r.status.code(), Some(5), "exit 5: corrupt data");
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("fails authentication"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(!out.exists(), "a refused restore leaves no output");
}

#[test]
fn two_vaults_with_the_same_data_and_different_keys_share_no_digest() {
    let env = Env::bare();
    let img = env.path("d.raw");
    write_raw(&img, 16 << 20, 0, &random_bytes(3 << 20, 21));
    let mut sets = Vec::new();
    for name in ["a", "b"] {
        let key = env.path(&format!("{name}.key"));
        let path = env.path(name);
        env.ok(&[
            "vault",
            "create",
            name,
            "--path",
            path.to_str().unwrap(),
            "--encrypt",
            "--keyfile",
            key.to_str().unwrap(),
        ]);
        env.ok(&[
            "--keyfile",
            key.to_str().unwrap(),
            "backup",
            img.to_str().unwrap(),
            "--vault",
            name,
            "--id",
            "d",
        ]);
        sets.push(digests(&path));
    }
    // 48 data chunks + index page + root in each.
    assert!(sets[0].len() >= 50 && sets[1].len() >= 50);
    assert!(
        sets[0].is_disjoint(&sets[1]),
        "equal data revealed by equal digests"
    );
    // Unkeyed blake3 of a chunk is not used either.
    let chunk0 = &std::fs::read(&img).unwrap()[..64 << 10];
    let plain = blake3::hash(chunk0).as_bytes().to_vec();
    assert!(!sets[0].contains(&plain) && !sets[1].contains(&plain));
}

#[test]
fn an_incremental_backup_into_an_encrypted_vault_stores_only_the_change() {
    let (env, key) = encrypted_env();
    let img = env.path("d.raw");
    write_raw(&img, 32 << 20, 0, &random_bytes(4 << 20, 5));
    let mut args = with_key(&key, &[]);
    args.extend(backup_args(&img, "d"));
    let full = json_of(&run(&env, &args));
    assert_eq!(u(&full, "chunks_new"), 64);
    // Change 3 chunks.
    for (i, off) in [0u64, 1 << 20, 20 << 20].iter().enumerate() {
        write_raw(
            &img,
            32 << 20,
            *off,
            &random_bytes(64 << 10, 100 + i as u64),
        );
    }
    let inc = json_of(&run(&env, &args));
    assert_eq!(u(&inc, "chunks_new"), 3, "{inc}");
    let out = env.path("r.raw");
    let id = s(&inc, "id").to_string();
    env.ok(&[
        "--keyfile",
        key.to_str().unwrap(),
        "restore",
        &id,
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
}

#[test]
fn keys_can_be_added_listed_removed_stored_and_exported_on_paper_but_the_last_one_stays() {
    let (env, key) = encrypted_env();
    let k = key.to_str().unwrap();
    let list = |env: &Env| env.json(&["vault", "key", "list", "v"]);
    assert_eq!(list(&env).as_array().unwrap().len(), 1);
    // Add a passphrase wrapping (the vault is opened with the key file first).
    let add = env
        .cmd()
        .env("NEWPASS", "second secret phrase")
        .args(["--keyfile", k, "--json", "vault", "key", "add", "v"])
        .args(["--new-passphrase-env", "NEWPASS", "--label", "ops"])
        .output()
        .unwrap();
    let added = json_of(&add);
    assert_eq!(added["kind"], "passphrase");
    let keys = list(&env);
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let file_id = keys[0]["id"].as_str().unwrap().to_string();
    let pass_id = added["id"].as_str().unwrap().to_string();

    let img = env.path("d.raw");
    write_raw(&img, 8 << 20, 0, &random_bytes(1 << 20, 8));
    let b = env
        .cmd()
        .env("P", "second secret phrase")
        .args(["--passphrase-env", "P"])
        .args(backup_args(&img, "d"))
        .output()
        .unwrap();
    let id = s(&json_of(&b), "id").to_string();

    // The paper key opens the vault as a key file.
    let paper = env.ok(&["--keyfile", k, "vault", "key", "export", "v", "--paper"]);
    let paper_text = String::from_utf8(paper.stdout).unwrap();
    assert!(
        paper_text.starts_with("BLOCKVAULT RECOVERY KEY"),
        "{paper_text}"
    );
    let paper_file = env.path("paper.txt");
    std::fs::write(&paper_file, &paper_text).unwrap();

    // Remove the key file's wrapping: the key file no longer opens the vault.
    env.ok(&["--keyfile", k, "vault", "key", "remove", "v", &file_id]);
    assert_eq!(list(&env).as_array().unwrap().len(), 1);
    let out = env.path("r.raw");
    let restore = ["restore", &id, "--to", out.to_str().unwrap()];
    let r = env
        .cmd()
        .args(["--keyfile", k])
        .args(restore)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(11), "a removed key is a wrong key");
    // The last wrapping cannot be removed.
    let last = env
        .cmd()
        .env("P", "second secret phrase")
        .args([
            "--passphrase-env",
            "P",
            "vault",
            "key",
            "remove",
            "v",
            &pass_id,
        ])
        .output()
        .unwrap();
    assert_eq!(last.status.code(), Some(4), "exit 4: conflict");
    assert!(String::from_utf8_lossy(&last.stderr).contains("last one"));
    assert_eq!(list(&env).as_array().unwrap().len(), 1);

    env.ok(&[
        "--keyfile",
        paper_file.to_str().unwrap(),
        "restore",
        &id,
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());

    // The appliance's key store: backups then run without any key flag.
    assert_eq!(env.info()["key_stored"], false);
    env.ok(&[
        "--keyfile",
        paper_file.to_str().unwrap(),
        "vault",
        "key",
        "store",
        "v",
    ]);
    let info = env.info();
    assert_eq!(info["encrypted"], true);
    assert_eq!(info["key_stored"], true);
    let stored = env
        .data()
        .join("keys")
        .join(format!("{}.key", s(&info, "id")));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&stored).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(stored.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let human = String::from_utf8(env.ok(&["vault", "info", "v"]).stdout).unwrap();
    assert!(human.contains("key store"), "{human}");
    write_raw(&img, 8 << 20, 2 << 20, &random_bytes(1 << 20, 9));
    env.backup(&img, "d");
    assert_eq!(env.backups().len(), 2);
}
