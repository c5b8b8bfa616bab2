//! One reader's access pattern, for read-ahead (see [`super::prefetch`]): is this read
//! part of a sequential run, how much data to keep scheduled past it, where scheduling
//! got to, and the run's generation (bumped when the run ends, so that queued read-ahead
//! of the old run is dropped).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::prefetch::{PREFETCH_AHEAD, PREFETCH_BATCH, SEQ_SLACK};

/// Chunk slots one scheduling step walks at most (zero slots included).
const MAX_SCAN: u64 = 2048;

/// One reader's access pattern (see the module doc).
pub(crate) struct Stream {
    /// End of the furthest read of the current run.
    next: u64,
    /// Chunk-aligned disk offset up to which the run's slots were scheduled.
    frontier: u64,
    /// Reads and bytes in the current run.
    reads: u64,
    run_bytes: u64,
    /// Slots of the data chunks scheduled and not yet passed, ascending.
    pending: VecDeque<u64>,
    /// Bumped when a run ends: tasks of older runs are dropped.
    generation: Arc<AtomicU64>,
}

impl Stream {
    pub(crate) fn new() -> Stream {
        Stream {
            next: 0,
            frontier: 0,
            reads: 0,
            run_bytes: 0,
            pending: VecDeque::new(),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Note a read of `len` bytes at `offset` (chunks of `cs` bytes). When the read
    /// continues a run, the bytes of data to keep scheduled past it.
    pub(crate) fn note(&mut self, offset: u64, len: u64, cs: u64) -> Option<u64> {
        let end = offset.saturating_add(len);
        let sequential = self.reads > 0
            && offset.saturating_add(SEQ_SLACK) >= self.next
            && offset <= self.next.max(self.frontier).saturating_add(SEQ_SLACK);
        if sequential {
            self.reads += 1;
            self.run_bytes = self.run_bytes.saturating_add(len);
            self.next = self.next.max(end);
        } else {
            self.generation.fetch_add(1, Ordering::SeqCst);
            self.pending.clear();
            self.reads = 1;
            self.run_bytes = len;
            self.next = end;
            // This read's chunks are fetched by the reader itself.
            self.frontier = end.div_ceil(cs).saturating_mul(cs);
        }
        // Slots wholly behind this read are done with.
        while self.pending.front().is_some_and(|&s| (s + 1) * cs <= end) {
            self.pending.pop_front();
        }
        if self.frontier < offset {
            self.frontier = offset / cs * cs;
            self.pending.clear();
        }
        (self.reads >= 2).then(|| {
            self.run_bytes
                .saturating_mul(2)
                .clamp(PREFETCH_BATCH.max(cs), PREFETCH_AHEAD.max(cs))
        })
    }

    /// Data bytes scheduled past the current position.
    pub(crate) fn scheduled(&self, cs: u64) -> u64 {
        self.pending.len() as u64 * cs
    }

    /// First slot not scheduled yet.
    pub(crate) fn frontier_slot(&self, cs: u64) -> u64 {
        self.frontier / cs
    }

    /// Slots up to (excluding) `end_slot` are scheduled; `data` of them hold data.
    pub(crate) fn advance(&mut self, end_slot: u64, data: &[u64], cs: u64) {
        self.frontier = self.frontier.max(end_slot.saturating_mul(cs));
        self.pending.extend(data.iter().copied());
    }

    /// Most slots one scheduling step walks.
    pub(crate) fn max_scan() -> u64 {
        MAX_SCAN
    }

    /// The current run's generation and its counter (for a task).
    pub(super) fn generation(&self) -> (u64, Arc<AtomicU64>) {
        (
            self.generation.load(Ordering::SeqCst),
            Arc::clone(&self.generation),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 64 << 10;

    #[test]
    fn a_run_starts_at_the_second_adjacent_read_and_grows_to_the_window() {
        let mut s = Stream::new();
        assert_eq!(s.note(0, 2 << 20, CS), None);
        assert_eq!(s.note(2 << 20, 2 << 20, CS), Some(8 << 20));
        // Small reads: one batch at least (what one miss would fetch anyway).
        let mut t = Stream::new();
        t.note(0, 4096, CS);
        assert_eq!(t.note(4096, 4096, CS), Some(PREFETCH_BATCH));
        let mut last = None;
        for i in 2..20u64 {
            last = s.note(i << 21, 2 << 20, CS);
        }
        assert_eq!(last, Some(PREFETCH_AHEAD));
    }

    #[test]
    fn a_jump_ends_the_run_and_bumps_the_generation_but_a_jump_over_scheduled_holes_does_not() {
        let mut s = Stream::new();
        s.note(0, 1 << 20, CS);
        s.note(1 << 20, 1 << 20, CS);
        let (g, _) = s.generation();
        // The scan went past a 96 MiB hole up to 200 MiB.
        s.advance((200 << 20) / CS, &[(199 << 20) / CS], CS);
        assert!(s.note(198 << 20, 1 << 20, CS).is_some());
        assert_eq!(s.generation().0, g);
        // A jump far past what was scheduled: random.
        assert_eq!(s.note(900 << 20, 1 << 20, CS), None);
        assert_ne!(s.generation().0, g);
        assert_eq!(s.scheduled(CS), 0);
        assert_eq!(s.frontier_slot(CS), (901 << 20) / CS);
    }

    #[test]
    fn slightly_reordered_requests_stay_sequential() {
        let mut s = Stream::new();
        s.note(4 << 20, 2 << 20, CS);
        assert!(s.note(8 << 20, 2 << 20, CS).is_some());
        assert!(s.note(6 << 20, 2 << 20, CS).is_some());
    }
}
