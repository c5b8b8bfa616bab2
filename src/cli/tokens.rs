//! `token create|list|delete` in local mode.

use anyhow::Result;

use super::args::*;
use super::output::*;

pub fn run(cli: &Cli, cmd: &TokenCmd) -> Result<i32> {
    match *cmd {
        TokenCmd::Create { ref role, ref name } => {
            let role: blockvault::catalog::Role = role.parse()?;
            let name = name.clone().unwrap_or_else(|| {
                format!(
                    "{}-{}",
                    role.as_str(),
                    &blockvault::manifest::new_backup_id()[16..]
                )
            });
            let app = super::open_app(cli)?;
            let (info, secret) = app.catalog().create_token(&name, role)?;
            if !cli.quiet {
                outln!(
                    "token {} ({}) created; the secret is shown only now:",
                    info.name,
                    info.role.as_str()
                );
            }
            outln!("{secret}");
        }
        TokenCmd::List => {
            let app = super::open_app(cli)?;
            let list = app.catalog().tokens()?;
            if cli.json {
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.role.as_str().to_string(),
                            t.created.clone(),
                        ]
                    })
                    .collect();
                outln!("{}", table(&["NAME", "ROLE", "CREATED"], &rows));
            }
        }
        TokenCmd::Delete { ref name } => {
            if !super::open_app(cli)?.catalog().delete_token(name)? {
                return Err(
                    blockvault::Error::not_found(format!("no token named {name:?}")).into(),
                );
            }
        }
    }
    Ok(0)
}
