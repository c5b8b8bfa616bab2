//! The command line for scripts and people: exit codes by error kind, JSON errors, a
//! closed pipe, header rows, `backups show` (local == remote), `latest` and id
//! prefixes, the image format from the extension of `--to`, completions, man pages,
//! help for every flag, the data dir and logging.

use std::io::{BufRead, Read};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::appliance::{Appliance, token};
use crate::common::{Env, fixtures, images_equal, pack_files, s, write_raw};

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `qemu-img info`'s format of `path`.
fn format_of(path: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img info");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["format"].as_str().unwrap().to_string()
}

/// An env with one backup of the qcow2 fixture as disk `web`; returns (env, backup).
fn env_with_backup() -> (Env, Value) {
    let env = Env::new();
    let b = env.backup(&fixtures().join("disk.qcow2"), "web");
    (env, b)
}

#[test]
fn exit_codes_follow_the_documented_table() {
    let (env, b) = env_with_backup();
    let help = stdout(&env.run(&["--help"]));
    for row in [
        "2    usage",
        "3    not found",
        "4    conflict",
        "5    corrupt data",
        "7    I/O error",
    ] {
        assert!(help.contains(row), "--help lacks {row:?}:\n{help}");
    }
    // Usage: an unknown flag, `latest` without a disk, a bad combination.
    assert_eq!(code(&env.run(&["backups", "list", "--bogus"])), 2);
    let out = env.run(&["backups", "show", "latest"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("--disk"), "{}", stderr(&out));
    // Not found: a backup, a vault, a source file.
    let out = env.run(&["backups", "show", "nope"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("nope"));
    let disk = fixtures().join("disk.qcow2");
    let out = env.run(&["backup", disk.to_str().unwrap(), "--vault", "nope"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let out = env.run(&["backup", "/nonexistent/disk.qcow2", "--vault", "v"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    // Conflict: a vault name taken; restore onto an existing file.
    assert_eq!(code(&env.run(&["vault", "create", "v"])), 4);
    let taken = env.path("taken.raw");
    std::fs::write(&taken, b"mine").unwrap();
    let out = env.run(&["restore", s(&b, "id"), "--to", taken.to_str().unwrap()]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&taken).unwrap(),
        b"mine",
        "nothing was written"
    );
    // Corrupt: verify finds a damaged pack.
    let pack = pack_files(&env.vault_dir()).remove(0);
    let mut bytes = std::fs::read(&pack).unwrap();
    // Inside the first blob (data chunks are written first).
    bytes[8 + 12 + 1000] ^= 0x01;
    std::fs::write(&pack, &bytes).unwrap();
    let out = env.run(&["verify", "--vault", "v"]);
    assert_eq!(code(&out), 5, "{}", stdout(&out));
    for out in [&out, &env.run(&["backups", "show", "nope"])] {
        assert!(!stderr(out).contains("panicked"));
    }
}

#[test]
fn json_errors_are_json_on_stdout() {
    let (env, _) = env_with_backup();
    for (args, kind, exit) in [
        (vec!["backups", "show", "nope"], "not_found", 3),
        (vec!["vault", "create", "v"], "conflict", 4),
        (vec!["backups", "list", "--bogus"], "usage", 2),
        (
            vec!["restore", "latest", "--to", "/nonexistent/x"],
            "usage",
            2,
        ),
    ] {
        let mut a = vec!["--json"];
        a.extend(args.iter());
        let out = env.run(&a);
        assert_eq!(code(&out), exit, "{args:?}: {}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", stdout(&out)));
        assert_eq!(v["error"]["kind"], kind, "{v}");
        assert_eq!(v["error"]["exit_code"], exit, "{v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty(), "{v}");
    }
}

/// Run `blockvault ARGS`, read its first line of output, then close the pipe.
fn first_line_then_close(env: &Env, args: &[&str]) -> (String, Output) {
    let mut child = env
        .cmd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    {
        let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
        r.read_line(&mut line).unwrap();
    } // the read end is closed here
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    (
        line,
        Output {
            status,
            stdout: Vec::new(),
            stderr: err.into_bytes(),
        },
    )
}

#[test]
fn a_listing_piped_into_head_ends_quietly() {
    let env = Env::new();
    let img = env.path("tiny.raw");
    write_raw(&img, 64 << 10, 0, b"tiny");
    for i in 0..120 {
        let name = format!("b{i}");
        env.ok(&[
            "backup",
            img.to_str().unwrap(),
            "--vault",
            "v",
            "--id",
            "tiny",
            "--name",
            &name,
        ]);
    }
    // The JSON listing is larger than a pipe's buffer (64 KiB): the writer meets EPIPE.
    let json_len = env.run(&["--json", "backups", "list"]).stdout.len();
    assert!(
        json_len > 128 << 10,
        "only {json_len} bytes: proves nothing"
    );
    for args in [&["backups", "list"][..], &["--json", "backups", "list"][..]] {
        let (line, out) = first_line_then_close(&env, args);
        assert!(!line.is_empty());
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }
    // And through a real shell pipe, as people type it.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} --data {} --json backups list | head -1",
            env!("CARGO_BIN_EXE_blockvault"),
            env.data().display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn human_tables_have_a_header_row() {
    let (env, _) = env_with_backup();
    token(&env, "auditor", "watcher");
    for (args, header) in [
        (&["backups", "list"][..], "ID"),
        (&["vault", "list"][..], "NAME"),
        (&["token", "list"][..], "NAME"),
        (&["tasks", "list"][..], "ID"),
    ] {
        let out = env.ok(args);
        let text = stdout(&out);
        let first = text.lines().next().unwrap_or_default();
        assert!(
            first.split_whitespace().next() == Some(header),
            "{args:?}: {text}"
        );
        assert_eq!(first.to_uppercase(), first, "{args:?}: {text}");
    }
    let text = stdout(&env.ok(&["backups", "list"]));
    assert_eq!(text.lines().count(), 2, "{text}");
    for col in ["NAME", "VAULT", "LOGICAL", "NEW", "RESOURCE"] {
        assert!(text.lines().next().unwrap().contains(col), "{text}");
    }
}

#[test]
fn backups_show_latest_and_id_prefixes_are_the_same_locally_and_remotely() {
    let env = Env::new();
    let disk = fixtures().join("disk.qcow2");
    let first = env.backup(&disk, "web");
    let second = env.backup(&disk, "web");
    let other = env.backup(&fixtures().join("disk.raw"), "db");
    let admin = token(&env, "admin", "root");
    let srv = Appliance::start(&env, &[]);
    let client = Env::bare();
    let remote = |args: &[&str]| {
        let out = client
            .cmd()
            .args(["--server", &srv.url, "--token", &admin, "--json"])
            .envs(crate::appliance::trust_env(&srv.url))
            .args(args)
            .output()
            .unwrap();
        (
            code(&out),
            serde_json::from_slice::<Value>(&out.stdout).ok(),
            out,
        )
    };
    let local = |args: &[&str]| {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = env.run(&a);
        (
            code(&out),
            serde_json::from_slice::<Value>(&out.stdout).ok(),
            out,
        )
    };
    // `latest` of a disk, a unique prefix, a full id: the same backup, the same JSON.
    let id2 = s(&second, "id");
    let unique = id2
        .char_indices()
        .map(|(i, _)| &id2[..=i])
        .find(|p| ![&first, &other].iter().any(|b| s(b, "id").starts_with(p)))
        .unwrap();
    for args in [
        vec!["backups", "show", "latest", "--disk", "web"],
        vec!["backups", "show", unique],
        vec!["backups", "show", id2],
        vec!["backups", "list"],
        vec!["vault", "list"],
        vec!["vault", "info", "v"],
    ] {
        let (lc, lv, lo) = local(&args);
        let (rc, rv, ro) = remote(&args);
        assert_eq!(
            (lc, rc),
            (0, 0),
            "{args:?}: {} / {}",
            stderr(&lo),
            stderr(&ro)
        );
        assert_eq!(lv, rv, "{args:?}: local and remote JSON differ");
        if args[1] == "show" {
            let v = lv.unwrap();
            assert_eq!(v["id"], id2);
            assert!(v["bytes_freed_if_deleted"].is_u64(), "{v}");
        }
    }
    // An ambiguous prefix is a conflict that lists the candidates, both ways.
    let common: String = s(&first, "id")
        .chars()
        .zip(s(&second, "id").chars())
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a)
        .collect();
    for (c, v, _) in [
        local(&["backups", "show", &common]),
        remote(&["backups", "show", &common]),
    ] {
        assert_eq!(c, 4, "{v:?}");
        let msg = v.unwrap()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(s(&first, "id")) && msg.contains(id2), "{msg}");
    }
    // Not found is 3 both ways.
    assert_eq!(local(&["backups", "show", "nope"]).0, 3);
    assert_eq!(remote(&["backups", "show", "nope"]).0, 3);
    // A restore the appliance's task refuses (the target exists) exits as locally: 4.
    let taken = env.path("taken.qcow2");
    std::fs::write(&taken, b"mine").unwrap();
    let args = ["restore", id2, "--to", taken.to_str().unwrap()];
    let (lc, lv, _) = local(&args);
    let (rc, rv, _) = remote(&args);
    assert_eq!((lc, rc), (4, 4), "{lv:?} / {rv:?}");
    assert_eq!(lv.unwrap()["error"]["kind"], rv.unwrap()["error"]["kind"]);
    assert_eq!(
        std::fs::read(&taken).unwrap(),
        b"mine",
        "nothing was written"
    );
    // `backup` prints the same shape locally and remotely.
    let (_, rb, ro) = remote(&[
        "backup",
        disk.to_str().unwrap(),
        "--vault",
        "v",
        "--id",
        "web",
    ]);
    let rb = rb.unwrap_or_else(|| panic!("{}", stderr(&ro)));
    let lb = env.backup(&disk, "web");
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&lb), keys(&rb));
    // `restore latest --disk` takes the newest backup of that disk, locally and
    // remotely, and says so in the same shape.
    let newest = s(&lb, "id");
    let to = env.path("latest.qcow2");
    let (lc, lr, lo) = local(&[
        "restore",
        "latest",
        "--disk",
        "web",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_eq!(lc, 0, "{}", stderr(&lo));
    assert!(images_equal(&disk, &to));
    let to2 = env.path("latest-remote.qcow2");
    let (rc, rr, ro) = remote(&[
        "restore",
        "latest",
        "--disk",
        "web",
        "--to",
        to2.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{}", stderr(&ro));
    assert!(images_equal(&disk, &to2));
    let (lr, rr) = (lr.unwrap(), rr.unwrap());
    assert_eq!(keys(&lr), keys(&rr));
    assert_eq!((s(&lr, "backup"), s(&rr, "backup")), (newest, newest));
    assert_eq!(format_of(&to2), "qcow2");
}

#[test]
fn restore_takes_the_format_from_the_extension_and_refuses_a_contradiction() {
    let (env, b) = env_with_backup();
    let id = s(&b, "id");
    let src = fixtures().join("disk.qcow2");
    for (file, fmt) in [
        ("a.qcow2", "qcow2"),
        ("b.vmdk", "vmdk"),
        ("c.img", "raw"),
        ("d.raw", "raw"),
    ] {
        let to = env.path(file);
        env.ok(&["restore", id, "--to", to.to_str().unwrap()]);
        assert_eq!(format_of(&to), fmt, "{file}");
        assert!(images_equal(&src, &to), "{file}");
    }
    let ova = env.path("e.ova");
    env.ok(&["restore", id, "--to", ova.to_str().unwrap()]);
    let tar = Command::new("tar").arg("tf").arg(&ova).output().unwrap();
    assert!(stdout(&tar).contains(".ovf"), "{}", stdout(&tar));
    // --format contradicting the extension: refused, nothing written.
    let to = env.path("x.qcow2");
    let out = env.run(&[
        "restore",
        id,
        "--to",
        to.to_str().unwrap(),
        "--format",
        "raw",
    ]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("--force-format"), "{}", stderr(&out));
    assert!(!to.exists(), "nothing was written");
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("x.qcow2"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Forced: the asked format under the odd name.
    env.ok(&[
        "restore",
        id,
        "--to",
        to.to_str().unwrap(),
        "--format",
        "raw",
        "--force-format",
    ]);
    assert_eq!(format_of(&to), "raw");
    // The API takes the same request and refuses the same contradiction.
    let admin = token(&env, "admin", "root");
    let srv = Appliance::start(&env, &[]);
    let bad = env.path("y.vmdk");
    let (status, v) = srv.call(
        "POST",
        "/restores",
        Some(&admin),
        Some(serde_json::json!({"backup": id, "to": bad, "format": "qcow2"})),
    );
    assert_eq!(status, 400, "{v}");
    assert!(!bad.exists(), "nothing was written");
    let good = env.path("z.vmdk");
    let t = srv.ok(
        "POST",
        "/restores",
        &admin,
        Some(serde_json::json!({"backup": id, "to": good})),
        202,
    );
    let t = srv.wait_task(
        &admin,
        t["task"].as_str().unwrap(),
        std::time::Duration::from_secs(60),
    );
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(format_of(&good), "vmdk");
    assert!(images_equal(&src, &good));
}

#[test]
fn completions_and_man_pages_are_generated() {
    let env = Env::bare();
    for (shell, marker) in [
        ("bash", "_blockvault"),
        ("zsh", "#compdef blockvault"),
        ("fish", "complete -c blockvault"),
    ] {
        let out = env.ok(&["completions", shell]);
        assert!(stdout(&out).contains(marker), "{shell}");
        assert!(stdout(&out).contains("restore"), "{shell}");
    }
    let page = stdout(&env.ok(&["man"]));
    assert!(page.contains(".TH blockvault"), "{page}");
    assert!(
        page.contains("Exit status"),
        "the man page carries the exit codes"
    );
    let dir = env.path("man");
    env.ok(&["man", "--dir", dir.to_str().unwrap()]);
    for f in [
        "blockvault.1",
        "blockvault-backup.1",
        "blockvault-backups-show.1",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
}

/// Every (sub)command's `--help`: each command, argument and option has a description.
#[test]
fn every_command_and_flag_has_help() {
    let env = Env::bare();
    let mut todo = vec![Vec::<String>::new()];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = env.ok(&args);
        let text = stdout(&out);
        seen += 1;
        let mut section = "";
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if !l.starts_with(' ') && l.ends_with(':') {
                section = l;
                continue;
            }
            if !["Commands:", "Arguments:", "Options:"].contains(&section)
                || !l.starts_with("  ")
                || l.starts_with("      ") && !l.trim_start().starts_with('-')
            {
                continue;
            }
            let entry = l.trim_start();
            let has_text = entry.contains("  ")
                || lines
                    .get(i + 1)
                    .is_some_and(|n| n.starts_with("          ") && !n.trim().is_empty());
            assert!(has_text, "{path:?}: no help for {entry:?}\n{text}");
            if section == "Commands:" {
                let name = entry.split_whitespace().next().unwrap().to_string();
                if name != "help" {
                    let mut p = path.clone();
                    p.push(name);
                    todo.push(p);
                }
            }
        }
    }
    assert!(seen > 20, "only {seen} commands walked");
}

#[test]
fn the_data_dir_is_absolute_and_said() {
    let env = Env::bare();
    let help = stdout(&env.ok(&["--help"]));
    assert!(help.contains("/var/lib/blockvault"), "{help}");
    assert!(help.contains("XDG_DATA_HOME"), "{help}");
    // As root (CI, this machine) the default is the system one, and --help says so.
    if nix::unistd::Uid::effective().is_root() {
        assert!(
            help.contains("[default here: /var/lib/blockvault]"),
            "{help}"
        );
    }
    // A relative BLOCKVAULT_DATA is made absolute against the working directory.
    let out = Command::new(env!("CARGO_BIN_EXE_blockvault"))
        .args(["vault", "list"])
        .env("BLOCKVAULT_DATA", "rel-data")
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let want = format!(
        "data dir {}, from BLOCKVAULT_DATA",
        env.dir.path().join("rel-data").display()
    );
    assert!(stdout(&out).contains(&want), "{}", stdout(&out));
    assert!(env.dir.path().join("rel-data/catalog.sqlite").exists());
}

/// `serve --config` with `log_level` and `log_format`; stderr a file (not a terminal).
fn serve_logs(env: &Env, level: &str, format: &str) -> String {
    let cfg = env.path(&format!("{level}-{format}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata = \"{}\"\nlog_level = \"{level}\"\nlog_format = \"{format}\"\n",
            env.data().display()
        ),
    )
    .unwrap();
    let log = env.path(&format!("{level}-{format}.log"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_blockvault"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .env_remove("BLOCKVAULT_LOG")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening"), "{line}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn the_config_log_level_and_format_are_honoured_without_colours() {
    let env = Env::new();
    let debug = serve_logs(&env, "debug", "json");
    assert!(
        !debug.contains('\u{1b}'),
        "colour codes in a log file:\n{debug}"
    );
    let lines: Vec<&str> = debug.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let v: Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"));
        assert!(v["level"].is_string(), "{l}");
    }
    assert!(lines.iter().any(|l| l.contains("\"DEBUG\"")), "{debug}");
    let quiet = serve_logs(&env, "error", "text");
    assert!(
        !quiet.contains("INFO") && !quiet.contains("DEBUG"),
        "log_level error still logs:\n{quiet}"
    );
    let info = serve_logs(&env, "info", "text");
    assert!(info.contains("INFO") && info.contains("data dir"), "{info}");
    assert!(!info.contains('\u{1b}'), "{info}");
    // --log-json on any command; RUST_LOG sets the level.
    let out = env
        .cmd()
        .args(["--log-json", "vault", "list"])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(err.lines().any(|l| l.contains("data dir")), "{err}");
    for l in err.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"));
    }
}
