//! Vaults on S3-compatible object storage, against a real single-node Garage started per
//! test on 127.0.0.1 (throwaway config: sqlite metadata, replication_factor 1, no compression, random
//! rpc_secret; layout assigned and applied, one bucket, one key). Garage is found as
//! `$BLOCKVAULT_GARAGE`, `garage` on PATH or `~/.cargo/bin/garage`; when it is missing
//! these tests fail with the command that installs it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockvault::vault::store::{ChunkStore, S3Credentials, S3Location, S3Store};

use crate::common::*;

/// A running single-node Garage; killed and its files removed on drop.
pub struct Garage {
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub endpoint: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

fn garage_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BLOCKVAULT_GARAGE") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("garage").is_file() {
                return d.join("garage");
            }
        }
    }
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_default());
    let cargo = home.join(".cargo/bin/garage");
    assert!(
        cargo.is_file(),
        "Garage is not installed (the S3 vault tests need it): run `cargo install garage --version 2.5.0 --locked` \
         (binary in ~/.cargo/bin), or set BLOCKVAULT_GARAGE to its path"
    );
    cargo
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Garage {
    pub fn start() -> Garage {
        let bin = garage_bin();
        let dir = tempfile::Builder::new()
            .prefix("bv-garage-")
            .tempdir()
            .unwrap();
        let (s3, rpc) = (free_port(), free_port());
        let secret = hex(&rand_bytes(32));
        let config = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
             compression_level = \"none\"\n\
             replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n",
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("garage.toml"), config).unwrap();
        let mut g = Garage {
            bin,
            dir,
            child: None,
            endpoint: format!("http://127.0.0.1:{s3}"),
            bucket: "blockvault-test".into(),
            key_id: String::new(),
            secret: String::new(),
        };
        g.run_server();
        let node = g.cli(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "100G", &node]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&["bucket", "create", &g.bucket.clone()]);
        let key = g.cli(&["key", "create", "blockvault-test-key"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in `garage key create`: {key}"))
        };
        g.key_id = field("Key ID:");
        g.secret = field("Secret key:");
        g.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &g.bucket.clone(),
            "--key",
            "blockvault-test-key",
        ]);
        g
    }

    fn run_server(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .arg("server")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        wait_for("Garage's S3 port", || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        wait_for("Garage's RPC", || self.try_cli(&["status"]).is_some());
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "garage {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kill the server (its data stays for [`restart`](Self::restart)).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.run_server();
    }

    pub fn credentials(&self) -> S3Credentials {
        S3Credentials {
            access_key_id: self.key_id.clone(),
            secret_access_key: self.secret.clone(),
        }
    }

    /// A client of the vault at `prefix`, to count objects.
    pub fn store(&self, prefix: &str) -> S3Store {
        let loc = S3Location::parse(
            &format!("s3://{}/{prefix}", self.bucket),
            &self.endpoint,
            Some("garage"),
        )
        .unwrap();
        S3Store::new(loc, &self.credentials()).unwrap()
    }

    /// Keys under `what` (e.g. "packs") in the vault at `prefix`.
    pub fn objects(&self, prefix: &str, what: &str) -> Vec<String> {
        self.store(prefix).list_files(what).unwrap()
    }

    /// `vault create NAME --s3 …` in `env`, with the key in the environment only.
    pub fn create_vault(&self, env: &Env, name: &str, prefix: &str) {
        self.create_vault_with(env, name, prefix, &[]);
    }

    /// [`Garage::create_vault`] with more arguments (`--encrypt …`, `--compliance-days`).
    pub fn create_vault_with(&self, env: &Env, name: &str, prefix: &str, extra: &[&str]) {
        let url = format!("s3://{}/{prefix}", self.bucket);
        let out = env
            .cmd()
            .args(["vault", "create", name, "--s3", &url])
            .args(extra)
            .args(["--endpoint", &self.endpoint, "--region", "garage"])
            .env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "vault create --s3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `vault attach NAME --s3 …` in `env`.
    pub fn attach_vault(&self, env: &Env, name: &str, prefix: &str) -> String {
        let out = self.try_attach_vault(env, name, prefix, &[]);
        assert!(
            out.status.success(),
            "vault attach --s3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `vault attach NAME --s3 …` in `env` with more arguments (e.g. `--keyfile K`).
    pub fn try_attach_vault(
        &self,
        env: &Env,
        name: &str,
        prefix: &str,
        extra: &[&str],
    ) -> std::process::Output {
        let url = format!("s3://{}/{prefix}", self.bucket);
        env.cmd()
            .args(["vault", "attach", name, "--s3", &url])
            .args(extra)
            .args(["--endpoint", &self.endpoint, "--region", "garage"])
            .env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .arg("--json")
            .output()
            .unwrap()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

fn rand_bytes(n: usize) -> Vec<u8> {
    let mut seed = [0u8; 8];
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    seed.copy_from_slice(&(t ^ std::process::id() as u64).to_le_bytes());
    random_bytes(n, u64::from_le_bytes(seed))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An Env (data dir) whose vault `v` lives in Garage under `prefix`.
fn s3_env(g: &Garage, prefix: &str) -> Env {
    let env = Env::bare();
    g.create_vault(&env, "v", prefix);
    env
}

/// A raw image of `mib` MiB of random (incompressible) data.
fn random_image(env: &Env, name: &str, mib: u64, seed: u64) -> PathBuf {
    let path = env.path(name);
    write_raw(
        &path,
        mib << 20,
        0,
        &random_bytes((mib << 20) as usize, seed),
    );
    path
}

fn qio(fmt: &str, img: &Path, cmd: &str) {
    sh("qemu-io", &["-f", fmt, "-c", cmd, img.to_str().unwrap()]);
}

#[test]
fn a_vault_on_garage_takes_a_full_and_a_bitmap_incremental_and_restores_both_byte_exact() {
    let g = Garage::start();
    let fx = fixtures();
    let env = s3_env(&g, "inc");
    // The key was given in the environment only: never in argv, kept 0600 beside the state.
    let creds = env.data().join("vaults/v/s3-credentials.toml");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let info = env.info();
    assert!(
        !info.to_string().contains(&g.secret),
        "the secret leaks in vault info"
    );

    let img = env.path("work.qcow2");
    std::fs::copy(fx.join("disk.qcow2"), &img).unwrap();
    sh(
        "qemu-img",
        &["bitmap", "--add", img.to_str().unwrap(), "b0"],
    );
    let sock = env.path("nbd.sock");
    let backup = |env: &Env| {
        let srv = Server::qemu_nbd(&img, &sock, &["-f", "qcow2", "-B", "b0"]);
        env.json(&[
            "backup",
            &srv.uri(),
            "--vault",
            "v",
            "--id",
            "vm1",
            "--bitmap",
            "b0",
        ])
    };
    let full = backup(&env);
    assert_eq!(s(&full, "kind"), "full");
    let packs_full = g.objects("inc", "packs").len();
    assert!(packs_full > 0);
    sh(
        "qemu-img",
        &["bitmap", "--clear", img.to_str().unwrap(), "b0"],
    );
    qio("qcow2", &img, "write -P 0x21 1M 64k");
    qio("qcow2", &img, "write -P 0x22 33M 4k");
    let inc = backup(&env);
    assert_eq!(s(&inc, "kind"), "incremental", "{inc}");
    assert_eq!(s(&inc, "strategy"), "bitmap");
    assert_eq!(u(&inc, "bytes_read"), 2 * (64 << 10), "{inc}");
    // An incremental adds one pack object and one manifest.
    assert_eq!(g.objects("inc", "packs").len(), packs_full + 1);
    assert_eq!(g.objects("inc", "backups").len(), 2);

    let out = env.path("r.qcow2");
    env.restore(s(&inc, "id"), &out, "qcow2");
    assert!(images_equal(&img, &out));
    let out0 = env.path("r0.raw");
    env.restore(s(&full, "id"), &out0, "raw");
    assert!(images_equal(&fx.join("disk.qcow2"), &out0));
}

#[test]
fn serve_nbd_reads_a_backup_straight_from_garage() {
    let g = Garage::start();
    let fx = fixtures();
    let env = s3_env(&g, "nbd");
    let b = env.backup(&fx.join("disk.qcow2"), "vm");
    let sock = env.path("serve.sock");
    let mut child = env
        .cmd()
        .args(["serve-nbd", s(&b, "id"), "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("nbd+unix://"), "{line}");
    let same = Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(fx.join("disk.qcow2"))
        .arg(line.trim())
        .status()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(same.success(), "the served backup differs from the source");
}

#[test]
fn gc_after_delete_frees_the_objects_in_the_bucket() {
    let g = Garage::start();
    let env = s3_env(&g, "gc");
    let a = random_image(&env, "a.raw", 40, 1);
    let b = random_image(&env, "b.raw", 8, 2);
    let ba = env.backup(&a, "a");
    let bb = env.backup(&b, "b");
    let before = g.objects("gc", "packs").len();
    assert!(before >= 3, "{before} packs");
    env.ok(&["backups", "delete", s(&ba, "id")]);
    // Deleting removes the manifest; the packs stay until GC.
    assert_eq!(g.objects("gc", "backups").len(), 1);
    assert_eq!(g.objects("gc", "packs").len(), before);
    let st = env.json(&["gc", "--vault", "v"]);
    assert!(u(&st, "packs_deleted") >= 2, "{st}");
    let after = g.objects("gc", "packs").len();
    assert!(after < before, "{after} of {before} packs left");
    assert!(
        g.objects("gc", "locks").is_empty(),
        "GC left its lease behind"
    );
    // What is left restores b byte for byte.
    let out = env.path("b.out");
    env.restore(s(&bb, "id"), &out, "raw");
    assert!(images_equal(&b, &out));
}

/// Start `blockvault backup` of `img` in the background and wait until its first pack
/// object is in the bucket.
fn backup_until_first_pack(g: &Garage, env: &Env, prefix: &str, img: &Path) -> Child {
    let before = g.objects(prefix, "packs").len();
    let child = env
        .cmd()
        .args([
            "backup",
            img.to_str().unwrap(),
            "--vault",
            "v",
            "--id",
            "big",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the first pack in the bucket", || {
        g.objects(prefix, "packs").len() > before
    });
    child
}

#[test]
fn kill_9_during_upload_leaves_no_backup_and_the_next_backup_and_verify_are_clean() {
    let g = Garage::start();
    let env = s3_env(&g, "kill");
    let img = random_image(&env, "big.raw", 256, 3);
    let mut child = backup_until_first_pack(&g, &env, "kill", &img);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        g.objects("kill", "backups").is_empty(),
        "a killed backup left a manifest"
    );

    let b = env.backup(&img, "big");
    let v = env.json(&["verify", "--vault", "v"]);
    assert!(v["corrupt_blobs"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
    let out = env.path("out.raw");
    env.restore(s(&b, "id"), &out, "raw");
    assert!(images_equal(&img, &out));
    // The next backup reused the killed run's durable packs (indexed from their
    // trailers) instead of uploading them again: GC finds nothing to free and the
    // bucket holds one copy of the image.
    let st = env.json(&["gc", "--vault", "v"]);
    assert_eq!(u(&st, "packs_deleted"), 0, "{st}");
    assert!(u(&st, "stored_after") < (256 + 16) << 20, "{st}");
}

#[test]
fn garage_stopped_mid_backup_is_a_clear_unreachable_error_and_no_manifest() {
    let mut g = Garage::start();
    let env = s3_env(&g, "stop");
    let img = random_image(&env, "big.raw", 256, 4);
    let child = backup_until_first_pack(&g, &env, "stop", &img);
    g.stop();
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the backup succeeded without its store"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("object store did not answer"), "{err}");
    assert!(!err.contains(&g.secret));
    g.restart();
    assert!(
        g.objects("stop", "backups").is_empty(),
        "a failed backup left a manifest"
    );
    assert!(env.backups().is_empty());
}

#[test]
fn a_fresh_data_dir_rebuilds_its_catalog_from_the_bucket_alone() {
    let g = Garage::start();
    let fx = fixtures();
    let first = s3_env(&g, "attach");
    let b1 = first.backup(&fx.join("disk.qcow2"), "vm");
    let img = random_image(&first, "r.raw", 4, 5);
    let b2 = first.backup(&img, "other");
    // The first appliance is gone: catalog, lookup cache and all.
    std::fs::remove_dir_all(first.data()).unwrap();

    let second = Env::bare();
    let out = g.attach_vault(&second, "v", "attach");
    assert!(
        out.contains("\"backups\": 2") || out.contains("\"backups\":2"),
        "{out}"
    );
    let ids: Vec<String> = second
        .backups()
        .iter()
        .map(|b| s(b, "id").to_string())
        .collect();
    assert!(ids.contains(&s(&b1, "id").to_string()) && ids.contains(&s(&b2, "id").to_string()));
    let o1 = second.path("o1.raw");
    second.restore(s(&b1, "id"), &o1, "raw");
    assert!(images_equal(&fx.join("disk.qcow2"), &o1));
    let o2 = second.path("o2.raw");
    second.restore(s(&b2, "id"), &o2, "raw");
    assert!(images_equal(&img, &o2));
}

#[test]
fn a_store_nobody_answers_is_unreachable_not_a_missing_object() {
    let port = free_port(); // bound and released: nothing listens there
    let loc =
        S3Location::parse("s3://nobody/v", &format!("http://127.0.0.1:{port}"), None).unwrap();
    let creds = S3Credentials {
        access_key_id: "GKnobody".into(),
        secret_access_key: "not-a-secret".into(),
    };
    let store = S3Store::new(loc, &creds).unwrap();
    let e = store.get("vault.toml").unwrap_err();
    assert_eq!(e.kind(), blockvault::ErrorKind::Unreachable, "{e}");
    assert!(!format!("{e:?}").contains("not-a-secret"));
    assert!(!format!("{creds:?}").contains("not-a-secret"));
}

#[test]
fn gc_on_a_second_appliance_is_refused_while_a_backup_holds_the_vault() {
    let g = Garage::start();
    let first = s3_env(&g, "two");
    let img = random_image(&first, "a.raw", 4, 6);
    first.backup(&img, "a");
    let second = Env::bare();
    g.attach_vault(&second, "v", "two");
    // A backup on the first appliance holds its lease (taken here through the library).
    let store: std::sync::Arc<dyn ChunkStore> = std::sync::Arc::new(g.store("two"));
    let lease = blockvault::vault::lease::Lease::take(
        std::sync::Arc::clone(&store),
        blockvault::vault::lease::LeaseKind::Use,
    )
    .unwrap();
    let out = second.run(&["gc", "--vault", "v"]);
    assert_eq!(out.status.code(), Some(4), "GC ran beside a backup");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by a backup"), "{err}");
    drop(lease);
    second.json(&["gc", "--vault", "v"]);
    assert!(g.objects("two", "locks").is_empty());
}

#[test]
fn gc_on_a_second_appliance_is_refused_while_the_first_serves_a_backup_over_nbd() {
    let g = Garage::start();
    let first = s3_env(&g, "pinned");
    let img = random_image(&first, "a.raw", 4, 9);
    let b = first.backup(&img, "a");
    let second = Env::bare();
    g.attach_vault(&second, "v", "pinned");
    // The first appliance's reader pins the backup in its own state directory, which the
    // second cannot see: the use lease beside the pin is what keeps the second's GC off.
    let sock = first.path("serve.sock");
    let mut child = first
        .cmd()
        .args(["serve-nbd", s(&b, "id"), "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("nbd+unix://"), "{line}");
    // The URI is printed once the socket listens; the pin (and lease) follow at once.
    wait_for("the reader's use lease", || {
        !g.objects("pinned", "locks/leases").is_empty()
    });
    let leases = g.objects("pinned", "locks");
    assert!(leases[0].starts_with("locks/leases/use-"), "{leases:?}");
    let packs = g.objects("pinned", "packs");
    let out = second.run(&["gc", "--vault", "v"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "GC ran beside a reader on another appliance: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(g.objects("pinned", "packs"), packs, "GC deleted nothing");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(leases.len(), 1, "{leases:?}");
    // The reader is gone (its lease names a dead pid of this host): GC runs.
    second.json(&["gc", "--vault", "v"]);
    assert_eq!(
        g.objects("pinned", "packs"),
        packs,
        "the backup is still live"
    );
}

/// The first `name=N` field of the log line containing `what`.
fn logged(log: &str, what: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no {what:?} line in the log:\n{log}"));
    let at = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name} in {line}"));
    line[at + name.len() + 2..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not a number in {line}"))
}

#[test]
fn instant_access_from_garage_reads_ahead_and_serves_the_backup_byte_exact_in_few_gets() {
    let g = Garage::start();
    let env = s3_env(&g, "ahead");
    let img = random_image(&env, "a.raw", 48, 17);
    let b = env.backup(&img, "a");
    let sock = env.path("serve.sock");
    let log_path = env.path("serve.log");
    let mut child = env
        .cmd()
        .env("RUST_LOG", "blockvault=info")
        .args(["serve-nbd", s(&b, "id"), "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("nbd+unix://"), "{line}");
    let out = env.path("copy.raw");
    sh(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            line.trim(),
            out.to_str().unwrap(),
        ],
    );
    let same = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&img)
        .arg(&out)
        .status()
        .unwrap();
    assert!(same.success(), "the copy over NBD differs from the source");
    // SIGTERM: the export ends cleanly and logs what it read and fetched.
    sh("kill", &["-TERM", &child.id().to_string()]);
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    let chunks = logged(&log, "disk reads", "chunks_read");
    let ahead = logged(&log, "disk reads", "prefetched");
    let gets = logged(&log, "S3 requests", "get");
    assert!(chunks >= 768, "48 MiB of 64 KiB chunks, each read:\n{log}");
    assert!(
        ahead >= chunks / 2,
        "{ahead} of {chunks} chunks fetched ahead:\n{log}"
    );
    // About one GET per 4 MiB window (index blobs and the lease aside), not per chunk.
    assert!(
        gets * 16 < chunks,
        "{gets} GETs for {chunks} chunks:\n{log}"
    );
}

#[test]
fn objects_above_the_multipart_size_upload_in_parts_from_memory_and_from_a_spool_file() {
    let g = Garage::start();
    let store = g.store("parts");
    // 80 MiB from memory (5 parts of 16 MiB), 70 MiB from a spool file (4 parts, the
    // last one short): each reads back byte for byte.
    let big = random_bytes(80 << 20, 71);
    store.put_owned("big-owned", big.clone()).unwrap();
    assert_eq!(store.len("big-owned").unwrap(), big.len() as u64);
    assert!(
        store.get("big-owned").unwrap() == big,
        "owned upload differs"
    );
    let dir = tempfile::tempdir().unwrap();
    let spooled = dir.path().join("spooled.tmp");
    let data = random_bytes(70 << 20, 72);
    std::fs::write(&spooled, &data).unwrap();
    store.put_spooled("big-spooled", &spooled).unwrap();
    assert!(!spooled.exists(), "the store consumed the spool file");
    assert!(
        store.get_range("big-spooled", 64 << 20, 6 << 20).unwrap() == data[64 << 20..],
        "the short last part differs"
    );
    assert!(
        store.get("big-spooled").unwrap() == data,
        "spooled upload differs"
    );
}
