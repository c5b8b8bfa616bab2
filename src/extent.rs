//! Byte ranges of a virtual disk ([`Extent`]) and the largest disk accepted: the
//! vocabulary shared by the sources, the NBD client and change tracking. It sits at the
//! bottom of the module graph so that `nbd` need not import `source`.

use crate::error::Result;

/// The largest virtual disk we accept (64 TiB). A larger size in a header is treated as
/// hostile or broken input: it would make the disk index itself huge.
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// A byte range of the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    /// `[offset, offset + length)`, refused (`InvalidFormat`) when the end overflows u64.
    pub fn new(offset: u64, length: u64) -> Result<Extent> {
        let e = Extent { offset, length };
        e.checked_end()?;
        Ok(e)
    }

    /// The first byte after the extent. Saturates at `u64::MAX` for an extent whose end
    /// overflows: input from outside is checked with [`checked_end`](Self::checked_end)
    /// or [`check_within`](Self::check_within) where it enters.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    /// The first byte after the extent; an overflowing end is refused.
    pub fn checked_end(&self) -> Result<u64> {
        self.offset.checked_add(self.length).ok_or_else(|| {
            crate::Error::invalid(format!(
                "extent of {} bytes at offset {} ends past 2^64",
                self.length, self.offset
            ))
        })
    }

    /// Refuse an extent that overflows or ends past a disk of `size` bytes.
    pub fn check_within(&self, size: u64) -> Result<()> {
        if self.checked_end()? > size {
            return Err(crate::Error::invalid(format!(
                "extent {}+{} (bytes {}..{}) lies past the disk end ({size} bytes)",
                self.offset,
                self.length,
                self.offset,
                self.end()
            )));
        }
        Ok(())
    }
}

/// Append `[offset, offset + length)` to a sorted extent list, merging it with the last
/// extent when they touch or overlap. Every source builds its allocation map with this.
/// An end past 2^64 saturates; callers check untrusted extents before (see [`Extent`]).
pub fn push_extent(out: &mut Vec<Extent>, offset: u64, length: u64) {
    if length == 0 {
        return;
    }
    let new_end = offset.saturating_add(length);
    let length = new_end - offset;
    match out.last_mut() {
        Some(last) if last.end() >= offset => {
            let end = last.end().max(new_end);
            last.length = end - last.offset;
        }
        _ => out.push(Extent { offset, length }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_that_overflow_or_pass_the_end_are_refused() {
        assert!(Extent::new(u64::MAX, 1).is_err());
        assert_eq!(Extent::new(u64::MAX - 1, 1).unwrap().end(), u64::MAX);
        let e = Extent {
            offset: u64::MAX,
            length: 2,
        };
        assert_eq!(e.end(), u64::MAX, "end saturates instead of wrapping");
        assert_eq!(
            e.checked_end().unwrap_err().kind(),
            crate::ErrorKind::InvalidFormat
        );
        assert!(e.check_within(u64::MAX).is_err());
        let e = Extent::new(4096, 4096).unwrap();
        e.check_within(8192).unwrap();
        assert!(e.check_within(8191).is_err());
        let mut out = Vec::new();
        push_extent(&mut out, 0, 10);
        push_extent(&mut out, u64::MAX - 5, 100);
        assert_eq!(out.last().unwrap().end(), u64::MAX);
    }
}
