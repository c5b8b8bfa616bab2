//! `blockvault drill`: a recovery drill in-process on the data dir, or as a task on the
//! appliance with `--server`.

use anyhow::{Context, Result};
use serde_json::Value;

use super::args::{Cli, DrillArgs};
use super::client::{Remote, seg};
use super::output::*;

/// Run the drill here; exit status 1 when the guest did not pass.
pub fn run(cli: &Cli, a: &DrillArgs) -> Result<i32> {
    let opts = a.options()?;
    let app = super::open_app(cli)?;
    let stop = super::cancel_on_signals()?;
    let spin = spinner(cli, "drill: starting");
    let progress = |m: &str| {
        spin.set_message(format!("drill: {m}"));
        tracing::info!("drill: {m}");
    };
    let r = app.drill(&a.backup, a.disk.as_deref(), &opts, &stop, &progress);
    spin.finish_and_clear();
    let r = r?;
    let v = serde_json::to_value(&r)?;
    show(cli, &v)?;
    Ok(if r.ok { 0 } else { 1 })
}

/// Run the drill as a task on the appliance.
pub fn remote(cli: &Cli, r: &Remote, a: &DrillArgs) -> Result<i32> {
    let opts = a.options()?;
    let query = match &a.disk {
        Some(d) if a.backup == "latest" => format!("?disk={}", seg(d)),
        _ => String::new(),
    };
    let task = r.call(
        "POST",
        &format!("/backups/{}/drill{query}", seg(&a.backup)),
        Some(&serde_json::to_value(blockvault::service::DrillRequest {
            check: Some(opts.check.to_string()),
            timeout_seconds: Some(opts.timeout.as_secs_f64()),
            accel: Some(opts.accel),
            memory_mib: opts.memory_mib,
            bus: opts.bus.clone(),
            cpu: opts.cpu.clone(),
        })?),
    )?;
    let id = task["task"]
        .as_str()
        .context("the appliance sent no task id")?;
    // A guest that does not pass fails the task: wait_task then fails, exit 1.
    let v = r.wait_task(cli, id)?;
    show(cli, &v)?;
    Ok(0)
}

fn show(cli: &Cli, v: &Value) -> Result<()> {
    if cli.json {
        outln!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let ok = v["ok"].as_bool().unwrap_or(false);
    outln!(
        "drill of backup {}: {} ({}) after {:.1} s under {}",
        v["backup"].as_str().unwrap_or("?"),
        if ok { "booted" } else { "FAILED" },
        v["check"].as_str().unwrap_or("?"),
        v["seconds"].as_f64().unwrap_or(0.0),
        v["accel"].as_str().unwrap_or("?"),
    );
    for k in ["reason", "note"] {
        if let Some(r) = v[k].as_str() {
            outln!("  {r}");
        }
    }
    match v["screenshot"].as_str() {
        Some(s) => outln!("  screenshot: {s}"),
        None => outln!("  no screenshot (QEMU had already exited)"),
    }
    outln!("  logs: {}", v["dir"].as_str().unwrap_or("?"));
    if !ok {
        let tail = v["console_tail"].as_str().unwrap_or("");
        let fw = v["firmware_tail"].as_str().unwrap_or("");
        if !tail.trim().is_empty() {
            outln!("  console (last lines):\n{tail}");
        } else if !fw.trim().is_empty() {
            let lines: Vec<&str> = fw.lines().collect();
            let last = lines[lines.len().saturating_sub(8)..].join("\n");
            outln!("  serial console empty; firmware log (last lines):\n{last}");
        }
    }
    Ok(())
}
