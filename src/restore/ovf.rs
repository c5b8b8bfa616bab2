//! The OVF 1.0 descriptor of an OVA export: the disks (streamOptimized VMDKs) and the
//! virtual hardware that holds them.
//!
//! ```text
//!  InstanceID 1        CPU        VirtualQuantity = capture.hardware.vcpus        (else 1)
//!  InstanceID 2        memory     VirtualQuantity = memory_bytes in MiB          (else 1024)
//!  InstanceID 3..      controllers, in order of first use:
//!                        QEMU bus   VMware controller                  units per controller
//!                        virtio  →  SCSI   ResourceType 6, VirtualSCSI  15 (unit 7 is the HBA's)
//!                        scsi    →  SCSI   ResourceType 6, lsilogic     15
//!                        ide     →  IDE    ResourceType 5               2  (2 controllers)
//!                        sata    →  SATA   ResourceType 20, vmware.sata.ahci   30
//!                        other / unknown / no hardware recorded  →  SCSI lsilogic
//!  after them          one ResourceType 17 disk per backup disk, in backup order
//!  vmw:Config firmware=efi   when the hardware says "uefi" (VMware's own extension)
//! ```
//! VMware has no virtio: a virtio disk goes on a paravirtual SCSI controller (pvscsi,
//! whose driver every current Linux has), and the descriptor says so in a comment.
//! At most 4 SCSI, 2 IDE and 4 SATA controllers; more disks are refused (export a
//! qcow2-set instead).

use std::fs;
use std::path::Path;

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::manifest::BackupManifest;

pub(super) fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A VMware disk controller kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctrl {
    /// SCSI with its ResourceSubType.
    Scsi(&'static str),
    Ide,
    Sata,
}

impl Ctrl {
    fn for_bus(bus: Option<&str>) -> Ctrl {
        match bus {
            Some("virtio") => Ctrl::Scsi("VirtualSCSI"),
            Some("ide") => Ctrl::Ide,
            Some("sata") => Ctrl::Sata,
            _ => Ctrl::Scsi("lsilogic"),
        }
    }

    fn units(self) -> usize {
        match self {
            Ctrl::Scsi(_) => 15,
            Ctrl::Ide => 2,
            Ctrl::Sata => 30,
        }
    }

    fn max(self) -> usize {
        match self {
            Ctrl::Scsi(_) | Ctrl::Sata => 4,
            Ctrl::Ide => 2,
        }
    }

    fn family(self) -> &'static str {
        match self {
            Ctrl::Scsi(_) => "SCSI",
            Ctrl::Ide => "IDE",
            Ctrl::Sata => "SATA",
        }
    }

    /// The unit number of the `i`-th disk on a controller (SCSI skips its own unit 7).
    fn unit(self, i: usize) -> usize {
        match self {
            Ctrl::Scsi(_) if i >= 7 => i + 1,
            _ => i,
        }
    }
}

/// Per disk: (index of its controller, unit on it).
type Slot = (usize, usize);

/// Controllers and, per disk, its slot.
fn layout(buses: &[Option<&str>]) -> Result<(Vec<Ctrl>, Vec<Slot>)> {
    let mut ctrls: Vec<(Ctrl, usize)> = Vec::new();
    let mut slots = Vec::new();
    for bus in buses {
        let kind = Ctrl::for_bus(*bus);
        let free = ctrls
            .iter()
            .rposition(|(c, used)| *c == kind && *used < c.units());
        let at = match free {
            Some(at) => at,
            None => {
                let same = ctrls
                    .iter()
                    .filter(|(c, _)| c.family() == kind.family())
                    .count();
                if same >= kind.max() {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "an OVA holds at most {} {} controllers of {} disks; this backup has \
                             more {} disks: export it as a qcow2-set",
                            kind.max(),
                            kind.family(),
                            kind.units(),
                            kind.family()
                        ),
                    ));
                }
                ctrls.push((kind, 0));
                ctrls.len() - 1
            }
        };
        slots.push((at, ctrls[at].0.unit(ctrls[at].1)));
        ctrls[at].1 += 1;
    }
    if ctrls.is_empty() {
        ctrls.push((Ctrl::Scsi("lsilogic"), 0));
    }
    Ok((ctrls.into_iter().map(|(c, _)| c).collect(), slots))
}

/// The OVF descriptor for backup `m` whose disk files (in `work`) are `files`.
pub(super) fn descriptor(
    m: &BackupManifest,
    server: &str,
    work: &Path,
    files: &[String],
) -> Result<String> {
    let hw = m.capture.as_ref().and_then(|c| c.hardware.as_ref());
    let bus = |name: &str| {
        hw.and_then(|h| h.disks.iter().find(|d| d.name == name))
            .map(|d| d.bus.as_str())
    };
    let buses: Vec<Option<&str>> = m.disks.iter().map(|d| bus(&d.name)).collect();
    let (ctrls, slots) = layout(&buses)?;
    let mut refs = String::new();
    let mut disks = String::new();
    let mut items = String::new();
    let first_disk = 3 + ctrls.len();
    for (i, (d, f)) in m.disks.iter().zip(files).enumerate() {
        let len = fs::metadata(work.join(f))
            .ctx(|| format!("sizing {f}"))?
            .len();
        refs.push_str(&format!(
            "    <File ovf:href=\"{}\" ovf:id=\"file{i}\" ovf:size=\"{len}\"/>\n",
            xml_escape(f)
        ));
        disks.push_str(&format!(
            "    <Disk ovf:capacity=\"{}\" ovf:capacityAllocationUnits=\"byte\" ovf:diskId=\"vmdisk{i}\" ovf:fileRef=\"file{i}\" ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>\n",
            // The VMDK's capacity: whole sectors.
            d.size.next_multiple_of(512)
        ));
        let (ctrl, unit) = slots[i];
        items.push_str(&format!(
            "      <Item>\n        <rasd:AddressOnParent>{unit}</rasd:AddressOnParent>\n        <rasd:ElementName>{}</rasd:ElementName>\n        <rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource>\n        <rasd:InstanceID>{}</rasd:InstanceID>\n        <rasd:Parent>{}</rasd:Parent>\n        <rasd:ResourceType>17</rasd:ResourceType>\n      </Item>\n",
            xml_escape(&d.name),
            first_disk + i,
            3 + ctrl
        ));
    }
    let mut controllers = String::new();
    for (i, c) in ctrls.iter().enumerate() {
        let address = ctrls[..i]
            .iter()
            .filter(|x| x.family() == c.family())
            .count();
        let (rtype, sub) = match c {
            Ctrl::Scsi(sub) => (6, Some(*sub)),
            Ctrl::Ide => (5, None),
            Ctrl::Sata => (20, Some("vmware.sata.ahci")),
        };
        let sub = sub
            .map(|s| format!("        <rasd:ResourceSubType>{s}</rasd:ResourceSubType>\n"))
            .unwrap_or_default();
        controllers.push_str(&format!(
            "      <Item>\n        <rasd:Address>{address}</rasd:Address>\n        <rasd:ElementName>{} Controller {address}</rasd:ElementName>\n        <rasd:InstanceID>{}</rasd:InstanceID>\n{sub}        <rasd:ResourceType>{rtype}</rasd:ResourceType>\n      </Item>\n",
            c.family(),
            3 + i
        ));
    }
    let firmware = if hw.and_then(|h| h.firmware.as_deref()) == Some("uefi") {
        "      <vmw:Config ovf:required=\"false\" vmw:key=\"firmware\" vmw:value=\"efi\"/>\n"
    } else {
        ""
    };
    let vcpus = hw.and_then(|h| h.vcpus).unwrap_or(1);
    let mem_mib = hw
        .and_then(|h| h.memory_bytes)
        .map(|b| b.div_ceil(1 << 20))
        .unwrap_or(1024);
    let mut notes = Vec::new();
    notes.push(match hw {
        Some(_) => "vCPUs, memory and disk buses as the VM ran at the backup".to_string(),
        None => "CPU and memory are placeholders".to_string(),
    });
    if buses.contains(&Some("virtio")) {
        notes.push(
            "VMware has no virtio: virtio disks are on a paravirtual SCSI controller (VirtualSCSI, the guest's vmw_pvscsi driver)"
                .to_string(),
        );
    }
    if let Some(other) = buses
        .iter()
        .flatten()
        .find(|b| !["virtio", "scsi", "ide", "sata"].contains(b))
    {
        notes.push(format!("{other} disks are on an LSI Logic SCSI controller"));
    }
    Ok(format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- Exported by blockvault from backup {id} ({name}); {notes}. -->
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
{refs}  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
{disks}  </DiskSection>
  <VirtualSystem ovf:id="{server}">
    <Info>A virtual machine restored from a blockvault backup</Info>
    <Name>{server}</Name>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{server}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-07</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:ElementName>{vcpus} virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>{vcpus}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>{mem_mib}MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>{mem_mib}</rasd:VirtualQuantity>
      </Item>
{controllers}{items}{firmware}    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#,
        id = xml_escape(&m.id),
        name = xml_escape(&m.name),
        notes = xml_escape(&notes.join("; ")).replace("--", "- -"),
        server = xml_escape(server),
    ))
}

#[cfg(test)]
mod tests {
    use super::{Ctrl, layout};

    #[test]
    fn scsi_disks_skip_the_controllers_own_unit_7_and_fill_15_per_controller() {
        let (ctrls, slots) = layout(&[None; 17]).unwrap();
        assert_eq!(ctrls, vec![Ctrl::Scsi("lsilogic"); 2]);
        assert_eq!(slots[6], (0, 6));
        assert_eq!(slots[7], (0, 8));
        assert_eq!(slots[14], (0, 15));
        assert_eq!(slots[15], (1, 0));
        assert!(slots.iter().all(|&(_, u)| u != 7 && u <= 15));
    }

    #[test]
    fn each_bus_gets_its_controller_and_virtio_goes_paravirtual() {
        let (ctrls, slots) = layout(&[
            Some("virtio"),
            Some("scsi"),
            Some("ide"),
            Some("virtio"),
            Some("ide"),
            Some("ide"),
            Some("sata"),
        ])
        .unwrap();
        assert_eq!(
            ctrls,
            vec![
                Ctrl::Scsi("VirtualSCSI"),
                Ctrl::Scsi("lsilogic"),
                Ctrl::Ide,
                Ctrl::Ide,
                Ctrl::Sata
            ]
        );
        assert_eq!(
            slots,
            vec![(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (3, 0), (4, 0)]
        );
        assert!(layout(&[Some("ide"); 5]).is_err());
    }
}
