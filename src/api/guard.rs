//! Failed logins, limited per peer: a peer (IP address) that sent more than
//! [`FAILED_PER_MINUTE`] requests without a valid token within one minute is answered
//! `429 Too Many Requests` (with `Retry-After`) until the minute is over, without the
//! token even being looked up. Only the first [`FAILED_PER_MINUTE`] failures of a peer
//! in a minute and the first refusal by the limit are written to the audit log, so a
//! flood of unauthenticated requests cannot grow the catalog (before: 500 requests grew
//! it by 27.5 MB).
//!
//! The table lives in memory (a restart forgets it) and holds at most [`PEERS`] peers;
//! when full, windows that are over are dropped first, then the oldest.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed requests a peer may make per minute before it is answered 429.
pub const FAILED_PER_MINUTE: u32 = 60;
/// Length of a peer's window.
const WINDOW: Duration = Duration::from_secs(60);
/// Peers remembered at once.
const PEERS: usize = 4_096;

/// What to do with a request without a valid token from a peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Answer 401 and audit it.
    Audit,
    /// Answer 429 and audit this one refusal (the first of the window).
    LimitAudit,
    /// Answer 429 silently (already audited this window).
    Limit,
}

/// Failed logins per peer in the current window.
#[derive(Default)]
pub struct FailedLogins {
    peers: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailedLogins {
    /// Is `peer` over its limit now (then its request is refused before any lookup)?
    pub fn limited(&self, peer: IpAddr) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers
            .get(&peer)
            .is_some_and(|(start, n)| start.elapsed() < WINDOW && *n >= FAILED_PER_MINUTE)
    }

    /// Count one failed (or limited) request of `peer`.
    pub fn fail(&self, peer: IpAddr) -> Verdict {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.len() >= PEERS && !peers.contains_key(&peer) {
            peers.retain(|_, (start, _)| start.elapsed() < WINDOW);
            if peers.len() >= PEERS
                && let Some(oldest) = peers.iter().min_by_key(|(_, (s, _))| *s).map(|(k, _)| *k)
            {
                peers.remove(&oldest);
            }
        }
        let e = peers.entry(peer).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= WINDOW {
            *e = (Instant::now(), 0);
        }
        e.1 = e.1.saturating_add(1);
        match e.1 {
            n if n <= FAILED_PER_MINUTE => Verdict::Audit,
            n if n == FAILED_PER_MINUTE + 1 => Verdict::LimitAudit,
            _ => Verdict::Limit,
        }
    }

    /// Seconds until `peer`'s window is over.
    pub fn retry_after(&self, peer: IpAddr) -> u64 {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers
            .get(&peer)
            .map_or(0, |(s, _)| WINDOW.saturating_sub(s.elapsed()).as_secs() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_limited_after_its_quota_and_others_are_not() {
        let f = FailedLogins::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        for _ in 0..FAILED_PER_MINUTE {
            assert!(!f.limited(a));
            assert_eq!(f.fail(a), Verdict::Audit);
        }
        assert!(f.limited(a));
        assert_eq!(f.fail(a), Verdict::LimitAudit);
        assert_eq!(f.fail(a), Verdict::Limit);
        assert!(!f.limited(b));
        assert!(f.retry_after(a) <= 60);
    }
}
