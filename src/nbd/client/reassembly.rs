//! Reassembly of one read request from the pieces a server sends (structured reply data
//! and hole chunks, or one simple reply).
//!
//! The server chooses the pieces: any order, any sizes. Its offsets and lengths are
//! untrusted, so every piece is checked with checked arithmetic: it must lie inside the
//! request, be non-empty, and overlap no byte already covered. The read is complete only
//! when every byte of the request was covered exactly once; a server that sends one
//! chunk twice and skips another gets an error, never a buffer with zeros where its data
//! should be. Pure logic (no I/O), proptested below.

use std::collections::BTreeMap;

/// Which bytes of one read request `[offset, offset + len)` have been covered.
#[derive(Debug, Clone)]
pub struct Coverage {
    offset: u64,
    len: u64,
    /// Covered ranges, relative to `offset`: start → end, disjoint, merged when touching.
    covered: BTreeMap<u64, u64>,
    bytes: u64,
}

impl Coverage {
    pub fn new(offset: u64, len: u64) -> Coverage {
        Coverage {
            offset,
            len,
            covered: BTreeMap::new(),
            bytes: 0,
        }
    }

    /// Record a piece `[off, off + n)` (absolute disk offsets) sent by the server; returns
    /// where it goes in the request's buffer. Refused (nothing recorded) when it is empty,
    /// overflows, lies outside the request, or overlaps bytes already covered.
    pub fn accept(
        &mut self,
        off: u64,
        n: u64,
    ) -> std::result::Result<std::ops::Range<usize>, String> {
        let req_end = self.offset.checked_add(self.len);
        let end = off.checked_add(n);
        let (Some(req_end), Some(end)) = (req_end, end) else {
            return Err(format!("sent a piece {off}+{n} that overflows"));
        };
        if n == 0 {
            return Err(format!("sent an empty piece at {off}"));
        }
        if off < self.offset || end > req_end {
            return Err(format!(
                "sent data for {off}+{n} outside the request {}+{}",
                self.offset, self.len
            ));
        }
        let (s, e) = (off - self.offset, end - self.offset);
        // The covered range starting at or before s must end at or before s; the next one
        // must start at or after e.
        if let Some((_, &pe)) = self.covered.range(..=s).next_back()
            && pe > s
        {
            return Err(format!(
                "sent bytes {off}+{n} twice (overlapping an earlier piece)"
            ));
        }
        if let Some((&ns, _)) = self.covered.range(s..).next()
            && ns < e
        {
            return Err(format!(
                "sent bytes {off}+{n} twice (overlapping an earlier piece)"
            ));
        }
        // Merge with neighbours that touch.
        let mut start = s;
        let mut stop = e;
        if let Some((&ps, &pe)) = self.covered.range(..s).next_back()
            && pe == s
        {
            start = ps;
            self.covered.remove(&ps);
        }
        if let Some(&ne) = self.covered.get(&e) {
            stop = ne;
            self.covered.remove(&e);
        }
        self.covered.insert(start, stop);
        self.bytes += n;
        let (s, e) = (usize::try_from(s), usize::try_from(e));
        match (s, e) {
            (Ok(s), Ok(e)) => Ok(s..e),
            _ => Err(format!("piece {off}+{n} does not fit in memory")),
        }
    }

    /// True when every byte of the request has been covered.
    pub fn is_complete(&self) -> bool {
        self.bytes == self.len
    }

    /// Ok when complete; otherwise names the first byte range not sent.
    pub fn finish(&self) -> std::result::Result<(), String> {
        if self.is_complete() {
            return Ok(());
        }
        let mut pos = 0u64;
        for (&s, &e) in &self.covered {
            if s > pos {
                break;
            }
            pos = e;
        }
        let gap_end = self
            .covered
            .range(pos..)
            .next()
            .map_or(self.len, |(&s, _)| s);
        Err(format!(
            "ended read {}+{} having sent {} bytes (nothing for {}+{})",
            self.offset,
            self.len,
            self.bytes,
            self.offset + pos,
            gap_end - pos
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The rule, byte by byte: a piece is accepted iff it is non-empty, inside the
    /// request, and touches no byte already covered.
    fn model(len: u64, pieces: &[(u64, u64)]) -> (Vec<bool>, Vec<bool>) {
        let mut cov = vec![false; len as usize];
        let mut verdicts = Vec::new();
        for &(o, n) in pieces {
            let ok = n > 0
                && o.checked_add(n).is_some_and(|e| e <= len)
                && cov[o as usize..(o + n) as usize].iter().all(|c| !c);
            if ok {
                cov[o as usize..(o + n) as usize].fill(true);
            }
            verdicts.push(ok);
        }
        (verdicts, cov)
    }

    fn partition(len: u64, cuts: &[u64]) -> Vec<(u64, u64)> {
        let mut points: Vec<u64> = cuts.iter().map(|c| c % len).filter(|&c| c > 0).collect();
        points.push(0);
        points.push(len);
        points.sort_unstable();
        points.dedup();
        points.windows(2).map(|w| (w[0], w[1] - w[0])).collect()
    }

    proptest! {
        #[test]
        fn random_reply_sequences_match_the_byte_model(
            base in prop_oneof![Just(0u64), Just(u64::MAX - 300), 0..u64::MAX / 2],
            len in 1u64..256,
            cuts in proptest::collection::vec(any::<u64>(), 0..8),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
            noise in proptest::collection::vec((0u64..300, 0u64..300), 0..4),
        ) {
            let len = len.min(u64::MAX - base);
            prop_assume!(len > 0);
            // A valid partition, replayed in a random order with repeats and stray pieces.
            let parts = partition(len, &cuts);
            let mut seq: Vec<(u64, u64)> = order.iter().map(|i| parts[i.index(parts.len())]).collect();
            seq.extend(noise.iter().copied());
            seq.extend(parts.iter().copied());
            let (verdicts, cov) = model(len, &seq);
            let mut c = Coverage::new(base, len);
            for (&(o, n), &ok) in seq.iter().zip(&verdicts) {
                let r = c.accept(base + o, n);
                prop_assert_eq!(r.is_ok(), ok, "piece {}+{}", o, n);
                if let Ok(range) = r {
                    prop_assert_eq!(range, o as usize..(o + n) as usize);
                }
            }
            prop_assert_eq!(c.is_complete(), cov.iter().all(|&b| b));
            prop_assert_eq!(c.finish().is_ok(), c.is_complete());
        }

        #[test]
        fn hostile_offsets_never_panic(
            base in any::<u64>(), len in any::<u64>(),
            pieces in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..16),
        ) {
            let mut c = Coverage::new(base, len);
            for (o, n) in pieces {
                if let Ok(r) = c.accept(o, n) {
                    prop_assert!(r.end as u64 <= len);
                }
            }
            let _ = c.finish();
        }
    }

    #[test]
    fn a_chunk_sent_twice_leaves_a_gap_and_is_refused() {
        let mut c = Coverage::new(4096, 8192);
        c.accept(4096, 4096).unwrap();
        let e = c.accept(4096, 4096).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        assert!(!c.is_complete());
        let e = c.finish().unwrap_err();
        assert!(e.contains("nothing for 8192+4096"), "{e}");
    }

    #[test]
    fn offsets_near_the_top_do_not_wrap() {
        let mut c = Coverage::new(u64::MAX - 10, 10);
        assert!(
            c.accept(u64::MAX - 5, 10)
                .unwrap_err()
                .contains("overflows")
        );
        assert!(c.accept(u64::MAX - 20, 5).unwrap_err().contains("outside"));
        assert_eq!(c.accept(u64::MAX - 10, 10).unwrap(), 0..10);
        assert!(c.is_complete());
    }
}
