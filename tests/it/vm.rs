//! A real qemu-system-x86_64 VM for the live-capture tests, started the way libvirt
//! starts one: `-blockdev` qcow2 nodes (`libvirt-N-format`) under `-device
//! virtio-blk-pci,id=vdiskN`. It has no OS and stays paused (`-S`): the block layer works
//! all the same, and the test writes into the disks through the devices' own block
//! backends (HMP `qemu-io -d`), as the guest would.
//!
//! /dev/kvm may hang a guest on these machines: KVM is used only when a probe VM answers
//! `query-kvm` with KVM enabled within a few seconds, TCG otherwise.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use blockvault::qmp::Qmp;
use serde_json::{Value, json};

pub struct Vm {
    child: Child,
    /// The monitor blockvault uses.
    pub qmp: PathBuf,
    /// The monitor the test uses.
    test_qmp: PathBuf,
}

/// A disk of the VM: the qcow2 image and the bus it is attached to.
pub struct VmDisk<'a> {
    pub image: &'a Path,
    /// "virtio" (virtio-blk-pci), "scsi" (scsi-hd on a virtio-scsi controller), "ide".
    pub bus: &'a str,
}

/// With `uefi`, firmware flashes attached as libvirt attaches them (`-machine
/// pflash0=…,pflash1=…`: code read-only, variables writable; blank, as the VM never runs).
fn start(
    dir: &Path,
    accel: &str,
    (cpus, mem_mib, uefi): (u32, u64, bool),
    disks: &[VmDisk],
) -> (Child, PathBuf, PathBuf) {
    let qmp = dir.join("vm-qmp.sock");
    let test_qmp = dir.join("vm-qmp-test.sock");
    let _ = std::fs::remove_file(&qmp);
    let _ = std::fs::remove_file(&test_qmp);
    let mut args: Vec<String> = [
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-accel",
        accel,
        "-smp",
        &cpus.to_string(),
        "-m",
        &format!("{mem_mib}M"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for sock in [&qmp, &test_qmp] {
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=off", sock.display()));
    }
    if uefi {
        let mut machine = "pc".to_string();
        for (i, (file, size, ro)) in [("code.fd", 2 << 20, true), ("vars.fd", 128 << 10, false)]
            .into_iter()
            .enumerate()
        {
            let path = dir.join(file);
            std::fs::write(&path, vec![0u8; size]).unwrap();
            let ro = if ro { "on" } else { "off" };
            args.push("-blockdev".into());
            args.push(format!(
                "driver=file,node-name=libvirt-pflash{i}-storage,filename={},read-only={ro}",
                path.display()
            ));
            args.push("-blockdev".into());
            args.push(format!(
                "driver=raw,node-name=libvirt-pflash{i}-format,file=libvirt-pflash{i}-storage,read-only={ro}"
            ));
            machine.push_str(&format!(",pflash{i}=libvirt-pflash{i}-format"));
        }
        args.push("-machine".into());
        args.push(machine);
    }
    if disks.iter().any(|d| d.bus == "scsi") {
        args.push("-device".into());
        args.push("virtio-scsi-pci,id=scsi0".into());
    }
    for (i, d) in disks.iter().enumerate() {
        let n = i + 1;
        args.push("-blockdev".into());
        args.push(format!(
            "driver=file,node-name=libvirt-{n}-storage,filename={}",
            d.image.display()
        ));
        args.push("-blockdev".into());
        args.push(format!(
            "driver=qcow2,node-name=libvirt-{n}-format,file=libvirt-{n}-storage"
        ));
        args.push("-device".into());
        args.push(match d.bus {
            "virtio" => format!("virtio-blk-pci,id=vdisk{i},drive=libvirt-{n}-format"),
            "scsi" => format!("scsi-hd,id=vdisk{i},drive=libvirt-{n}-format,bus=scsi0.0"),
            "ide" => format!("ide-hd,id=vdisk{i},drive=libvirt-{n}-format"),
            other => panic!("no bus {other}"),
        });
    }
    let child = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting qemu-system-x86_64");
    (child, qmp, test_qmp)
}

/// Wait (at most `limit`) until the monitor at `sock` answers; None if it did not.
fn answer(sock: &Path, limit: Duration) -> Option<Qmp> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(q) = Qmp::connect(sock, Duration::from_secs(2)) {
            return Some(q);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// "kvm" if a probe VM runs under KVM, else "tcg" (probed once per test binary).
fn accel() -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut child, _, test_qmp) = start(dir.path(), "kvm", (1, 64, false), &[]);
        let ok = answer(&test_qmp, Duration::from_secs(5)).is_some_and(|mut q| {
            q.execute_value("query-kvm", json!({}))
                .is_ok_and(|v| v["enabled"] == json!(true))
        });
        let _ = child.kill();
        let _ = child.wait();
        if ok { "kvm" } else { "tcg" }
    })
}

impl Vm {
    /// Start a VM in `dir` with `cpus` vCPUs, `mem_mib` MiB and `disks`.
    pub fn start(dir: &Path, cpus: u32, mem_mib: u64, disks: &[VmDisk]) -> Vm {
        Vm::start_with(dir, (cpus, mem_mib, false), disks)
    }

    /// A VM with UEFI firmware flashes, as libvirt starts a UEFI guest.
    pub fn start_uefi(dir: &Path, disks: &[VmDisk]) -> Vm {
        Vm::start_with(dir, (1, 128, true), disks)
    }

    fn start_with(dir: &Path, shape: (u32, u64, bool), disks: &[VmDisk]) -> Vm {
        let (child, qmp, test_qmp) = start(dir, accel(), shape, disks);
        let mut vm = Vm {
            child,
            qmp,
            test_qmp,
        };
        if answer(&vm.test_qmp, Duration::from_secs(30)).is_none()
            || answer(&vm.qmp, Duration::from_secs(30)).is_none()
        {
            let _ = vm.child.kill();
            panic!(
                "qemu-system-x86_64 did not start: {:?}",
                vm.child.try_wait()
            );
        }
        vm
    }

    pub fn exec(&self, cmd: &str, args: Value) -> Value {
        Qmp::connect(&self.test_qmp, Duration::from_secs(20))
            .expect("QMP connect")
            .execute_value(cmd, args)
            .unwrap_or_else(|e| panic!("QMP {cmd}: {e}"))
    }

    /// Write `len` bytes of `pattern` at `offset` of disk `vdiskN` through its device.
    pub fn write(&self, device: &str, offset: u64, len: u64, pattern: u8) {
        let line = format!(
            "qemu-io -d /machine/peripheral/{device}/virtio-backend \"write -P {pattern} {offset} {len}\""
        );
        let out = self.exec("human-monitor-command", json!({ "command-line": line }));
        let text = out.as_str().unwrap_or_default();
        assert!(!text.contains("Error"), "{line}: {text}");
    }

    /// Quit QEMU (it flushes the disks) and wait for it to end.
    pub fn quit(&mut self) {
        let _ = Qmp::connect(&self.test_qmp, Duration::from_secs(20))
            .expect("QMP connect")
            .execute_value("quit", json!({}));
        let start = Instant::now();
        while self.child.try_wait().expect("waiting for QEMU").is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "QEMU did not quit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Names of the `blockvault-…` bitmaps on node `node`.
    pub fn our_bitmaps(&self, node: &str) -> Vec<String> {
        self.exec("query-named-block-nodes", json!({"flat": true}))
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["node-name"] == node)
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| b["name"].as_str().map(str::to_owned))
            .filter(|b| b.starts_with("blockvault-"))
            .collect()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
