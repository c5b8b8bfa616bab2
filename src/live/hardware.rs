//! The virtual hardware of a live VM, read over QMP for the manifest (`capture.hardware`)
//! so that exports describe the VM as it ran:
//! ```text
//!  vcpus         query-cpus-fast (entries)
//!  memory_bytes  query-memory-size-summary (base-memory + plugged-memory)
//!  machine       qom-get /machine type ("pc-q35-7.2-machine" → "pc-q35-7.2")
//!  firmware      "uefi" when a firmware flash (`/machine/system.flashN`) is attached, as
//!                libvirt and every UEFI setup with variables do; else unknown (SeaBIOS,
//!                or a UEFI image given as `-bios`, look alike over QMP)
//!  disks[].bus   qom-get <qdev> type: virtio-blk-* → virtio, scsi-* → scsi (controller:
//!                the type of the device that owns its parent_bus), ide-* → ide, or sata
//!                when that controller is an AHCI one, nvme* → nvme, usb-storage → usb
//! ```
//! A qemu-storage-daemon has no vCPUs: no hardware at all. Hardware is a description,
//! never a reason to fail a backup: whatever QEMU does not answer is left out.

use serde_json::{Value, json};

use super::disks::{Disk, attached};
use crate::manifest::{DiskHardware, Hardware};
use crate::qmp::Qmp;

fn qom_type(qmp: &mut Qmp, path: &str) -> Option<String> {
    qmp.execute_value("qom-get", json!({"path": path, "property": "type"}))
        .ok()?
        .as_str()
        .map(str::to_string)
}

/// The type of the device that owns the bus `qdev` hangs off.
fn controller(qmp: &mut Qmp, qdev: &str) -> Option<String> {
    let bus = qmp
        .execute_value("qom-get", json!({"path": qdev, "property": "parent_bus"}))
        .ok()?;
    let (owner, _) = bus.as_str()?.rsplit_once('/')?;
    qom_type(qmp, owner)
}

/// Bus class of a QEMU block device type.
pub(super) fn bus_of(device: &str, controller: Option<&str>) -> String {
    let ahci = controller.is_some_and(|c| c.contains("ahci"));
    if device.starts_with("virtio-blk") {
        "virtio".into()
    } else if device.starts_with("scsi-") {
        "scsi".into()
    } else if device.starts_with("ide-") {
        if ahci { "sata" } else { "ide" }.into()
    } else if device.starts_with("nvme") {
        "nvme".into()
    } else if device == "usb-storage" || device == "usb-bot" {
        "usb".into()
    } else {
        device.into()
    }
}

fn disk(qmp: &mut Qmp, d: &Disk) -> Option<DiskHardware> {
    let qdev = d.qdev.as_deref()?;
    // A virtio-blk-pci's block backend is its "virtio-backend" child: name the PCI
    // device, as it was given on the command line.
    let device_path = qdev.strip_suffix("/virtio-backend").unwrap_or(qdev);
    let device = qom_type(qmp, device_path)?;
    let ctrl = if device.starts_with("scsi-") || device.starts_with("ide-") {
        controller(qmp, device_path)
    } else {
        None
    };
    Some(DiskHardware {
        name: d.name.clone(),
        bus: bus_of(&device, ctrl.as_deref()),
        device: Some(device),
        controller: ctrl,
    })
}

/// The hardware of the VM behind `qmp`, or None when it is not a VM.
pub(super) fn probe(qmp: &mut Qmp, disks: &[Disk]) -> Option<Hardware> {
    let cpus: Vec<Value> = qmp.execute("query-cpus-fast", json!({})).ok()?;
    let memory = qmp
        .execute_value("query-memory-size-summary", json!({}))
        .ok()
        .and_then(|m| {
            let base = m.get("base-memory")?.as_u64()?;
            Some(base + m.get("plugged-memory").and_then(Value::as_u64).unwrap_or(0))
        });
    let machine = qom_type(qmp, "/machine")
        .map(|t| t.strip_suffix("-machine").map(str::to_string).unwrap_or(t));
    let uefi = qmp
        .execute::<Vec<Value>>("query-block", json!({}))
        .ok()
        .is_some_and(|block| attached(&block).iter().any(|a| a.is_firmware()));
    let disks = disks.iter().filter_map(|d| disk(qmp, d)).collect();
    Some(Hardware {
        vcpus: u32::try_from(cpus.len()).ok().filter(|n| *n > 0),
        memory_bytes: memory,
        machine,
        firmware: uefi.then(|| "uefi".to_string()),
        disks,
    })
}

#[cfg(test)]
mod tests {
    use super::bus_of;

    #[test]
    fn device_types_map_to_buses() {
        assert_eq!(bus_of("virtio-blk-pci", None), "virtio");
        assert_eq!(bus_of("scsi-hd", Some("virtio-scsi-device")), "scsi");
        assert_eq!(bus_of("ide-hd", Some("piix3-ide")), "ide");
        assert_eq!(bus_of("ide-hd", Some("ich9-ahci")), "sata");
        assert_eq!(bus_of("nvme", None), "nvme");
        assert_eq!(bus_of("floppy", None), "floppy");
    }
}
