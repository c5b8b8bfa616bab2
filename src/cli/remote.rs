//! Remote mode: with `--server URL --token T` the command line drives a running
//! appliance through its HTTP API instead of opening the data dir.
//!
//! The commands keep their meaning: `backup` backs up a resource (created from the
//! sources on first use, named by `--id` like a local backup's disk id), `restore`
//! queues a restore with the same [`RestoreRequest`] the local command carries out, and
//! both wait for their task, show its progress and cancel it on Ctrl-C. Paths are the
//! appliance's: relative ones that exist here are made absolute first, which is right
//! when the appliance runs on this host. `verify` and `gc` queue the appliance's verify
//! and GC tasks and wait for them (a damaged vault exits 5 as locally). What only makes
//! sense next to the vault files (rescan, attach, serving, benchmarks) is refused with a
//! clear error.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::args::{BackupArgs, BackupsCmd, Cli, Cmd, TokenCmd, VaultCmd};
use super::client::{Remote, seg};
use super::exit::{Refused, usage};
use super::output::{
    BACKUP_HEADERS, backup_row, human, print_backup, print_backup_detail, table, vault_table,
};

/// A listing: JSON, or the human table even with --quiet (it is the output asked for).
fn listing(cli: &Cli, v: &Value, table: impl FnOnce(&Value) -> String) -> Result<()> {
    if cli.json {
        outln!("{}", serde_json::to_string_pretty(v)?);
    } else {
        outln!("{}", table(v));
    }
    Ok(())
}

fn print(cli: &Cli, v: &Value, human_line: impl FnOnce(&Value) -> String) -> Result<()> {
    if cli.json {
        outln!("{}", serde_json::to_string_pretty(v)?);
    } else if !cli.quiet {
        outln!("{}", human_line(v));
    }
    Ok(())
}

/// `/backups/{id}`, with `?disk=` for `latest`.
fn backup_path(backup: &str, disk: Option<&str>) -> String {
    match disk {
        Some(d) => format!("/backups/{}?disk={}", seg(backup), seg(d)),
        None => format!("/backups/{}", seg(backup)),
    }
}

fn not_remote(what: &str) -> anyhow::Error {
    usage(format!(
        "{what} runs next to the vault files, not through the API: drop --server and run it on the appliance"
    ))
}

/// A source path as the appliance should see it: made absolute when it exists here.
fn absolute(spec: &str) -> String {
    let (prefix, path) = match spec.split_once(':') {
        Some((p, rest)) if ["raw", "qcow2", "vmdk", "qmp"].contains(&p) => {
            (Some(p), rest.to_string())
        }
        _ if blockvault::nbd::NbdUri::is_nbd(spec) => return spec.to_string(),
        _ => (None, spec.to_string()),
    };
    let path = std::fs::canonicalize(&path).map_or(path, |p| p.display().to_string());
    match prefix {
        Some(p) => format!("{p}:{path}"),
        None => path,
    }
}

/// Run `cli.cmd` against the appliance at `url`.
pub fn run(cli: &Cli, url: &str) -> Result<i32> {
    if cli.keyfile.is_some() || cli.passphrase_env.is_some() {
        return Err(super::exit::usage(
            "--keyfile / --passphrase-env work on the data dir only: the appliance reads vault keys from its config ([keys]) or its key store (`vault key store` on the appliance), never from a request",
        ));
    }
    let r = Remote::new(url, cli.token.as_deref(), &super::client::trust(cli)?)?;
    match &cli.cmd {
        Cmd::Vault(VaultCmd::Create {
            name,
            path,
            chunk_size,
            zstd_level,
            compliance_days,
            encrypt,
            replica_of,
            s3,
        }) => {
            if replica_of.is_some() {
                return Err(not_remote("vault create --replica-of"));
            }
            if *encrypt {
                return Err(not_remote("vault create --encrypt"));
            }
            if s3.s3.is_some() {
                return Err(not_remote("vault create --s3"));
            }
            let body = json!({"name": name, "path": path, "chunk_size": chunk_size, "zstd_level": zstd_level, "compliance_days": compliance_days});
            let v = r.call("POST", "/vaults", Some(&body))?;
            print(cli, &v, |v| {
                format!(
                    "created vault {} at {} (chunk size {} KiB)",
                    name,
                    v["path"].as_str().unwrap_or(""),
                    v["chunk_size"].as_u64().unwrap_or(0) / 1024
                )
            })?;
        }
        Cmd::Vault(VaultCmd::List) => {
            let v = r.call("GET", "/vaults", None)?;
            listing(cli, &v, vault_table)?;
        }
        Cmd::Vault(VaultCmd::Info { name }) => {
            let v = r.call("GET", &format!("/vaults/{}", seg(name)), None)?;
            print(cli, &v, |v| {
                format!(
                    "vault {}: {} backups, {} logical, {} stored in {} packs, dedup ratio {:.2}",
                    name,
                    v["backups"],
                    human(v["logical_bytes"].as_u64().unwrap_or(0)),
                    human(v["stored_bytes"].as_u64().unwrap_or(0)),
                    v["packs"],
                    v["dedup_ratio"].as_f64().unwrap_or(0.0)
                )
            })?;
        }
        Cmd::Vault(VaultCmd::Rescan { .. }) => return Err(not_remote("vault rescan")),
        Cmd::Vault(VaultCmd::Attach { .. }) => return Err(not_remote("vault attach")),
        Cmd::Vault(VaultCmd::Key(_)) => return Err(not_remote("vault key")),
        Cmd::Backup(a) => return backup(cli, &r, a),
        Cmd::Backups(BackupsCmd::List { vault, disk }) => {
            let mut q = Vec::new();
            if let Some(v) = vault {
                q.push(format!("vault={}", seg(v)));
            }
            if let Some(d) = disk {
                q.push(format!("resource={}", seg(d)));
            }
            let v = r.call("GET", &format!("/backups?{}", q.join("&")), None)?;
            listing(cli, &v, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| {
                        let s = |k: &str| b[k].as_str().unwrap_or("").to_string();
                        backup_row(
                            &s("id"),
                            &s("name"),
                            &s("vault"),
                            b["logical_size"].as_u64().unwrap_or(0),
                            b["bytes_new"].as_u64().unwrap_or(0),
                            &s("resource"),
                        )
                    })
                    .collect();
                table(&BACKUP_HEADERS, &rows)
            })?;
        }
        Cmd::Backups(BackupsCmd::Show { backup, disk }) => {
            let v = r.call("GET", &backup_path(backup, disk.as_deref()), None)?;
            print_backup_detail(cli, &v)?;
        }
        Cmd::Backups(BackupsCmd::Delete { backup, disk }) => {
            // Resolve `latest` and id prefixes first: DELETE takes an id or a name.
            let b = r.call("GET", &backup_path(backup, disk.as_deref()), None)?;
            let id = b["id"]
                .as_str()
                .context("the appliance sent no backup id")?;
            let v = r.call("DELETE", &format!("/backups/{}", seg(id)), None)?;
            print(cli, &v, |v| {
                format!(
                    "deleted backup {} ({}); the appliance's GC frees its space",
                    v["name"].as_str().unwrap_or(""),
                    v["deleted"].as_str().unwrap_or("")
                )
            })?;
        }
        Cmd::Backups(BackupsCmd::Lock {
            backup,
            disk,
            until,
        }) => {
            let b = r.call("GET", &backup_path(backup, disk.as_deref()), None)?;
            let id = b["id"]
                .as_str()
                .context("the appliance sent no backup id")?;
            let body = json!({ "until": until });
            let v = r.call("POST", &format!("/backups/{}/lock", seg(id)), Some(&body))?;
            print(cli, &v, |v| {
                format!(
                    "backup {} ({}) is locked until {}",
                    v["name"].as_str().unwrap_or(""),
                    v["id"].as_str().unwrap_or(""),
                    v["locked_until"].as_str().unwrap_or("")
                )
            })?;
        }
        Cmd::Backups(BackupsCmd::Protect { backup, disk, off }) => {
            let b = r.call("GET", &backup_path(backup, disk.as_deref()), None)?;
            let id = b["id"]
                .as_str()
                .context("the appliance sent no backup id")?;
            let body = json!({ "protected": !off });
            let v = r.call(
                "POST",
                &format!("/backups/{}/protect", seg(id)),
                Some(&body),
            )?;
            print(cli, &v, |v| {
                format!(
                    "backup {} protected: {}",
                    v["id"].as_str().unwrap_or(""),
                    v["protected"]
                )
            })?;
        }
        Cmd::Restore(a) => {
            if a.nbd_tls.settings().is_some() {
                return Err(usage(
                    "--nbd-tls-* paths are not sent to an appliance: give \"nbd_tls\" ({\"ca\": \
                     PATH, …}, paths on the appliance) in the body of POST /api/v1/restores",
                ));
            }
            let body = serde_json::to_value(super::restore::request(a))?;
            let task = r.call("POST", "/restores", Some(&body))?;
            let id = task["task"]
                .as_str()
                .context("the appliance sent no task id")?;
            let v = r.wait_task(cli, id)?;
            return super::restore::print_outcome(cli, &v);
        }
        Cmd::Token(TokenCmd::Create { role, name }) => {
            let name = name.clone().unwrap_or_else(|| {
                format!("{role}-{}", &blockvault::manifest::new_backup_id()[16..])
            });
            let v = r.call(
                "POST",
                "/tokens",
                Some(&json!({"name": name, "role": role})),
            )?;
            if !cli.quiet {
                outln!("token {name} ({role}) created; the secret is shown only now:");
            }
            outln!("{}", v["secret"].as_str().unwrap_or(""));
        }
        Cmd::Token(TokenCmd::List) => {
            let v = r.call("GET", "/tokens", None)?;
            listing(cli, &v, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        ["name", "role", "created"]
                            .iter()
                            .map(|k| t[*k].as_str().unwrap_or("").to_string())
                            .collect()
                    })
                    .collect();
                table(&["NAME", "ROLE", "CREATED"], &rows)
            })?;
        }
        Cmd::Token(TokenCmd::Delete { name }) => {
            r.call("DELETE", &format!("/tokens/{}", seg(name)), None)?;
        }
        Cmd::Tasks(t) => return super::tasks::run(cli, Some(&r), t),
        Cmd::ServeNbd { .. } => return Err(not_remote("serve-nbd")),
        Cmd::Drill(a) => return super::drill::remote(cli, &r, a),
        Cmd::Files(a) => {
            use super::args::FilesCmd;
            let at = |path: Option<&str>| {
                let mut q = Vec::new();
                if let Some(p) = path {
                    q.push(format!("path={}", seg(p)));
                }
                if let Some(d) = &a.disk {
                    q.push(format!("disk={}", seg(d)));
                }
                if let Some(p) = a.partition {
                    q.push(format!("partition={p}"));
                }
                format!("/backups/{}/files?{}", seg(&a.backup), q.join("&"))
            };
            match &a.cmd {
                FilesCmd::Partitions => {
                    let v = r.call("GET", &at(None), None)?;
                    super::files::print_partitions(cli, &v)?;
                }
                FilesCmd::Ls { path, long } => {
                    let v = r.call("GET", &at(Some(path)), None)?;
                    super::files::print_listing(cli, &v, *long)?;
                }
                FilesCmd::Get { .. } => {
                    return Err(usage(
                        "files get writes on the machine next to the vault: run it on the \
                         appliance, or fetch one file with GET /api/v1/backups/{id}/files/content?path=",
                    ));
                }
            }
        }
        Cmd::Serve { .. } => return Err(usage("serve starts an appliance; it takes no --server")),
        Cmd::Tls(_) => return Err(not_remote("tls fingerprint")),
        Cmd::Completions { .. } | Cmd::Man { .. } => {}
        Cmd::Gc {
            vault,
            repack_below,
        } => {
            let body = json!({"repack_below": repack_below});
            let task = r.call("POST", &format!("/vaults/{}/gc", seg(vault)), Some(&body))?;
            let id = task["task"]
                .as_str()
                .context("the appliance sent no task id")?;
            let v = r.wait_task(cli, id)?;
            print(cli, &v, |v| {
                format!(
                    "gc {vault}: {} backups, {} live blobs; deleted {} packs, rewrote {}; removed {} blobs; freed {}",
                    v["backups"],
                    v["live_blobs"],
                    v["packs_deleted"],
                    v["packs_rewritten"],
                    v["blobs_removed"],
                    human(v["bytes_freed"].as_u64().unwrap_or(0))
                )
            })?;
        }
        Cmd::Verify {
            vault,
            backup,
            sample,
            rate_mb_s,
        } => {
            let mut body = json!({"backups": backup.iter().collect::<Vec<_>>()});
            if let Some(p) = sample {
                body["sample"] = json!(p);
            }
            if let Some(r) = rate_mb_s {
                body["rate_mb_s"] = json!(r);
            }
            let task = r.call(
                "POST",
                &format!("/vaults/{}/verify", seg(vault)),
                Some(&body),
            )?;
            let id = task["task"]
                .as_str()
                .context("the appliance sent no task id")?;
            // Damage fails the task with the corrupt kind: exit 5, as a local verify.
            let v = r.wait_task(cli, id)?;
            if cli.json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                outln!(
                    "verified {} packs, {} blobs, {}: all good",
                    v["packs_checked"],
                    v["blobs_checked"],
                    human(v["bytes_checked"].as_u64().unwrap_or(0))
                );
            }
        }
        Cmd::Benchmark { .. } => return Err(not_remote("benchmark")),
        Cmd::Bitmaps(_) => return Err(not_remote("bitmaps")),
        Cmd::Replicate {
            backup,
            resource,
            from,
            to,
            to_remote,
            ..
        } => {
            let mut body = json!({"from": from, "backup": backup,
                              "resources": resource.iter().collect::<Vec<_>>()});
            match (to, to_remote) {
                (Some(t), _) => body["to"] = json!(t),
                (None, Some(r)) => body["to_remote"] = json!(r),
                (None, None) => {}
            }
            let to = to
                .clone()
                .or_else(|| to_remote.as_ref().map(|r| format!("remote {r}")))
                .unwrap_or_default();
            let task = r.call("POST", "/replications", Some(&body))?;
            let id = task["task"]
                .as_str()
                .context("the appliance sent no task id")?;
            let v = r.wait_task(cli, id)?;
            print(cli, &v, |v| {
                format!(
                    "replicated {} backups from {from} to {to}: {} new, {} sent",
                    v["backups"].as_array().map_or(0, Vec::len),
                    v["backups_sent"],
                    human(v["bytes_sent"].as_u64().unwrap_or(0))
                )
            })?;
        }
    }
    Ok(0)
}

/// `backup` through the API: make sure the resource exists as asked, back it up, wait.
fn backup(cli: &Cli, r: &Remote, a: &BackupArgs) -> Result<i32> {
    if a.bitmap.is_some() || a.since_base || a.changed_extents.is_some() {
        return Err(usage(
            "--bitmap, --since-base and --changed-extents are not available with --server: \
             the appliance picks the change tracking of a resource itself",
        ));
    }
    let s = &a.server;
    if s.freeze.is_some() || s.thaw.is_some() {
        return Err(usage(
            "--freeze/--thaw commands are not sent to an appliance: define them as a hook set \
             in its config file ([hooks.NAME]) and set the resource's \"hooks\" to NAME \
             (PATCH /resources/ID)",
        ));
    }
    if s.fleece_dir.is_some() {
        return Err(usage("--fleece-dir is not available with --server"));
    }
    if a.nbd_tls.settings().is_some() {
        return Err(usage(
            "--nbd-tls-* paths are not sent to an appliance: set the resource's \"nbd_tls\" \
             ({\"ca\": PATH, …}, paths on the appliance) instead",
        ));
    }
    let sources: Vec<String> = a
        .sources
        .iter()
        .map(|x| match x.split_once('=') {
            Some((n, spec)) if !std::path::Path::new(x).exists() => {
                format!("{n}={}", absolute(spec))
            }
            _ => absolute(x),
        })
        .collect();
    let server = sources.len() > 1 || sources[0].starts_with("qmp:");
    let name = match (&a.id, server) {
        (Some(i), _) => i.clone(),
        (None, false) => blockvault::app::default_disk_id(&sources[0]),
        (None, true) if sources.len() == 1 => sources[0].clone(),
        (None, true) => {
            return Err(usage(
                "a backup of several disks is a server backup: name it with --id",
            ));
        }
    };
    let want = json!({
        "name": name,
        "kind": if server { "server" } else { "disk" },
        "sources": sources,
        "vault": a.vault,
        "nodes": s.nodes,
        "nbd_server": s.nbd_server,
        "qga": s.qga,
    });
    match r.call("GET", &format!("/resources/{}", seg(&name)), None) {
        Ok(have) => {
            if have["sources"] != want["sources"] || have["vault"] != want["vault"] {
                bail!(
                    "the appliance already has a resource {name:?} with sources {} in vault {}; \
                     back it up under another --id, or change the resource (PATCH /resources/{name})",
                    have["sources"],
                    have["vault"]
                );
            }
        }
        Err(e) if e.downcast_ref::<Refused>().is_some_and(|r| r.status == 404) => {
            let mut body = want.clone();
            if s.nodes.is_empty() {
                body.as_object_mut().map(|o| o.remove("nodes"));
            }
            if s.nbd_server.is_none() {
                body.as_object_mut().map(|o| o.remove("nbd_server"));
            }
            if s.qga.is_none() {
                body.as_object_mut().map(|o| o.remove("qga"));
            }
            r.call("POST", "/resources", Some(&body)).with_context(|| {
                format!(
                    "the appliance has no resource {name:?} yet; creating it needs an admin token"
                )
            })?;
        }
        Err(e) => return Err(e),
    }
    let task = r.call(
        "POST",
        "/backups",
        Some(&json!({"resource": name, "name": a.name})),
    )?;
    let id = task["task"]
        .as_str()
        .context("the appliance sent no task id")?;
    let result = r.wait_task(cli, id)?;
    let backup = result["backup"]
        .as_str()
        .context("the task named no backup")?;
    let mut b = r.call("GET", &format!("/backups/{}", seg(backup)), None)?;
    // `backup` shows the backup as `backups list` does, here as locally.
    if let Some(o) = b.as_object_mut() {
        for k in [
            "bytes_freed_if_deleted",
            "bytes_freed_computed_at",
            "bytes_freed_stale",
            "locked_until",
            "lock_reason",
            "lock_error",
        ] {
            o.remove(k);
        }
    }
    print_backup(cli, &b)?;
    Ok(0)
}
