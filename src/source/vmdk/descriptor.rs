//! Checks of a VMDK's sparse header and descriptor made before vmdk-core opens it, at
//! least as strict as QEMU's block/vmdk.c, so that an image qemu-img refuses is refused
//! here (`InvalidFormat`) instead of being read as an empty or truncated disk.
//!
//! Sparse extent header (little-endian, the first 512-byte sector of a hosted sparse
//! file; VMware's "Virtual Disk Format 1.1"):
//! ```text
//!  0 magic "KDMV"  4 version u32  8 flags u32  12 capacity u64 (sectors)
//! 20 grainSize u64 (sectors)  28 descriptorOffset u64 (sectors)  36 descriptorSize u64
//! 44 numGTEsPerGT u32  48 rgdOffset u64  56 gdOffset u64  64 overHead u64 ...
//! ```
//! A capacity of 0 is refused: QEMU then takes the embedded descriptor as a descriptor
//! file and refuses it ("Unsupported image type 'streamOptimized'").
//!
//! Descriptor (text; a file of its own, or embedded in a sparse file): one extent per line,
//! `ACCESS SECTORS TYPE "FILENAME" [OFFSET]`, e.g. `RW 131072 FLAT "disk-flat.vmdk" 0`.
//! Refused, as QEMU refuses them: a missing, zero, negative or overflowing size; a
//! missing or unterminated quote; an unknown type; a FLAT extent without its offset; an
//! access other than RW (QEMU skips such lines and would read another disk); a descriptor
//! file without extents or with a `createType` QEMU does not open from a descriptor file.
//! Extent files named by a descriptor file must lie in its directory tree.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::source::{MAX_DISK_SIZE, confine, image_root, open_file};

/// Largest descriptor we read (QEMU's own limit for a descriptor file is far smaller in
/// practice: a few KiB).
const MAX_DESCRIPTOR: u64 = 1 << 20;
/// Extent types QEMU opens.
const TYPES: &[&str] = &["FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"];
/// `createType`s QEMU opens from a descriptor file.
const DESCRIPTOR_FILE_TYPES: &[&str] = &[
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
];

fn refuse(path: &Path, what: String) -> Error {
    Error::invalid(format!(
        "{}: {what}; qemu-img refuses such an image too",
        path.display()
    ))
}

/// Check the VMDK at `path` (a sparse file or a descriptor file).
pub fn check(path: &Path) -> Result<()> {
    let f = open_file(path)?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(format!("stat of {}", path.display()), e))?
        .len();
    let read = |off: u64, n: u64| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; n.min(len.saturating_sub(off)) as usize];
        f.read_exact_at(&mut buf, off)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Ok(buf)
    };
    let head = read(0, 512)?;
    if head.starts_with(b"KDMV") {
        if head.len() < 64 {
            return Err(Error::invalid(format!(
                "{}: truncated VMDK sparse header",
                path.display()
            )));
        }
        let le64 = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let capacity = le64(12);
        if capacity == 0 {
            return Err(refuse(path, "VMDK sparse header with capacity 0".into()));
        }
        if capacity > MAX_DISK_SIZE / 512 {
            return Err(Error::unsupported(format!(
                "{}: disk size of {capacity} sectors exceeds the limit of {MAX_DISK_SIZE} bytes",
                path.display()
            )));
        }
        let (desc_offset, desc_size) = (le64(28), le64(36));
        if desc_offset != 0 && desc_size != 0 {
            let bytes = desc_size.saturating_mul(512);
            if bytes > MAX_DESCRIPTOR || desc_offset > len / 512 {
                return Err(Error::invalid(format!(
                    "{}: embedded VMDK descriptor of {desc_size} sectors at sector {desc_offset} is out of bounds",
                    path.display()
                )));
            }
            let text = read(desc_offset * 512, bytes)?;
            let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
            check_descriptor(path, &String::from_utf8_lossy(&text[..end]), false)?;
        }
        return Ok(());
    }
    if len > MAX_DESCRIPTOR {
        return Err(Error::invalid(format!(
            "{}: VMDK descriptor file of {len} bytes (more than {MAX_DESCRIPTOR})",
            path.display()
        )));
    }
    let text = read(0, len)?;
    check_descriptor(path, &String::from_utf8_lossy(&text), true)
}

/// Check a descriptor's extent lines (and, for a descriptor file, its createType, that it
/// has extents, and that their files lie in its directory tree).
pub fn check_descriptor(path: &Path, text: &str, file: bool) -> Result<()> {
    let mut sectors_total: u64 = 0;
    let mut extents = 0usize;
    let mut create_type = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some((k, v)) = line.split_once('=')
            && k.trim() == "createType"
        {
            create_type = Some(v.trim().trim_matches('"').to_string());
            continue;
        }
        let mut words = line.split_ascii_whitespace();
        let Some(access) = words.next() else { continue };
        if !["RW", "RDONLY", "NOACCESS"].contains(&access) {
            continue;
        }
        let bad = |why: &str| refuse(path, format!("descriptor line {}: {why}: {line}", n + 1));
        if access != "RW" {
            return Err(bad(
                "extent access other than RW (QEMU ignores such extents)",
            ));
        }
        let sectors = words.next().ok_or_else(|| bad("no extent size"))?;
        let sectors: u64 = match sectors.parse::<u64>() {
            Ok(s) if sectors.bytes().all(|b| b.is_ascii_digit()) && s <= i64::MAX as u64 => s,
            _ => return Err(bad("extent size is not a sector count")),
        };
        if sectors == 0 {
            return Err(bad("extent of 0 sectors"));
        }
        let kind = words.next().ok_or_else(|| bad("no extent type"))?;
        if !TYPES.contains(&kind) {
            return Err(bad("unknown extent type"));
        }
        // The rest: "FILENAME" [OFFSET]
        let rest = line
            .find(kind)
            .map(|i| line[i + kind.len()..].trim_start())
            .unwrap_or("");
        let Some(quoted) = rest.strip_prefix('"') else {
            return Err(bad("extent file name is not quoted"));
        };
        let Some(close) = quoted.find('"') else {
            return Err(bad("extent file name lacks its closing quote"));
        };
        let name = &quoted[..close];
        let tail: Vec<&str> = quoted[close + 1..].split_ascii_whitespace().collect();
        match (kind, tail.as_slice()) {
            ("FLAT", [off])
                if off.bytes().all(|b| b.is_ascii_digit()) && off.parse::<u64>().is_ok() => {}
            ("FLAT", _) => return Err(bad("FLAT extent needs a non-negative offset")),
            (_, []) => {}
            _ => return Err(bad("unexpected words after the extent file name")),
        }
        if name.is_empty() {
            return Err(bad("empty extent file name"));
        }
        sectors_total = sectors_total
            .checked_add(sectors)
            .filter(|s| *s <= i64::MAX as u64 / 512)
            .ok_or_else(|| bad("extents add up to more than 2^63 bytes"))?;
        if file {
            let root = image_root(path)?;
            let dir = path.parent().unwrap_or(Path::new("."));
            confine(&root, path, "extent file", &dir.join(name))?;
        }
        extents += 1;
    }
    if file {
        match create_type.as_deref() {
            Some(t) if DESCRIPTOR_FILE_TYPES.contains(&t) => {}
            Some(t) => {
                return Err(refuse(
                    path,
                    format!("createType \"{t}\" cannot be opened from a descriptor file"),
                ));
            }
            None => return Err(refuse(path, "VMDK descriptor without createType".into())),
        }
        if extents == 0 {
            return Err(refuse(path, "VMDK descriptor without extents".into()));
        }
    }
    if sectors_total > MAX_DISK_SIZE / 512 {
        return Err(Error::unsupported(format!(
            "{}: disk size of {sectors_total} sectors exceeds the limit of {MAX_DISK_SIZE} bytes",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use proptest::prelude::*;

    const HEAD: &str = "# Disk DescriptorFile\nversion=1\nCID=d52855f8\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n";

    fn embedded(line: &str) -> Result<()> {
        check_descriptor(Path::new("t.vmdk"), &format!("{HEAD}{line}\n"), false)
    }

    #[test]
    fn extent_lines_qemu_refuses_are_invalid_format() {
        for line in [
            "RW 99999999999999999999999 FLAT \"f.vmdk\" 0",
            "RW -5 FLAT \"f.vmdk\" 0",
            "RW 0 FLAT \"f.vmdk\" 0",
            "RW FLAT \"f.vmdk\" 0",
            "RW 131072 FLAT \"f.vmdk 0",
            "RW 131072 FLAT f.vmdk 0",
            "RDONLY 131072 FLAT \"f.vmdk\" 0",
            "RW 131072 FLAT \"f.vmdk\"",
            "RW 131072 FLAT \"f.vmdk\" -1",
            "RW 131072 FOO \"f.vmdk\" 0",
            "RW 0x20000 FLAT \"f.vmdk\" 0",
            "RW 131072 SPARSE \"f.vmdk\" 7",
        ] {
            let e = embedded(line).expect_err(line);
            assert_eq!(e.kind(), ErrorKind::InvalidFormat, "{line}: {e}");
        }
        embedded("RW 131072 FLAT \"f.vmdk\" 0").unwrap();
        embedded("RW 131072 SPARSE \"f.vmdk\"").unwrap();
        let e = embedded("RW 9223372036854775807 FLAT \"f.vmdk\" 0").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidFormat, "{e}");
    }

    proptest! {
        /// Any descriptor text is parsed or refused, never a panic.
        #[test]
        fn random_descriptors_never_panic(text in "[ -~\\n\"]{0,300}", line in "(RW|RDONLY) [0-9-]{0,25} (FLAT|SPARSE|X) \"?[a-z.]{0,8}\"? ?[0-9-]{0,22}") {
            let _ = check_descriptor(Path::new("t.vmdk"), &text, false);
            let _ = embedded(&line);
        }
    }
}
