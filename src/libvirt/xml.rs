//! The libvirt XML we read (domain, backup job, checkpoint) and write (backup request,
//! checkpoint request). Parsed with `roxmltree`; only the few fields we use are read.
//!
//! ```text
//! backup request (pull mode)                      checkpoint request
//! <domainbackup mode='pull'>                      <domaincheckpoint>
//!   <server transport='unix' socket='SOCK'/>        <name>blockvault-TAG-STAMP</name>
//!   <disks>                                         <disks>
//!     <disk name='vda' backup='yes' type='file'       <disk name='vda' checkpoint='bitmap'/>
//!           backupmode='incremental'                  <disk name='vdc' checkpoint='no'/>
//!           incremental='PREVIOUS-CHECKPOINT'>      </disks>
//!       <scratch file='DIR/scratch-vda.qcow2'/>   </domaincheckpoint>
//!     </disk>
//!     <disk name='vdb' backup='yes' type='file' backupmode='full'>…</disk>
//!     <disk name='hdc' backup='no'/>
//!   </disks>
//! </domainbackup>
//! ```
//! libvirt answers (`backup-dumpxml`) with each disk's `exportname` (the NBD export, the
//! target name) and, for an incremental disk, `exportbitmap` (`backup-<target>`: the
//! changes since the named checkpoint, offered as the `qemu:dirty-bitmap:backup-<target>`
//! NBD meta context).

use crate::error::{Error, Result};

/// One disk of a domain, as the live domain XML describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// Target device name (`vda`): the disk's name in backups.
    pub target: String,
    /// `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// Image format (`qcow2`, `raw`); checkpoints need qcow2.
    pub format: String,
    /// File, block device or network name, for messages.
    pub source: Option<String>,
    pub readonly: bool,
}

/// What we need from a live domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub disks: Vec<DomainDisk>,
    /// The DAC label QEMU runs under (`+64055:+64055`, `libvirt-qemu:kvm`), if any.
    pub dac_label: Option<String>,
    /// The domain has a guest-agent channel (`org.qemu.guest_agent.0`).
    pub agent_channel: bool,
}

fn parse<'a>(xml: &'a str, what: &str) -> Result<roxmltree::Document<'a>> {
    roxmltree::Document::parse(xml)
        .map_err(|e| Error::invalid(format!("libvirt {what} XML does not parse")).with_source(e))
}

/// Parse `virsh dumpxml DOMAIN`.
pub fn parse_domain(xml: &str) -> Result<DomainInfo> {
    let doc = parse(xml, "domain")?;
    let root = doc.root_element();
    let devices = root.children().find(|n| n.has_tag_name("devices"));
    let mut disks = Vec::new();
    let mut agent_channel = false;
    if let Some(devices) = devices {
        for d in devices.children().filter(|n| n.has_tag_name("disk")) {
            let Some(target) = d
                .children()
                .find(|n| n.has_tag_name("target"))
                .and_then(|t| t.attribute("dev"))
            else {
                continue;
            };
            let source = d
                .children()
                .find(|n| n.has_tag_name("source"))
                .and_then(|s| {
                    s.attribute("file")
                        .or_else(|| s.attribute("dev"))
                        .or_else(|| s.attribute("name"))
                        .or_else(|| s.attribute("volume"))
                        .map(str::to_owned)
                });
            disks.push(DomainDisk {
                target: target.to_string(),
                device: d.attribute("device").unwrap_or("disk").to_string(),
                format: d
                    .children()
                    .find(|n| n.has_tag_name("driver"))
                    .and_then(|n| n.attribute("type"))
                    .unwrap_or("raw")
                    .to_string(),
                source,
                readonly: d.children().any(|n| n.has_tag_name("readonly")),
            });
        }
        agent_channel = devices
            .children()
            .filter(|n| n.has_tag_name("channel"))
            .flat_map(|c| c.children())
            .any(|t| {
                t.has_tag_name("target") && t.attribute("name") == Some("org.qemu.guest_agent.0")
            });
    }
    let dac_label = root
        .children()
        .filter(|n| n.has_tag_name("seclabel") && n.attribute("model") == Some("dac"))
        .flat_map(|s| s.children())
        .find(|n| n.has_tag_name("label"))
        .and_then(|l| l.text())
        .map(|t| t.trim().to_string());
    Ok(DomainInfo {
        disks,
        dac_label,
        agent_channel,
    })
}

/// One disk in a backup request.
#[derive(Debug, Clone)]
pub struct BackupDisk {
    pub target: String,
    /// Scratch file for the copy-before-write data (None: `backup='no'`).
    pub scratch: Option<String>,
    /// Checkpoint to read the changes since (None: full).
    pub incremental: Option<String>,
}

/// The pull-mode backup request.
pub fn backup_xml(socket: &str, disks: &[BackupDisk]) -> String {
    let mut x = String::from("<domainbackup mode='pull'>\n");
    x += &format!("  <server transport='unix' socket='{}'/>\n", esc(socket));
    x += "  <disks>\n";
    for d in disks {
        match &d.scratch {
            None => x += &format!("    <disk name='{}' backup='no'/>\n", esc(&d.target)),
            Some(s) => {
                let mode = match &d.incremental {
                    Some(c) => format!("backupmode='incremental' incremental='{}'", esc(c)),
                    None => "backupmode='full'".to_string(),
                };
                x += &format!(
                    "    <disk name='{}' backup='yes' type='file' {mode}>\
                     <scratch file='{}'/></disk>\n",
                    esc(&d.target),
                    esc(s)
                );
            }
        }
    }
    x += "  </disks>\n</domainbackup>\n";
    x
}

/// The checkpoint request: `bitmap` disks get a bitmap, the others none.
pub fn checkpoint_xml(name: &str, disks: &[(String, bool)]) -> String {
    let mut x = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <description>blockvault backup chain</description>\n  <disks>\n",
        esc(name)
    );
    for (target, bitmap) in disks {
        x += &format!(
            "    <disk name='{}' checkpoint='{}'/>\n",
            esc(target),
            if *bitmap { "bitmap" } else { "no" }
        );
    }
    x += "  </disks>\n</domaincheckpoint>\n";
    x
}

/// One disk of a running backup job (`virsh backup-dumpxml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDisk {
    pub target: String,
    pub export: String,
    pub bitmap: Option<String>,
}

/// The running backup job: its NBD socket and per disk the export and bitmap.
pub fn parse_backup_job(xml: &str) -> Result<(Option<String>, Vec<JobDisk>)> {
    let doc = parse(xml, "backup job")?;
    let root = doc.root_element();
    let socket = root
        .children()
        .find(|n| n.has_tag_name("server"))
        .and_then(|s| s.attribute("socket"))
        .map(str::to_owned);
    let mut disks = Vec::new();
    for d in root
        .descendants()
        .filter(|n| n.has_tag_name("disk") && n.attribute("backup") == Some("yes"))
    {
        let Some(target) = d.attribute("name") else {
            continue;
        };
        disks.push(JobDisk {
            target: target.to_string(),
            export: d.attribute("exportname").unwrap_or(target).to_string(),
            bitmap: d.attribute("exportbitmap").map(str::to_owned),
        });
    }
    Ok((socket, disks))
}

/// The disks a checkpoint holds a bitmap for (`virsh checkpoint-dumpxml --no-domain`).
pub fn checkpoint_disks(xml: &str) -> Result<Vec<String>> {
    let doc = parse(xml, "checkpoint")?;
    let root = doc.root_element();
    let Some(disks) = root.children().find(|n| n.has_tag_name("disks")) else {
        return Ok(Vec::new());
    };
    Ok(disks
        .children()
        .filter(|n| n.has_tag_name("disk") && n.attribute("checkpoint") == Some("bitmap"))
        .filter_map(|n| n.attribute("name").map(str::to_owned))
        .collect())
}

/// Escape for an XML attribute or text.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o += "&amp;",
            '<' => o += "&lt;",
            '>' => o += "&gt;",
            '\'' => o += "&apos;",
            '"' => o += "&quot;",
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_disks_label_and_agent_are_read() {
        let xml = r#"<domain type='qemu'><name>d</name><devices>
          <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
            <source file='/v/a.qcow2' index='2'/><target dev='vda' bus='virtio'/></disk>
          <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
            <target dev='hdc' bus='ide'/><readonly/></disk>
          <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
        </devices>
        <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+64055</label></seclabel>
        </domain>"#;
        let d = parse_domain(xml).unwrap();
        assert_eq!(d.disks.len(), 2);
        assert_eq!(d.disks[0].target, "vda");
        assert_eq!(d.disks[0].format, "qcow2");
        assert_eq!(d.disks[0].source.as_deref(), Some("/v/a.qcow2"));
        assert_eq!(d.disks[1].device, "cdrom");
        assert!(d.disks[1].readonly);
        assert_eq!(d.dac_label.as_deref(), Some("+64055:+64055"));
        assert!(d.agent_channel);
        assert!(parse_domain("<domain").is_err());
    }

    #[test]
    fn requests_are_escaped_and_jobs_parsed() {
        let x = backup_xml(
            "/r/s'ock",
            &[
                BackupDisk {
                    target: "vda".into(),
                    scratch: Some("/r/vda.qcow2".into()),
                    incremental: Some("cp<1>".into()),
                },
                BackupDisk {
                    target: "hdc".into(),
                    scratch: None,
                    incremental: None,
                },
            ],
        );
        assert!(x.contains("socket='/r/s&apos;ock'"), "{x}");
        assert!(x.contains("incremental='cp&lt;1&gt;'"), "{x}");
        assert!(x.contains("<disk name='hdc' backup='no'/>"), "{x}");
        roxmltree::Document::parse(&x).unwrap();
        let c = checkpoint_xml("n", &[("vda".into(), true), ("vdb".into(), false)]);
        assert_eq!(checkpoint_disks(&c).unwrap(), vec!["vda".to_string()]);
        let job = r#"<domainbackup mode='pull'><incremental>cp1</incremental>
          <server transport='unix' socket='/r/bk.sock'/><disks>
          <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='cp1'
                exportname='vda' exportbitmap='backup-vda' index='7'/>
          <disk name='vdb' backup='yes' type='file' backupmode='full' exportname='vdb'/>
          <disk name='hdc' backup='no'/></disks></domainbackup>"#;
        let (sock, disks) = parse_backup_job(job).unwrap();
        assert_eq!(sock.as_deref(), Some("/r/bk.sock"));
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0].bitmap.as_deref(), Some("backup-vda"));
        assert_eq!(disks[1].bitmap, None);
    }
}
