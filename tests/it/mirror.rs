//! Mirror vault on a second appliance (issue 17 part 4): backups pushed over HTTPS with a
//! pinned certificate and a `replication` token into a real `blockvault serve`, restored
//! byte-exact from it alone; reruns send nothing; the token can do nothing else; a vault
//! not listed in `[server] mirror_vaults` refuses; a wrong fingerprint is refused before
//! anything is sent; a blob that does not verify is refused and not kept; a receiving
//! appliance killed mid-transfer and restarted is resumed without resending what landed;
//! an encrypted vault becomes an encrypted mirror without the mirror holding its key.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::appliance::{agent_for, parse_ready, token};
use crate::common::*;

/// The receiving appliance: a data dir with vault `m` listed as a mirror vault and
/// vault `plain` not listed, a replication token and an admin token.
pub(crate) struct Receiver {
    pub(crate) env: Env,
    pub(crate) config: PathBuf,
    pub(crate) rep: String,
    pub(crate) admin: String,
}

impl Receiver {
    pub(crate) fn new() -> Receiver {
        let env = Env::bare();
        env.ok(&["vault", "create", "m"]);
        env.ok(&["vault", "create", "plain"]);
        let config = env.path("receiver.toml");
        std::fs::write(
            &config,
            "[server]\nmirror_vaults = [\"m\"]\n\n[paths]\nrestore_to = [\"/\"]\n",
        )
        .unwrap();
        let rep = token(&env, "replication", "site-a");
        let admin = token(&env, "admin", "root");
        Receiver {
            env,
            config,
            rep,
            admin,
        }
    }

    /// `serve` on `listen` (e.g. 127.0.0.1:0); returns it with its URL and fingerprint.
    pub(crate) fn serve(&self, listen: &str) -> (Serve, String, String) {
        let mut child = self
            .env
            .cmd()
            .args(["serve", "--listen", listen, "--config"])
            .arg(&self.config)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting blockvault serve");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let (url, fp) = parse_ready(&line);
        (Serve(child), url, fp.expect("serve prints its fingerprint"))
    }

    pub(crate) fn vault_dir(&self, name: &str) -> PathBuf {
        self.env.data().join("vaults").join(name)
    }
}

/// A running `serve`, killed when dropped.
pub(crate) struct Serve(Child);

impl std::ops::Deref for Serve {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Serve {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `replicate --all --from v --to URL` on the source's data dir with the token in the
/// environment; returns the process output.
fn replicate_cmd(src: &Env, to: &str, fp: &str, tok: &str, extra: &[&str]) -> Command {
    let mut c = src.cmd();
    c.args(["--json", "replicate", "--all", "--from", "v", "--to", to])
        .args(extra)
        .env("BLOCKVAULT_FINGERPRINT", fp)
        .env("BLOCKVAULT_REPLICA_TOKEN", tok);
    c
}

fn replicate_ok(src: &Env, to: &str, fp: &str, tok: &str) -> Value {
    let out = replicate_cmd(src, to, fp, tok, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "replicate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    tok: &str,
    body: Option<Vec<u8>>,
) -> (u16, String) {
    let rb = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .header("Authorization", format!("Bearer {tok}"))
        .header("content-type", "application/json");
    let mut r = agent
        .run(rb.body(body.unwrap_or_default()).unwrap())
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let s = r.status().as_u16();
    (s, r.body_mut().read_to_string().unwrap_or_default())
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Restore every backup of the receiver's vault `m` (serve stopped) and compare each
/// with the image it was taken of, by backup name.
pub(crate) fn restore_all_from_mirror(r: &Receiver, images: &[(&str, &Path)]) {
    let list = r.env.json(&["backups", "list", "--vault", "m"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), images.len(), "{list:?}");
    for (name, img) in images {
        let b = list
            .iter()
            .find(|b| s(b, "name") == *name)
            .unwrap_or_else(|| panic!("no replica named {name}: {list:?}"));
        let out = r.env.path(&format!("restored-{name}.raw"));
        r.env.restore(s(b, "id"), &out, "raw");
        assert!(images_equal(img, &out), "{name} differs after restore");
    }
}

#[test]
fn full_and_incremental_pushed_to_a_mirror_restore_byte_exact_from_it_alone_and_a_rerun_sends_nothing()
 {
    let src = Env::new();
    let img = src.path("disk.raw");
    let size = 16u64 << 20;
    write_raw(&img, size, 0, &random_bytes(12 << 20, 1));
    let v1 = src.path("v1.raw");
    std::fs::copy(&img, &v1).unwrap();
    src.json(&[
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "d",
        "--name",
        "full",
    ]);
    write_raw(&img, size, 3 << 20, &random_bytes(1 << 20, 2));
    let v2 = src.path("v2.raw");
    std::fs::copy(&img, &v2).unwrap();
    let inc = src.json(&[
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "d",
        "--name",
        "inc",
    ]);

    let r = Receiver::new();
    let (mut serve, url, fp) = r.serve("127.0.0.1:0");
    let to = format!("{url}/m");

    let first = replicate_ok(&src, &to, &fp, &r.rep);
    assert_eq!(u(&first, "backups_sent"), 2, "{first}");
    let sent = u(&first, "bytes_sent");
    assert!(sent >= 12 << 20, "{first}");
    // What went over the wire is the blobs plus a little framing.
    let wire = u(&first, "wire_bytes");
    assert!(wire >= sent && wire <= sent + (64 << 10), "{first}");
    // The incremental sent about its own stored size, not the disk's.
    let inc_sent = first["backups"][1]["bytes_sent"].as_u64().unwrap();
    let inc_stored = u(&inc, "bytes_stored");
    assert!(
        inc_sent as f64 <= 1.2 * inc_stored as f64 + 65536.0,
        "{first} vs {inc}"
    );

    let again = replicate_ok(&src, &to, &fp, &r.rep);
    assert_eq!(u(&again, "backups_sent"), 0, "{again}");
    assert_eq!(u(&again, "bytes_sent"), 0, "{again}");
    assert_eq!(u(&again, "wire_bytes"), 0, "{again}");

    // The first appliance's vault is lost.
    std::fs::remove_dir_all(src.vault_dir()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(serve.wait().unwrap().success());
    restore_all_from_mirror(&r, &[("full", &v1), ("inc", &v2)]);
}

#[test]
fn a_replication_token_may_only_push_to_a_mirror_vault_and_bad_blobs_and_wrong_pins_are_refused() {
    let src = Env::new();
    let img = src.path("disk.raw");
    write_raw(&img, 4 << 20, 0, &random_bytes(2 << 20, 3));
    src.backup(&img, "d");
    let r = Receiver::new();
    let (_serve, url, fp) = r.serve("127.0.0.1:0");
    let agent = agent_for(Some(&fp));
    let api = format!("{url}/api/v1");

    // The replication token can call nothing but the replica routes.
    for (m, p) in [
        ("GET", "/backups"),
        ("GET", "/vaults"),
        ("GET", "/health"),
        ("GET", "/tasks"),
        ("DELETE", "/backups/x"),
        ("POST", "/restores"),
    ] {
        let body = (m == "POST").then(|| b"{}".to_vec());
        let (st, text) = call(&agent, m, &format!("{api}{p}"), &r.rep, body);
        assert_eq!(st, 403, "{m} {p}: {text}");
    }
    // An admin may call the replica routes; a replication token only on a mirror vault.
    let (st, _) = call(
        &agent,
        "GET",
        &format!("{api}/vaults/m/replica/info"),
        &r.admin,
        None,
    );
    assert_eq!(st, 200);
    let (st, text) = call(
        &agent,
        "GET",
        &format!("{api}/vaults/plain/replica/info"),
        &r.rep,
        None,
    );
    assert_eq!(st, 403, "{text}");
    assert!(text.contains("mirror_vaults"), "{text}");
    let out = replicate_cmd(&src, &format!("{url}/plain"), &fp, &r.rep, &[])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("mirror_vaults"), "{}", stderr(&out));
    assert!(pack_files(&r.vault_dir("plain")).is_empty());

    // A wrong pin is refused in the handshake: no request reaches the appliance.
    let audited = |r: &Receiver| {
        let (st, text) = call(&agent, "GET", &format!("{api}/audit"), &r.admin, None);
        assert_eq!(st, 200);
        text.matches("/replica/").count()
    };
    let before = audited(&r);
    let wrong = fp
        .split(':')
        .map(|b| if b == "00" { "11" } else { "00" })
        .collect::<Vec<_>>()
        .join(":");
    let out = replicate_cmd(&src, &format!("{url}/m"), &wrong, &r.rep, &[])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("refused"), "{}", stderr(&out));
    assert_eq!(audited(&r), before, "a request got through a wrong pin");
    assert!(pack_files(&r.vault_dir("m")).is_empty());

    // A blob whose bytes are not what its digest says is refused, and nothing is kept.
    let digest = blockvault::chunk::ChunkDigest([7; 32]);
    let body = blockvault::replicate::wire::encode(&[blockvault::replicate::RawBlob {
        digest,
        kind: blockvault::chunk::BlobKind::Data,
        stored: b"these bytes are no blob of digest 0707...".to_vec(),
    }]);
    let (st, text) = call(
        &agent,
        "PUT",
        &format!("{api}/vaults/m/replica/blobs"),
        &r.rep,
        Some(body),
    );
    assert_eq!(st, 422, "{text}");
    assert!(pack_files(&r.vault_dir("m")).is_empty());
    let ask = serde_json::to_vec(&json!({"digests": [digest]})).unwrap();
    let (st, text) = call(
        &agent,
        "POST",
        &format!("{api}/vaults/m/replica/missing"),
        &r.rep,
        Some(ask),
    );
    assert_eq!(st, 200, "{text}");
    assert!(text.contains(&digest.to_string()), "{text}");
}

#[test]
fn a_receiving_appliance_killed_mid_transfer_is_resumed_without_resending_what_landed() {
    let src = Env::new();
    let img = src.path("disk.raw");
    let size = 64u64 << 20;
    write_raw(&img, size, 0, &random_bytes(size as usize, 9));
    src.backup(&img, "d");
    let r = Receiver::new();
    let (mut serve, url, fp) = r.serve("127.0.0.1:0");
    let listen = url.trim_start_matches("https://").to_string();
    let started = Instant::now();
    let job = replicate_cmd(
        &src,
        &format!("{url}/m"),
        &fp,
        &r.rep,
        &["--bwlimit", "8MiB"],
    )
    .env("BLOCKVAULT_REPLICA_RETRY_SECONDS", "120")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Wait until two batches (16 MiB) landed, then kill the receiver outright.
    let deadline = Instant::now() + Duration::from_secs(120);
    while pack_files(&r.vault_dir("m")).len() < 2 {
        assert!(Instant::now() < deadline, "no blobs landed on the mirror");
        std::thread::sleep(Duration::from_millis(50));
    }
    serve.kill().unwrap();
    serve.wait().unwrap();
    let landed: u64 = pack_files(&r.vault_dir("m"))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(landed >= 15 << 20, "{landed}");
    let (_serve, url2, fp2) = r.serve(&listen);
    assert_eq!((url2, fp2), (url.clone(), fp.clone()));
    let out = job.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u(&v, "backups_sent"), 1, "{v}");
    // (A request cut by the kill is retried by us, or by ureq itself on a fresh
    // connection when the pooled one is found dead: `retries` may be 0.)
    // Blob bodies the receiver answered add up to the backup's blobs and framing: the
    // 15 MiB and more that had landed before the kill were not sent again.
    let total = u(&v, "bytes_sent");
    let wire = u(&v, "wire_bytes");
    assert!(total >= size, "{v}");
    assert!(wire <= total + (1 << 20), "resent what had landed: {v}");
    // The bandwidth limit held: 64 MiB at 8 MiB/s.
    assert!(started.elapsed() >= Duration::from_secs(6), "{v}");
    std::fs::remove_dir_all(src.vault_dir()).unwrap();
    drop(_serve);
    let list = r.env.json(&["backups", "list", "--vault", "m"]);
    let id = s(&list[0], "id").to_string();
    let out_img = r.env.path("restored.raw");
    r.env.restore(&id, &out_img, "raw");
    assert!(images_equal(&img, &out_img));
}

/// Every byte of every file under `dir`.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn an_encrypted_vault_pushed_to_a_mirror_stays_sealed_there_and_restores_only_with_its_key() {
    const MARKER: &[u8] = b"PLAINTEXT-MARKER-of-site-a-7f3c";
    // An encrypted source whose disk holds a plaintext marker all over.
    let src = Env::bare();
    let key = src.path("v.key");
    let k = key.to_str().unwrap();
    src.ok(&["vault", "create", "v", "--encrypt", "--keyfile", k]);
    let img = src.path("disk.raw");
    let marked: Vec<u8> = MARKER.iter().copied().cycle().take(2 << 20).collect();
    write_raw(&img, 8 << 20, 0, &marked);
    write_raw(&img, 8 << 20, 4 << 20, &random_bytes(2 << 20, 41));
    src.json(&[
        "--keyfile",
        k,
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "d",
        "--name",
        "sealed-full",
    ]);
    // A plaintext source.
    let plain = Env::new();
    let pimg = plain.path("p.raw");
    write_raw(&pimg, 4 << 20, 0, &random_bytes(1 << 20, 42));
    plain.backup(&pimg, "p");

    // A mirror vault that holds plaintext backups cannot become the encrypted mirror.
    let r1 = Receiver::new();
    let (_s1, url1, fp1) = r1.serve("127.0.0.1:0");
    replicate_ok(&plain, &format!("{url1}/m"), &fp1, &r1.rep);
    let packs_before = pack_files(&r1.vault_dir("m")).len();
    let out = replicate_cmd(&src, &format!("{url1}/m"), &fp1, &r1.rep, &["--keyfile", k])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("plaintext backups"),
        "{}",
        stderr(&out)
    );
    assert_eq!(pack_files(&r1.vault_dir("m")).len(), packs_before);

    // A passphrase wrapping too: the mirror takes it with the key material, and the
    // push says that it can be guessed offline there.
    let add = src
        .cmd()
        .env("NEWPASS", "a passphrase for site b")
        .args(["--keyfile", k, "vault", "key", "add", "v"])
        .args(["--new-passphrase-env", "NEWPASS"])
        .output()
        .unwrap();
    assert!(add.status.success(), "{}", stderr(&add));

    // An empty mirror vault takes the key material and the sealed blobs as they are.
    let r = Receiver::new();
    let (mut serve, url, fp) = r.serve("127.0.0.1:0");
    let to = format!("{url}/m");
    let out = replicate_cmd(&src, &to, &fp, &r.rep, &["--keyfile", k])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("1 passphrase wrapping(s)"),
        "{}",
        stderr(&out)
    );
    let first: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u(&first, "backups_sent"), 1, "{first}");
    let vt = std::fs::read_to_string(r.vault_dir("m").join("vault.toml")).unwrap();
    assert!(
        vt.contains("[encryption]") && vt.contains("wrapped_for"),
        "{vt}"
    );
    // The mirror never held the key: no key store, and no stored byte shows the data
    // or the backup's name.
    assert!(!r.env.data().join("keys").exists());
    let stored = files_under(&r.vault_dir("m"));
    assert!(
        stored
            .iter()
            .any(|(p, _)| p.extension().is_some_and(|e| e == "pack"))
    );
    for (p, bytes) in &stored {
        assert!(!contains(bytes, MARKER), "plaintext in {}", p.display());
        if p.to_string_lossy().contains("/backups/") {
            assert!(!contains(bytes, b"sealed-full"), "{}", p.display());
        }
    }
    // Dedup holds on the mirror (the digests are the source's keyed ones): a rerun
    // sends nothing, an incremental about its stored size.
    let again = replicate_cmd(&src, &to, &fp, &r.rep, &["--keyfile", k])
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        !stderr(&again).contains("passphrase wrapping"),
        "said once, when the key material is taken: {}",
        stderr(&again)
    );
    let again: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(u(&again, "bytes_sent"), 0, "{again}");
    assert_eq!(u(&again, "wire_bytes"), 0, "{again}");
    let v1 = src.path("v1.raw");
    std::fs::copy(&img, &v1).unwrap();
    write_raw(&img, 8 << 20, 6 << 20, &random_bytes(512 << 10, 43));
    let inc = src.json(&[
        "--keyfile",
        k,
        "backup",
        img.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "d",
        "--name",
        "sealed-inc",
    ]);
    let out = replicate_cmd(&src, &to, &fp, &r.rep, &["--keyfile", k])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let second: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u(&second, "backups_sent"), 1, "{second}");
    assert!(
        u(&second, "bytes_sent") as f64 <= 1.2 * u(&inc, "bytes_stored") as f64 + 65536.0,
        "{second} vs {inc}"
    );
    // A plaintext source cannot push into the encrypted mirror, nor can a hand-made
    // unsealed blob land there (the mirror checks what it can without the key).
    let packs = pack_files(&r.vault_dir("m")).len();
    let plain_blob = blockvault::chunk::encode_blob(
        blockvault::chunk::BlobKind::Data,
        marked[..65536].to_vec(),
        1,
        &blockvault::chunk::BlobCodec::plain(),
    )
    .unwrap();
    let mut stored = plain_blob.header.to_vec();
    stored.extend_from_slice(&plain_blob.payload);
    let body = blockvault::replicate::wire::encode(&[blockvault::replicate::RawBlob {
        digest: plain_blob.digest,
        kind: blockvault::chunk::BlobKind::Data,
        stored,
    }]);
    let (st, text) = call(
        &agent_for(Some(&fp)),
        "PUT",
        &format!("{url}/api/v1/vaults/m/replica/blobs"),
        &r.rep,
        Some(body),
    );
    assert_eq!(st, 422, "{text}");
    assert!(text.contains("not sealed"), "{text}");
    assert_eq!(pack_files(&r.vault_dir("m")).len(), packs);
    let out = replicate_cmd(&plain, &to, &fp, &r.rep, &[])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("plaintext"), "{}", stderr(&out));
    assert_eq!(pack_files(&r.vault_dir("m")).len(), packs);

    // Site A is lost. On the mirror, a restore needs the key: without it exit 10 and
    // nothing written; with it byte-exact.
    std::fs::remove_dir_all(src.vault_dir()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(serve.wait().unwrap().success());
    let list = r.env.json(&["backups", "list", "--vault", "m"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    for (name, want) in [("sealed-full", &v1), ("sealed-inc", &img)] {
        let b = list
            .as_array()
            .unwrap()
            .iter()
            .find(|b| s(b, "name") == name)
            .unwrap_or_else(|| panic!("no {name} on the mirror: {list}"));
        let id = s(b, "id").to_string();
        let out_img = r.env.path(&format!("{name}.raw"));
        let o = out_img.to_str().unwrap();
        let denied = r.env.run(&["restore", &id, "--to", o, "--format", "raw"]);
        assert_eq!(denied.status.code(), Some(10), "{}", stderr(&denied));
        assert!(!out_img.exists());
        r.env
            .ok(&["--keyfile", k, "restore", &id, "--to", o, "--format", "raw"]);
        assert!(images_equal(want, &out_img), "{name} differs");
    }
    // With the key, the mirror verifies clean.
    r.env.ok(&["--keyfile", k, "verify", "--vault", "m"]);
}
