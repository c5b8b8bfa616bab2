//! `blockvault tasks`: the appliance's tasks. Listing and showing read the catalog of
//! the data dir (what the appliance last recorded) or, with `--server`, the live view
//! with progress; cancelling needs the running appliance.

use anyhow::Result;
use serde_json::Value;

use super::args::{Cli, TasksCmd};
use super::client::{Remote, seg};
use super::output::{human, table};
use blockvault::task::TaskInfo;

pub fn run(cli: &Cli, remote: Option<&Remote>, cmd: &TasksCmd) -> Result<i32> {
    let v: Value = match (cmd, remote) {
        (TasksCmd::List { state }, Some(r)) => {
            let q = state
                .as_deref()
                .map(|s| format!("?state={}", seg(s)))
                .unwrap_or_default();
            r.call("GET", &format!("/tasks{q}"), None)?
        }
        (TasksCmd::List { state }, None) => {
            let app = super::open_app(cli)?;
            serde_json::to_value(app.catalog().tasks::<TaskInfo>(state.as_deref())?)?
        }
        (TasksCmd::Show { id }, Some(r)) => r.call("GET", &format!("/tasks/{}", seg(id)), None)?,
        (TasksCmd::Show { id }, None) => {
            serde_json::to_value(super::open_app(cli)?.catalog().task::<TaskInfo>(id)?)?
        }
        (TasksCmd::Cancel { id }, Some(r)) => {
            r.call("POST", &format!("/tasks/{}/cancel", seg(id)), None)?
        }
        (TasksCmd::Cancel { .. }, None) => {
            return Err(super::exit::usage(
                "cancelling a task needs the running appliance: add --server URL --token T",
            ));
        }
    };
    if cli.json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        // A listing is the output asked for: --quiet does not hide it.
        match cmd {
            TasksCmd::List { .. } => {
                let rows: Vec<Vec<String>> = v.as_array().into_iter().flatten().map(row).collect();
                outln!("{}", table(&TASK_HEADERS, &rows));
            }
            _ => {
                outln!("{}", summary(&v));
                if let Some(e) = v["error"].as_str() {
                    outln!("  error: {e}");
                }
                for l in v["log"].as_array().into_iter().flatten() {
                    outln!("  {}", l.as_str().unwrap_or(""));
                }
            }
        }
    }
    Ok(0)
}

/// Columns of the task listing.
const TASK_HEADERS: [&str; 7] = ["ID", "KIND", "STATE", ">PROGRESS", ">DONE", "TARGET", "BY"];

/// One row: id, kind, state, progress, bytes done, target, who.
fn row(t: &Value) -> Vec<String> {
    let s = |k: &str| t[k].as_str().unwrap_or("").to_string();
    vec![
        s("id"),
        s("kind"),
        s("state"),
        format!("{:.1}%", t["progress_percent"].as_f64().unwrap_or(0.0)),
        human(t["bytes_done"].as_u64().unwrap_or(0)),
        s("target"),
        s("by"),
    ]
}

/// One line: id, kind, state, progress, target, who.
fn summary(t: &Value) -> String {
    let s = |k: &str| t[k].as_str().unwrap_or("").to_string();
    format!(
        "{:<26} {:<8} {:<10} {:>5.1}% {:>10}  {} (by {})",
        s("id"),
        s("kind"),
        s("state"),
        t["progress_percent"].as_f64().unwrap_or(0.0),
        human(t["bytes_done"].as_u64().unwrap_or(0)),
        s("target"),
        s("by"),
    )
}
