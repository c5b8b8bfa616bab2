//! Image format detection by magic bytes, never by file name, and the choice of reader.
//!
//! Every format QEMU knows is recognised by its magic, so that a container is never
//! taken for a raw disk (a backup of a VHD as raw would hold the container file, not the
//! disk inside it). Where each magic lives:
//!
//! ```text
//! format     where                  bytes                              reader
//! qcow2      0                      "QFI\xfb" + BE u32 version 2|3     native (imago), or QEMU
//! qcow (v1)  0                      "QFI\xfb" + BE u32 version 1       QEMU
//! vmdk       0                      "KDMV" | "# Disk DescriptorFile"   native (vmdk-core)
//! vmdk (ESX) 0                      "COWD"                             QEMU
//! vpc (VHD)  0 (dynamic) or         "conectix"                         QEMU
//!            file end - 512 (fixed: footer only; `qemu-img info` says raw there)
//! vhdx       0                      "vhdxfile"                         QEMU
//! vdi        64                     LE u32 0xbeda107f                  QEMU
//! qed        0                      "QED\0"                            QEMU
//! parallels  0                      "WithoutFreeSpace" | "WithouFreSpacExt"  QEMU
//! bochs      0                      "Bochs Virtual HD Image"           QEMU
//! cloop      0                      "#!/bin/sh\n#V2.0 Format\n"        QEMU
//! dmg        file end - 512         "koly"                             QEMU
//! luks       0                      "LUKS\xba\xbe"                     QEMU + secret
//! raw        anything else
//! ```
//!
//! A qcow2 header is looked at further (offsets in the v3 header): `crypt_method` (BE u32
//! at 32: 1 = AES, 2 = LUKS) means encrypted; incompatible feature bits (BE u64 at 72)
//! 2 (external data file), 3 (compression type, the byte at 104: 1 = zstd) and 4
//! (extended L2), and any unknown bit, are read through QEMU rather than natively.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::open_file;
use crate::error::{Error, Result};

/// Which reader an image goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A raw disk: the file is the disk.
    Raw,
    /// qcow2 through imago.
    NativeQcow2,
    /// VMDK through vmdk-core.
    NativeVmdk,
    /// Through a private qemu-storage-daemon with this block driver.
    Qemu {
        driver: &'static str,
        /// The image is encrypted: a secret is needed.
        encryption: Option<Encryption>,
        /// Why not natively (for the log and the manifest note).
        why: String,
    },
}

/// How an image is encrypted, as QEMU's options name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// A LUKS volume (`driver=luks`).
    Luks,
    /// A qcow2 with `encrypt.format=luks` (crypt_method 2).
    Qcow2Luks,
    /// A qcow2 with legacy AES (crypt_method 1, `encrypt.format=aes`).
    Qcow2Aes,
}

impl Encryption {
    /// The scheme's name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Encryption::Luks => "LUKS",
            Encryption::Qcow2Luks => "LUKS encryption",
            Encryption::Qcow2Aes => "legacy AES encryption",
        }
    }
}

/// The detected format: QEMU's driver name and the reader to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub format: &'static str,
    pub route: Route,
}

/// Bytes of the head looked at (the qcow2 fields end at 105, VDI's signature at 68).
const HEAD: usize = 512;

/// Detect the format of the image file at `path` from its magic bytes.
pub fn detect(path: &Path) -> Result<Detected> {
    let mut f = open_file(path)?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(format!("stat of {}", path.display()), e))?
        .len();
    let head = read_up_to(&mut f, path, 0, HEAD)?;
    let tail = if len >= 1024 {
        read_up_to(&mut f, path, len - 512, 512)?
    } else {
        Vec::new()
    };
    Ok(detect_bytes(&head, &tail))
}

fn read_up_to(f: &mut std::fs::File, path: &Path, offset: u64, max: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; max];
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io(format!("seeking in {}", path.display()), e))?;
    let mut n = 0;
    while n < max {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

/// Detect from the first bytes of a file (`head`, up to 512) and its last 512 bytes
/// (`tail`, empty when the file is shorter than 1 KiB).
pub fn detect_bytes(head: &[u8], tail: &[u8]) -> Detected {
    let qemu = |format: &'static str, why: &str| Detected {
        format,
        route: Route::Qemu {
            driver: format,
            encryption: None,
            why: why.to_string(),
        },
    };
    let be32 = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    if head.starts_with(b"QFI\xfb") {
        return match be32(4) {
            Some(1) => qemu("qcow", "qcow version 1 has no native reader"),
            _ => qcow2(head),
        };
    }
    if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        return Detected {
            format: "vmdk",
            route: Route::NativeVmdk,
        };
    }
    if head.starts_with(b"COWD") {
        return qemu("vmdk", "ESX COWD sparse VMDK has no native reader");
    }
    if head.starts_with(b"conectix") || tail.starts_with(b"conectix") {
        return qemu("vpc", "VHD has no native reader");
    }
    if head.starts_with(b"vhdxfile") {
        return qemu("vhdx", "VHDX has no native reader");
    }
    if head.get(64..68) == Some(&0xbeda_107fu32.to_le_bytes()[..]) {
        return qemu("vdi", "VDI has no native reader");
    }
    if head.starts_with(b"QED\0") {
        return qemu("qed", "QED has no native reader");
    }
    if head.starts_with(b"WithoutFreeSpace") || head.starts_with(b"WithouFreSpacExt") {
        return qemu("parallels", "Parallels has no native reader");
    }
    if head.starts_with(b"Bochs Virtual HD Image") {
        return qemu("bochs", "Bochs has no native reader");
    }
    if head.starts_with(b"#!/bin/sh\n#V2.0 Format\n") {
        return qemu("cloop", "cloop has no native reader");
    }
    if head.starts_with(b"LUKS\xba\xbe") {
        return Detected {
            format: "luks",
            route: Route::Qemu {
                driver: "luks",
                encryption: Some(Encryption::Luks),
                why: "LUKS-encrypted image".into(),
            },
        };
    }
    if tail.starts_with(b"koly") {
        return qemu("dmg", "DMG has no native reader");
    }
    Detected {
        format: "raw",
        route: Route::Raw,
    }
}

/// Route a qcow2 header (version 2 or 3; other versions go to imago's checks, which
/// refuse them clearly).
pub fn qcow2(head: &[u8]) -> Detected {
    let be32 = |o: usize| {
        head.get(o..o + 4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let version = be32(4);
    let crypt = be32(32);
    let encryption = match crypt {
        0 => None,
        1 => Some(Encryption::Qcow2Aes),
        2 => Some(Encryption::Qcow2Luks),
        // Unknown methods: the native reader refuses them as QEMU does.
        _ => None,
    };
    let fallback = |why: String, encryption| Detected {
        format: "qcow2",
        route: Route::Qemu {
            driver: "qcow2",
            encryption,
            why,
        },
    };
    if let Some(enc) = encryption {
        return fallback(format!("encrypted qcow2 (crypt_method {crypt})"), Some(enc));
    }
    if version >= 3 {
        let incompat = head
            .get(72..80)
            .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])));
        let header_len = be32(100);
        if incompat & (1 << 3) != 0 {
            let ct = if header_len > 104 {
                head.get(104).copied().unwrap_or(0)
            } else {
                0
            };
            let name = match ct {
                1 => "zstd".to_string(),
                n => format!("type {n}"),
            };
            return fallback(format!("qcow2 with {name} compression"), None);
        }
        if incompat & (1 << 2) != 0 {
            return fallback("qcow2 with an external data file".into(), None);
        }
        if incompat & (1 << 4) != 0 {
            return fallback("qcow2 with extended L2 entries".into(), None);
        }
        let unknown = incompat & !0b1_1111;
        if unknown != 0 {
            return fallback(
                format!("qcow2 with unknown incompatible features {unknown:#x}"),
                None,
            );
        }
    }
    Detected {
        format: "qcow2",
        route: Route::NativeQcow2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(head: &[u8], tail: &[u8]) -> &'static str {
        detect_bytes(head, tail).format
    }

    #[test]
    fn every_known_magic_is_recognised_and_nothing_else() {
        assert_eq!(fmt(b"QFI\xfb\0\0\0\x03", b""), "qcow2");
        assert_eq!(fmt(b"QFI\xfb\0\0\0\x01", b""), "qcow");
        assert_eq!(fmt(b"KDMV", b""), "vmdk");
        assert_eq!(fmt(b"COWD", b""), "vmdk");
        assert_eq!(fmt(b"conectix", b""), "vpc");
        assert_eq!(fmt(&[0; 512], b"conectix\0\0"), "vpc");
        assert_eq!(fmt(b"vhdxfile", b""), "vhdx");
        let mut vdi = vec![0u8; 512];
        vdi[64..68].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        assert_eq!(fmt(&vdi, b""), "vdi");
        assert_eq!(fmt(b"QED\0", b""), "qed");
        assert_eq!(fmt(b"WithoutFreeSpace", b""), "parallels");
        assert_eq!(fmt(b"WithouFreSpacExt", b""), "parallels");
        assert_eq!(fmt(b"Bochs Virtual HD Image\0", b""), "bochs");
        assert_eq!(fmt(b"#!/bin/sh\n#V2.0 Format\nmodprobe", b""), "cloop");
        assert_eq!(fmt(b"LUKS\xba\xbe\0\x01", b""), "luks");
        assert_eq!(fmt(&[0; 512], b"koly\0\0\0\x04"), "dmg");
        assert_eq!(fmt(&[0xab; 512], &[0xcd; 512]), "raw");
        assert_eq!(fmt(b"", b""), "raw");
    }

    #[test]
    fn qcow2_features_choose_the_reader() {
        let mut h = vec![0u8; 112];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[7] = 3;
        h[103] = 112; // header_length
        assert_eq!(qcow2(&h).route, Route::NativeQcow2);
        let mut z = h.clone();
        z[79] = 1 << 3;
        z[104] = 1;
        assert!(matches!(
            qcow2(&z).route,
            Route::Qemu { driver: "qcow2", encryption: None, ref why } if why.contains("zstd")
        ));
        let mut luks = h.clone();
        luks[35] = 2;
        assert!(matches!(
            qcow2(&luks).route,
            Route::Qemu {
                encryption: Some(Encryption::Qcow2Luks),
                ..
            }
        ));
        let mut unknown = h.clone();
        unknown[78] = 1; // bit 8
        assert!(matches!(qcow2(&unknown).route, Route::Qemu { .. }));
        // A truncated header never panics.
        let _ = qcow2(b"QFI\xfb");
        let _ = detect_bytes(b"QFI\xfb", b"");
    }
}
