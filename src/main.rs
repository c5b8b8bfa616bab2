//! The `blockvault` command line: parses arguments, sets up logging, runs the command
//! (in-process on the data dir, or against an appliance with `--server`) and turns the
//! outcome into an exit status. `anyhow` lives only here and in `cli/`.
//!
//! Every line printed goes through `outln!` (a closed pipe ends the process quietly);
//! every failure goes through [`cli::exit`] (exit code by error kind, JSON under `--json`).

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches};

/// `println!` that survives a closed pipe: see [`cli::output::write_out`].
macro_rules! outln {
    () => {
        $crate::cli::output::write_out(format_args!(""))
    };
    ($($t:tt)*) => {
        $crate::cli::output::write_out(format_args!($($t)*))
    };
}

mod cli;

use cli::args::{Cli, Cmd};
use cli::exit;

fn main() {
    // Everything the appliance writes (catalog, tokens, vault files, restored images,
    // logs) is its owner's alone: disk images and their backups hold the guests' secrets.
    // Restores set their images' mode explicitly (`--mode`).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let json = wants_json();
    // --help names the data dir this user gets by default, not only the rule.
    let default_data = blockvault::config::default_data_dir();
    let cmd = Cli::command().mut_arg("data_arg", |a| {
        a.help(format!(
            "Data directory: catalog and default vault location [default here: {}]",
            default_data.display()
        ))
    });
    let parsed = cmd
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let mut cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind as K;
            if matches!(e.kind(), K::DisplayHelp | K::DisplayVersion)
                || (e.kind() == K::DisplayHelpOnMissingArgumentOrSubcommand && !json)
            {
                let _ = e.print();
                std::process::exit(if e.kind() == K::DisplayHelpOnMissingArgumentOrSubcommand {
                    exit::USAGE.code
                } else {
                    0
                });
            }
            if json {
                // The message without clap's usage and help hints, on one line.
                let full = e.to_string();
                let text = full.split("\n\nUsage:").next().unwrap_or_default();
                let msg = text
                    .trim_start_matches("error: ")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                exit::fail(exit::USAGE, &msg, true);
            }
            let _ = e.print();
            std::process::exit(exit::USAGE.code);
        }
    };
    resolve_data_dir(&mut cli);
    let serve_config = match &cli.cmd {
        Cmd::Serve {
            config: Some(p), ..
        } => match blockvault::config::Config::load(p) {
            Ok(c) => Some(c),
            Err(e) => exit::fail(exit::USAGE, &e, cli.json),
        },
        _ => None,
    };
    init_logging(&cli, serve_config.as_ref());
    tracing::debug!("data dir {} (from {})", cli.data.display(), cli.data_origin);
    match cli::local::run(&cli, serve_config) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let class = exit::classify(&e);
            exit::fail(class, &exit::message(&e), cli.json)
        }
    }
}

/// `--json` among the arguments, before any `--`: errors of argument parsing itself
/// are JSON too then.
fn wants_json() -> bool {
    std::env::args()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// `--data`, else `$BLOCKVAULT_DATA`, else the default; made absolute.
fn resolve_data_dir(cli: &mut Cli) {
    let given = std::env::args().any(|a| a == "--data" || a.starts_with("--data="));
    let (dir, origin) = match cli.data_arg.clone() {
        Some(d) if given => (d, "--data"),
        Some(d) => (d, "BLOCKVAULT_DATA"),
        None => (blockvault::config::default_data_dir(), "default"),
    };
    cli.data = std::path::absolute(&dir).unwrap_or(dir);
    cli.data_origin = origin;
}

/// Logs on stderr. Level: `RUST_LOG`, else `BLOCKVAULT_LOG`, else the config file's
/// `log_level` (serve), else warn. Colours only when stderr is a terminal; JSON lines
/// with `--log-json` or `log_format = "json"`.
fn init_logging(cli: &Cli, config: Option<&blockvault::config::Config>) {
    use tracing_subscriber::EnvFilter;
    let from_env = ["RUST_LOG", "BLOCKVAULT_LOG"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()));
    let level = from_env
        .or_else(|| config.map(|c| c.log_level.clone()))
        .unwrap_or_else(|| {
            if matches!(cli.cmd, Cmd::Serve { .. }) {
                "info".into()
            } else {
                "warn".into()
            }
        });
    let mut filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("warn"));
    // fatfs warns about every volume mkfs.vfat makes (reserved sectors ≠ 1): noise for
    // a reader; its errors still show.
    if !level.contains("fatfs")
        && let Ok(d) = "fatfs=error".parse()
    {
        filter = filter.add_directive(d);
    }
    let json = cli.log_json || config.is_some_and(|c| c.log_format == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `blockvault completions SHELL`.
pub fn completions(shell: clap_complete::Shell) {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "blockvault", &mut buf);
    outln!("{}", String::from_utf8_lossy(&buf).trim_end());
}

/// `blockvault man [--dir DIR]`.
pub fn man(dir: Option<&PathBuf>) -> anyhow::Result<()> {
    use anyhow::Context;
    let cmd = Cli::command();
    match dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            clap_mangen::generate_to(cmd, d)
                .with_context(|| format!("writing man pages into {}", d.display()))?;
        }
        None => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut buf)
                .context("rendering the man page")?;
            outln!("{}", String::from_utf8_lossy(&buf).trim_end());
        }
    }
    Ok(())
}
