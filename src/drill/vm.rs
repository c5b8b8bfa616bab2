//! The throwaway VM of a drill: overlays, QEMU's command line, the wait for the signal,
//! the screenshot, and killing QEMU whatever happens (a guard reaps it on drop).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::check::Probe;
use super::serve::Served;
use super::{Accel, DrillOptions};
use crate::error::{Error, Result};
use crate::manifest::BackupManifest;

/// How often the drill looks at the console, the firmware log and QEMU.
const POLL: Duration = Duration::from_millis(200);
/// What SeaBIOS prints when no disk boots (then it waits 60 s and reboots).
const NO_BOOT: &str = "No bootable device";
/// util-linux's setpriv, to tie QEMU's life to ours.
const SETPRIV: &str = "/usr/bin/setpriv";
/// SATA ports of q35's AHCI controller.
const AHCI_PORTS: usize = 6;

/// Disk buses a drill can attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bus {
    Sata,
    Virtio,
    Scsi,
    Nvme,
}

impl Bus {
    fn parse(s: &str) -> Option<Bus> {
        Some(match s {
            // q35's IDE is AHCI: an "ide" guest gets the same controller mode SeaBIOS
            // and every OS of the last 15 years drive.
            "sata" | "ide" => Bus::Sata,
            "virtio" | "virtio-blk" => Bus::Virtio,
            "scsi" | "virtio-scsi" => Bus::Scsi,
            "nvme" => Bus::Nvme,
            _ => return None,
        })
    }
}

/// Refuse options that cannot work, before anything starts.
pub(super) fn check_options(opts: &DrillOptions) -> Result<()> {
    if let Some(b) = &opts.bus
        && Bus::parse(b).is_none()
    {
        return Err(Error::config(format!(
            "disk bus {b:?}: expected sata, virtio, ide, scsi or nvme"
        )));
    }
    if opts.timeout.is_zero() {
        return Err(Error::config("the drill's timeout must be more than 0 s"));
    }
    Ok(())
}

/// Everything QEMU is started with, except the accelerator.
pub(super) struct Plan {
    disks: Vec<(Served, Bus)>,
    memory_mib: u64,
    run: PathBuf,
    dir: PathBuf,
    /// Host port forwarded to the guest's port for `port:N`.
    host_port: u16,
}

impl Plan {
    pub(super) fn new(
        m: &BackupManifest,
        opts: &DrillOptions,
        served: &[Served],
        run: &Path,
        dir: &Path,
    ) -> Result<Plan> {
        let hw = m.capture.as_ref().and_then(|c| c.hardware.as_ref());
        let forced = match &opts.bus {
            Some(b) => Some(Bus::parse(b).ok_or_else(|| {
                Error::config(format!(
                    "disk bus {b:?}: expected sata, virtio, ide, scsi or nvme"
                ))
            })?),
            None => None,
        };
        let disks: Vec<(Served, Bus)> = served
            .iter()
            .map(|s| {
                let recorded = hw
                    .and_then(|h| h.disks.iter().find(|d| d.name == s.name))
                    .and_then(|d| Bus::parse(&d.bus));
                (s.clone(), forced.or(recorded).unwrap_or(Bus::Sata))
            })
            .collect();
        if disks.iter().filter(|(_, b)| *b == Bus::Sata).count() > AHCI_PORTS {
            return Err(Error::unsupported(format!(
                "backup {} has more than {AHCI_PORTS} SATA disks: drill it with --bus virtio",
                m.name
            )));
        }
        let memory_mib = opts
            .memory_mib
            .or_else(|| hw.and_then(|h| h.memory_bytes).map(|b| (b >> 20).max(64)))
            .unwrap_or(1024);
        let host_port = match opts.check {
            super::Check::Port(_) => free_port()?,
            _ => 0,
        };
        Ok(Plan {
            disks,
            memory_mib,
            run: run.to_path_buf(),
            dir: dir.to_path_buf(),
            host_port,
        })
    }

    fn overlay(&self, i: usize) -> PathBuf {
        self.run.join(format!("overlay{i}.qcow2"))
    }

    /// (Re)create every overlay: qcow2 on top of the disk's NBD export. `-u`: the size is
    /// given, the backing file is not opened here.
    fn make_overlays(&self) -> Result<()> {
        for (i, (s, _)) in self.disks.iter().enumerate() {
            let o = self.overlay(i);
            let _ = std::fs::remove_file(&o);
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b"])
                .arg(&s.uri)
                .arg(&o)
                .arg(s.size.to_string())
                .stdin(Stdio::null())
                .output()
                .map_err(|e| Error::io("running qemu-img (install qemu-utils)", e))?;
            if !out.status.success() {
                return Err(Error::io(
                    format!(
                        "qemu-img create {}: {}",
                        o.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                    std::io::Error::other("qemu-img failed"),
                ));
            }
        }
        Ok(())
    }

    fn args(&self, accel: Accel, opts: &DrillOptions) -> Vec<String> {
        let check = &opts.check;
        let (accel, cpu) = match accel {
            Accel::Kvm => ("kvm", "host"),
            _ => ("tcg", "max"),
        };
        let cpu = opts.cpu.as_deref().unwrap_or(cpu);
        let mut a: Vec<String> = vec![
            "-name".into(),
            "blockvault-drill".into(),
            "-machine".into(),
            format!("q35,accel={accel}"),
            "-cpu".into(),
            cpu.into(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-vga".into(),
            "std".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-sandbox".into(),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                opt(&self.run.join("qmp.sock"))
            ),
            "-chardev".into(),
            format!("file,id=con,path={}", opt(&self.dir.join("console.log"))),
            "-serial".into(),
            "chardev:con".into(),
            "-chardev".into(),
            format!("file,id=fw,path={}", opt(&self.dir.join("firmware.log"))),
            "-device".into(),
            "isa-debugcon,iobase=0x402,chardev=fw".into(),
        ];
        match check {
            super::Check::Port(p) => a.extend([
                "-nic".into(),
                format!(
                    "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{}-:{p}",
                    self.host_port
                ),
            ]),
            _ => a.extend(["-nic".into(), "none".into()]),
        }
        if *check == super::Check::Agent {
            a.extend([
                "-device".into(),
                "virtio-serial-pci,id=vser".into(),
                "-chardev".into(),
                format!(
                    "socket,id=qga0,path={},server=on,wait=off",
                    opt(&self.run.join("qga.sock"))
                ),
                "-device".into(),
                "virtserialport,bus=vser.0,chardev=qga0,name=org.qemu.guest_agent.0".into(),
            ]);
        }
        if self.disks.iter().any(|(_, b)| *b == Bus::Scsi) {
            a.extend(["-device".into(), "virtio-scsi-pci,id=scsi0".into()]);
        }
        let mut sata = 0;
        for (i, (_, bus)) in self.disks.iter().enumerate() {
            a.extend([
                "-drive".into(),
                format!(
                    "file={},format=qcow2,if=none,id=d{i},cache=unsafe",
                    opt(&self.overlay(i))
                ),
                "-device".into(),
            ]);
            a.push(match bus {
                Bus::Sata => {
                    sata += 1;
                    format!("ide-hd,drive=d{i},bus=ide.{},bootindex={i}", sata - 1)
                }
                Bus::Virtio => format!("virtio-blk-pci,drive=d{i},bootindex={i}"),
                Bus::Scsi => format!("scsi-hd,drive=d{i},bus=scsi0.0,bootindex={i}"),
                Bus::Nvme => format!("nvme,drive=d{i},serial=bvdrill{i},bootindex={i}"),
            });
        }
        a
    }
}

/// A QEMU option value: commas doubled.
fn opt(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// A free loopback TCP port for the forward (free now; QEMU binds it right after).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::io("finding a free port for the drill's forward", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("finding a free port for the drill's forward", e))
}

/// Whether `/dev/kvm` can be opened for the VM.
fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// How the VM ended.
pub(super) struct Outcome {
    pub ok: bool,
    pub seconds: f64,
    pub accel: &'static str,
    pub reason: Option<String>,
    pub note: Option<String>,
    pub screenshot: Option<PathBuf>,
}

/// QEMU, killed and reaped on drop.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

enum Attempt {
    Done(Outcome),
    /// QEMU exited under KVM before the signal, blaming KVM: worth a TCG run.
    KvmFailed(String),
}

/// Boot the plan's VM and wait for the check.
pub(super) fn boot(
    plan: &Plan,
    opts: &DrillOptions,
    cancel: &AtomicBool,
    progress: &dyn Fn(&str),
) -> Result<Outcome> {
    let accel = match opts.accel {
        Accel::Kvm if !kvm_usable() => {
            return Err(Error::unsupported(
                "KVM asked for, but /dev/kvm cannot be opened read-write: drill with \
                 --accel tcg or auto",
            ));
        }
        Accel::Auto if kvm_usable() => Accel::Kvm,
        Accel::Auto => Accel::Tcg,
        a => a,
    };
    match attempt(plan, opts, accel, cancel, progress)? {
        Attempt::Done(o) => Ok(o),
        Attempt::KvmFailed(why) if opts.accel == Accel::Auto => {
            progress(&format!(
                "the guest failed under KVM ({why}); booting it again under TCG"
            ));
            match attempt(plan, opts, Accel::Tcg, cancel, progress)? {
                Attempt::Done(mut o) => {
                    o.note = Some(format!("KVM failed the guest ({why}); ran under TCG"));
                    Ok(o)
                }
                Attempt::KvmFailed(w) => Err(Error::io(
                    format!("QEMU failed under TCG too: {w}"),
                    std::io::Error::other("qemu"),
                )),
            }
        }
        Attempt::KvmFailed(why) => Ok(Outcome {
            ok: false,
            seconds: 0.0,
            accel: "kvm",
            reason: Some(format!("QEMU exited under KVM: {why}")),
            note: None,
            screenshot: None,
        }),
    }
}

fn attempt(
    plan: &Plan,
    opts: &DrillOptions,
    accel: Accel,
    cancel: &AtomicBool,
    progress: &dyn Fn(&str),
) -> Result<Attempt> {
    let accel_name = if accel == Accel::Kvm { "kvm" } else { "tcg" };
    plan.make_overlays()?;
    for f in ["console.log", "firmware.log"] {
        let _ = std::fs::remove_file(plan.dir.join(f));
    }
    let qemu_log = plan.dir.join("qemu.log");
    let stderr = std::fs::File::create(&qemu_log)
        .map_err(|e| Error::io(format!("creating {}", qemu_log.display()), e))?;
    progress(&format!(
        "booting {} disk(s) under {accel_name}, waiting up to {:.0} s for {}",
        plan.disks.len(),
        opts.timeout.as_secs_f64(),
        opts.check
    ));
    let start = Instant::now();
    // setpriv(1) --pdeathsig: QEMU is killed with us even if we die without unwinding
    // (SIGKILL, abort), so no drill VM outlives the process that watches it.
    let mut cmd = if Path::new(SETPRIV).exists() {
        let mut c = Command::new(SETPRIV);
        c.args(["--pdeathsig", "KILL", "qemu-system-x86_64"]);
        c
    } else {
        Command::new("qemu-system-x86_64")
    };
    let child = cmd
        .args(plan.args(accel, opts))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| Error::io("starting qemu-system-x86_64 (install qemu-system-x86)", e))?;
    let mut qemu = Qemu(child);
    let mut probe = Probe::new(
        &opts.check,
        &plan.dir.join("console.log"),
        &plan.run.join("qga.sock"),
        &plan.run.join("qmp.sock"),
        plan.host_port,
    )?;
    let deadline = start + opts.timeout;
    let done = |ok: bool, reason: Option<String>, qemu: Option<Qemu>| {
        let seconds = start.elapsed().as_secs_f64();
        let screenshot = qemu.as_ref().and_then(|_| screendump(plan));
        drop(qemu);
        Attempt::Done(Outcome {
            ok,
            seconds,
            accel: accel_name,
            reason,
            note: None,
            screenshot,
        })
    };
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::cancelled("drill cancelled; the VM was stopped"));
        }
        if probe.passed(cancel) {
            let alive = matches!(qemu.0.try_wait(), Ok(None));
            return Ok(done(true, None, alive.then_some(qemu)));
        }
        if let Ok(Some(status)) = qemu.0.try_wait() {
            let log = super::tail(&qemu_log, 1024);
            let log = log.trim();
            if accel == Accel::Kvm && {
                let l = log.to_ascii_lowercase();
                l.contains("kvm") || l.contains("msr")
            } {
                let first = log.lines().next().unwrap_or("");
                return Ok(Attempt::KvmFailed(format!("{status}: {first}")));
            }
            let why = if log.is_empty() {
                format!(
                    "QEMU exited ({status}) before the check passed (the guest shut down or rebooted)"
                )
            } else {
                format!("QEMU exited ({status}) before the check passed: {log}")
            };
            return Ok(done(false, Some(why), None));
        }
        let fw = std::fs::read(plan.dir.join("firmware.log")).unwrap_or_default();
        if String::from_utf8_lossy(&fw).contains(NO_BOOT) {
            return Ok(done(
                false,
                Some(
                    "the firmware found no bootable disk (SeaBIOS: \"No bootable device\")".into(),
                ),
                Some(qemu),
            ));
        }
        if Instant::now() >= deadline {
            return Ok(done(
                false,
                Some(format!(
                    "no {} within {:.0} s",
                    opts.check,
                    opts.timeout.as_secs_f64()
                )),
                Some(qemu),
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// The VGA screen: PNG when QEMU can write it, else PPM. `None` when QEMU cannot be
/// asked (logged).
fn screendump(plan: &Plan) -> Option<PathBuf> {
    let r = (|| -> Result<PathBuf> {
        let mut q = crate::qmp::Qmp::connect(&plan.run.join("qmp.sock"), Duration::from_secs(10))?;
        let png = plan.dir.join("screenshot.png");
        match q.execute_value(
            "screendump",
            json!({"filename": png.display().to_string(), "format": "png"}),
        ) {
            Ok(_) => Ok(png),
            Err(_) => {
                let ppm = plan.dir.join("screenshot.ppm");
                q.execute_value("screendump", json!({"filename": ppm.display().to_string()}))?;
                Ok(ppm)
            }
        }
    })();
    match r {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!("drill: no screenshot: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_values_double_commas() {
        assert_eq!(opt(Path::new("/a,b/c")), "/a,,b/c");
    }

    #[test]
    fn buses_map_to_what_qemu_attaches() {
        assert_eq!(Bus::parse("ide"), Some(Bus::Sata));
        assert_eq!(Bus::parse("virtio"), Some(Bus::Virtio));
        assert_eq!(Bus::parse("usb"), None);
    }
}
