//! The commands run in-process on the data dir (and the dispatch to remote mode with
//! `--server`): vaults, backups, restores, serving, tokens, tasks, gc, verify, benchmarks.

use anyhow::Result;
use serde_json::json;

use super::args::*;
use super::exit::usage;
use super::output::*;
use blockvault::app::App;
use blockvault::chunk::ChunkSize;
use blockvault::config::Config;

pub fn run(cli: &Cli, serve_config: Option<Config>) -> Result<i32> {
    match &cli.cmd {
        Cmd::Completions { shell } => {
            crate::completions(*shell);
            return Ok(0);
        }
        Cmd::Man { dir } => {
            crate::man(dir.as_ref())?;
            return Ok(0);
        }
        _ => {}
    }
    if let Some(url) = &cli.server {
        return super::remote::run(cli, url);
    }
    match cli.cmd {
        Cmd::Vault(VaultCmd::Create {
            ref name,
            ref path,
            ref chunk_size,
            zstd_level,
            compliance_days,
            encrypt,
            ref replica_of,
            ref s3,
        }) => {
            if let Some(src) = replica_of {
                if s3.s3_config.is_some() {
                    return Err(usage(
                        "vault create --replica-of does not take --s3-config yet: give the S3 key in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
                    ));
                }
                let app = super::open_app(cli)?;
                let v =
                    app.create_replica_vault(name, path.as_deref(), s3.location()?.as_ref(), src)?;
                print_created(cli, &app, &v, &format!(" as a replica of {src}"))?;
                return Ok(0);
            }
            let app = App::open(&cli.data)?;
            let secret = match (encrypt, &cli.keyfile, &cli.passphrase_env) {
                (false, None, None) => None,
                (false, _, _) => {
                    return Err(usage(
                        "--keyfile / --passphrase-env with `vault create` need --encrypt",
                    ));
                }
                (true, None, None) => {
                    return Err(usage(
                        "vault create --encrypt needs --keyfile PATH (a new key file is written there if it does not exist) or --passphrase-env VAR",
                    ));
                }
                (true, Some(kf), _) if !kf.exists() => {
                    blockvault::app::new_keyfile(kf)?;
                    super::key_secret(cli)?
                }
                (true, _, _) => super::key_secret(cli)?,
            };
            let chunk_size = ChunkSize::parse(chunk_size)?;
            let v = match s3.location()? {
                Some(loc) => app.create_vault_s3_named(
                    name,
                    &loc,
                    s3.profile().as_ref(),
                    chunk_size,
                    zstd_level,
                    compliance_days,
                    secret
                        .as_ref()
                        .map(|s| (s, blockvault::chunk::VaultKey::generate())),
                )?,
                None => app.create_vault_with(
                    name,
                    path.as_deref(),
                    chunk_size,
                    zstd_level,
                    compliance_days,
                    secret.as_ref(),
                )?,
            };
            print_created(cli, &app, &v, "")?;
        }
        Cmd::Vault(VaultCmd::List) => {
            let app = super::open_app(cli)?;
            let mut infos = Vec::new();
            for v in app.catalog().vaults()? {
                infos.push(serde_json::to_value(app.vault_info(&v.name)?)?);
            }
            let v = serde_json::Value::Array(infos);
            if cli.json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                outln!("{}", vault_table(&v));
                outln!(
                    "(data dir {}, from {})",
                    cli.data.display(),
                    cli.data_origin
                );
            }
        }
        Cmd::Vault(VaultCmd::Info { ref name }) => {
            let info = super::open_app(cli)?.vault_info(name)?;
            if cli.json {
                outln!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                outln!("vault       {} ({})", info.name, info.path);
                outln!(
                    "data dir    {} (from {})",
                    cli.data.display(),
                    cli.data_origin
                );
                outln!(
                    "chunk size  {} KiB, zstd level {}",
                    info.chunk_size / 1024,
                    info.zstd_level
                );
                outln!("backups     {}", info.backups);
                outln!("logical     {}", human(info.logical_bytes));
                outln!(
                    "stored      {} in {} packs ({} on disk)",
                    human(info.stored_bytes),
                    info.packs,
                    human(info.pack_bytes)
                );
                outln!("dedup ratio {:.2}", info.dedup_ratio);
                if let Some(d) = info.compliance_days {
                    outln!("compliance  every backup locked {d} days");
                }
                if info.encrypted {
                    outln!(
                        "encryption  AES-256-GCM, keyed blake3 digests; {} key wrapping(s); {}",
                        info.key_wrappings,
                        if info.key_stored {
                            "key kept in this appliance's key store (scheduled backups run unattended)"
                        } else {
                            "key not stored on this appliance (scheduled backups need [keys] in the config or `vault key store`)"
                        }
                    );
                } else {
                    outln!("encryption  none");
                }
            }
        }
        Cmd::Vault(VaultCmd::Key(ref k)) => return vault_key(cli, k),
        Cmd::Vault(VaultCmd::Rescan { ref name }) => {
            let n = super::open_app(cli)?.rescan(name)?;
            if cli.json {
                outln!("{}", json!({"vault": name, "backups": n}));
            } else if !cli.quiet {
                outln!("vault {name}: {n} backups in the catalog");
            }
        }
        Cmd::Vault(VaultCmd::Attach {
            ref name,
            ref path,
            ref s3,
        }) => {
            let mut app = super::open_app(cli)?;
            let (n, at) = match (s3.location()?, path) {
                (Some(loc), _) => (
                    app.attach_vault_s3_named(name, &loc, s3.profile().as_ref())?,
                    loc.url(),
                ),
                (None, Some(path)) => (app.attach_vault(name, path)?, path.display().to_string()),
                (None, None) => anyhow::bail!("vault attach needs a PATH or --s3"),
            };
            if cli.json {
                outln!("{}", json!({"vault": name, "backups": n}));
            } else if !cli.quiet {
                outln!("attached vault {name} at {at}: {n} backups");
            }
        }
        Cmd::Backup(ref a) => return super::backup::run(cli, a),
        Cmd::Bitmaps(ref b) => return super::bitmaps::run(cli, b),
        Cmd::Backups(ref b) => return super::backups::run(cli, b),
        Cmd::Restore(ref a) => return super::restore::run(cli, a),
        Cmd::Drill(ref a) => return super::drill::run(cli, a),
        Cmd::Files(ref a) => return super::files::run(cli, a),
        Cmd::ServeNbd {
            ref backup,
            ref disk,
            ref listen,
            ref tls_cert,
            ref tls_key,
            ref tls_ca,
        } => {
            let app = super::open_app(cli)?;
            let stop = super::cancel_on_signals()?;
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(blockvault::nbd::NbdTlsServer {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: tls_ca.clone(),
                }),
                _ => None,
            };
            // Bad certificate files fail here, before anything listens.
            if let Some(t) = &tls {
                t.config()?;
            }
            let listener = blockvault::nbd::server::Listener::bind(listen)?;
            let uri = listener.uri();
            match &tls {
                Some(_) => outln!("{}", uri.replacen("nbd", "nbds", 1)),
                None => outln!("{}", uri),
            }
            use std::io::Write;
            std::io::stdout().flush()?;
            app.serve_nbd(
                backup,
                disk.as_deref(),
                &listener,
                &stop,
                tls.as_ref(),
                None,
            )?;
        }
        Cmd::Serve {
            ref listen,
            ref config,
            ref tls_cert,
            ref tls_key,
            plain_http,
        } => {
            let mut c = serve_config.unwrap_or_default();
            if let Some(l) = listen {
                c.listen = l.parse().map_err(|_| usage("--listen must be HOST:PORT"))?;
            }
            if tls_cert.is_some() {
                c.tls_cert = tls_cert.as_deref().map(absolute_path);
                c.tls_key = tls_key.as_deref().map(absolute_path);
                c.plain_http = false;
            }
            if plain_http {
                c.plain_http = true;
                c.tls_cert = None;
                c.tls_key = None;
            }
            c.check_tls().map_err(usage)?;
            // --data (or BLOCKVAULT_DATA) wins over the config file when given.
            if config.is_none() || cli.data_origin != "default" {
                c.data = cli.data.clone();
            }
            tracing::info!("data dir {}", c.data.display());
            blockvault::api::run_appliance(c, |addr, fingerprint| {
                match fingerprint {
                    Some(f) => outln!(
                        "blockvault appliance listening on https://{addr} (certificate SHA-256 {f})"
                    ),
                    None => outln!("blockvault appliance listening on http://{addr}"),
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
            })?;
        }
        Cmd::Tls(TlsCmd::Fingerprint { ref cert }) => {
            let path = match cert {
                Some(p) => p.clone(),
                None => blockvault::tls::self_signed_paths(&cli.data).0,
            };
            if cert.is_none() && !path.exists() {
                return Err(blockvault::Error::not_found(format!(
                    "{} does not exist: `blockvault serve` makes it at its first start (or \
                     give --cert FILE, e.g. the [server] tls_cert of the appliance)",
                    path.display()
                ))
                .into());
            }
            let f = blockvault::tls::cert_fingerprint(&path)?;
            if cli.json {
                outln!(
                    "{}",
                    serde_json::json!({"sha256": f, "cert": path.display().to_string()})
                );
            } else {
                outln!("{f}");
            }
        }
        Cmd::Token(ref t) => return super::tokens::run(cli, t),
        Cmd::Tasks(ref t) => return super::tasks::run(cli, None, t),
        Cmd::Replicate { .. } => return super::replicate::local(cli).map(|()| 0),
        Cmd::Gc { .. } | Cmd::Verify { .. } => return super::maint::run(cli),
        Cmd::Completions { .. } | Cmd::Man { .. } => {}
        Cmd::Benchmark {
            zstd_level,
            seconds,
            image_gib,
        } => {
            if !(0.05..=60.0).contains(&seconds) {
                return Err(usage("--seconds must be between 0.05 and 60"));
            }
            let r = blockvault::benchmark::run(zstd_level, seconds, image_gib)?;
            if cli.json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                outln!(
                    "{:<28} {:>14} {:>14}  ({} threads)",
                    "",
                    "1 thread",
                    "all threads",
                    r.threads
                );
                for f in &r.figures {
                    outln!(
                        "{:<28} {:>14.0} {:>14.0}  {}",
                        f.name,
                        f.single,
                        f.all,
                        f.unit
                    );
                }
                if let Some(i) = &r.image {
                    outln!(
                        "full backup of {} disk with {} data: {:.2}s ({:.0} MB/s logical, {:.0} MB/s allocated), stored {}",
                        human(i.disk_bytes),
                        human(i.data_bytes),
                        i.backup_seconds,
                        i.backup_logical_mb_s,
                        i.backup_allocated_mb_s,
                        human(i.bytes_stored)
                    );
                    outln!(
                        "same full backup into an encrypted vault: {:.2}s ({:+.1} %)",
                        i.encrypted_backup_seconds,
                        i.encrypted_overhead_percent
                    );
                    outln!(
                        "restore: {:.2}s; peak RSS {:.0} MiB",
                        i.restore_seconds,
                        i.peak_rss_mib
                    );
                }
            }
        }
    }
    Ok(0)
}

/// `p` made absolute, so the appliance's paths do not depend on its working directory.
fn absolute_path(p: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `vault key …`.
fn vault_key(cli: &Cli, cmd: &KeyCmd) -> Result<i32> {
    use blockvault::vault::keys::KeySecret;
    match cmd {
        KeyCmd::List { name } => {
            let keys = App::open(&cli.data)?.vault_keys(name)?;
            if cli.json {
                outln!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                outln!(
                    "{:<10} {:<11} {:<26} {:<17} LABEL",
                    "ID",
                    "KIND",
                    "CREATED",
                    "FINGERPRINT"
                );
                for k in &keys {
                    outln!(
                        "{:<10} {:<11} {:<26} {:<17} {}",
                        k.id,
                        k.kind,
                        k.created,
                        k.fingerprint.as_deref().unwrap_or("-"),
                        k.label.as_deref().unwrap_or("")
                    );
                }
            }
        }
        KeyCmd::Add {
            name,
            new_keyfile,
            new_passphrase_env,
            label,
        } => {
            let app = super::open_app(cli)?;
            let secret = match (new_keyfile, new_passphrase_env) {
                (Some(p), _) => {
                    // Unlock first, so a wrong key writes no new key file.
                    app.open_vault(name)?;
                    if !p.exists() {
                        blockvault::app::new_keyfile(p)?;
                    }
                    KeySecret::from_keyfile(p)?
                }
                (None, Some(var)) => KeySecret::from_env(var)?,
                (None, None) => {
                    return Err(usage("give --new-keyfile PATH or --new-passphrase-env VAR"));
                }
            };
            let k = app.add_vault_key(name, &secret, label.as_deref())?;
            if cli.json {
                outln!("{}", serde_json::to_string_pretty(&k)?);
            } else if !cli.quiet {
                outln!("vault {name}: added {} key {}", k.kind, k.id);
            }
        }
        KeyCmd::Remove { name, id } => {
            let k = super::open_app(cli)?.remove_vault_key(name, id)?;
            if cli.json {
                outln!("{}", serde_json::to_string_pretty(&k)?);
            } else if !cli.quiet {
                outln!("vault {name}: removed {} key {}", k.kind, k.id);
            }
        }
        KeyCmd::Export { name, .. } => {
            let paper = super::open_app(cli)?.paper_key(name)?;
            if cli.json {
                outln!("{}", json!({"vault": name, "paper": paper.as_str()}));
            } else {
                outln!("{}", paper.trim_end());
            }
        }
        KeyCmd::Store { name } => {
            let path = super::open_app(cli)?.store_vault_key(name)?;
            if cli.json {
                outln!("{}", json!({"vault": name, "stored": path}));
            } else if !cli.quiet {
                outln!("vault {name}: key kept in {} (root-only)", path.display());
            }
        }
    }
    Ok(0)
}

/// Say that vault `v` was created (`how`: e.g. " as a replica of SRC").
fn print_created(
    cli: &Cli,
    app: &App,
    v: &blockvault::catalog::VaultEntry,
    how: &str,
) -> Result<()> {
    if cli.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&app.vault_info(&v.name)?)?
        );
    } else if !cli.quiet {
        outln!(
            "created vault {} at {}{how} (chunk size {} KiB)",
            v.name,
            v.path.display(),
            v.chunk_size / 1024
        );
    }
    Ok(())
}
